"""Causal attribution of hidden neurons to the logits (SPEC 2.1).

For each analysed class c and neuron i we intervene ``do(h_i := h_i + delta)`` at the
analysis layer and measure ``A_c[i, k] = mean_x |g(h)_k - g(h + delta e_i)_k|``.

Interventions for many neurons and samples go through the rest of the network ``g`` in
chunks of at most ``chunk_size`` rows. The affine modules right after the layer are folded
into one response per neuron (:mod:`.fold`), so only the rest of the network runs per row.
When ``g`` is affine as a whole (the final Linear layer) that is the exact closed form
``A_c[i, k] = delta * |W[k, i]|``, the same for every sample.

Reference: Sun et al., "Neural Network Semantic Backdoor Detection and Mitigation: A
Causality-Based Approach", USENIX Security 2024.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..utils import eval_mode
from .fold import Fold, find_fold
from .hooks import LayerRef, activations, intervene

logger = logging.getLogger(__name__)

Head = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the causal attribution.

    Attributes:
        delta: size of the intervention added to one neuron.
        num_samples: clean samples per class (at most).
        chunk_size: rows (neurons x samples) per forward pass of the rest of the network.
        exact_affine: fold the affine modules that follow the layer into one response per
            neuron (exact; see :mod:`.fold`). When the whole rest of the network is affine
            (the default layer: the input of the final Linear) this is the closed form
            ``A_c[i, k] = |g(h + delta e_i)_k - g(h)_k|``, the same for every sample.
    """

    delta: float = 1.0
    num_samples: int = 256
    chunk_size: int = 1024
    exact_affine: bool = True


@dataclass(frozen=True)
class NeuronEffects:
    """Per-class attribution matrices.

    Shape:
        matrices: ``(C, n, K)``: for each analysed class c (in ``classes`` order), the effect
        of each of the n neurons on each of the K logits.

    Attributes:
        method: ``affine`` (closed form), or ``batched-`` with how the rest of the network ran.
        folded: the modules folded after the layer (``a -> b``), empty when none were.
    """

    layer: str
    matrices: Tensor
    classes: tuple[int, ...]
    num_samples: tuple[int, ...]
    method: str
    config: AttributionConfig = field(default_factory=AttributionConfig)
    seconds: float = 0.0
    folded: str = ""

    @property
    def num_neurons(self) -> int:
        return self.matrices.shape[1]

    def for_class(self, c: int) -> Tensor:
        """``A_c`` as an ``(n, K)`` matrix."""
        return self.matrices[self.classes.index(c)]


def make_head(model: nn.Module, ref: LayerRef, x: Tensor, h: Tensor, logits: Tensor) -> tuple[Head, str]:
    """Build ``g``: a function from activations at ``ref`` to logits.

    ``g`` runs the model on a one-sample stub input while the hook substitutes the given
    activations (so the network before ``ref`` is not recomputed). That is exact only when
    the output depends on the input through ``ref`` alone; we check it on ``(x, h, logits)``
    and otherwise fall back to re-running the whole network on the matching inputs. ``g``
    may change its argument in place (in-place modules after ``ref``).

    Returns:
        ``(g, kind)`` where kind is ``"stub"`` or ``"tiled"``.
    """
    stub = torch.zeros_like(x[:1])

    def g_stub(hh: Tensor) -> Tensor:
        with intervene(model, ref, lambda _out: hh):
            return model(stub.expand(1, *x.shape[1:]))

    try:
        out = g_stub(h.clone())
        if out.shape == logits.shape and torch.allclose(out, logits, rtol=1e-4, atol=1e-4):
            return g_stub, "stub"
    except RuntimeError:
        pass

    b = x.shape[0]

    def g_tiled(hh: Tensor) -> Tensor:
        reps = hh.shape[0] // b
        with intervene(model, ref, lambda _out: hh):
            return model(x.repeat(reps, *([1] * (x.dim() - 1))))

    return g_tiled, "tiled"


def _shifted_rows(base: Tensor, shift: Tensor | float, i0: int, i1: int) -> Tensor:
    """Rows ``(i, x)`` for neurons ``i0..i1-1``, samples fastest.

    ``shift`` is either the folded responses (``base[x] + shift[i]``) or the intervention
    size ``delta`` (``base[x]`` with ``delta`` added to neuron i).
    """
    m, b = i1 - i0, base.shape[0]
    rows = torch.empty(m, *base.shape, dtype=base.dtype, device=base.device)
    if isinstance(shift, Tensor):
        torch.add(base.unsqueeze(0), shift[i0:i1].unsqueeze(1), out=rows)
    else:
        rows.copy_(base.unsqueeze(0).expand_as(rows))
        idx = torch.arange(m, device=base.device)
        rows[idx, :, i0 + idx] += shift
    return rows.reshape(m * b, *base.shape[1:])


@torch.no_grad()
def class_attribution(model: nn.Module, ref: LayerRef, x: Tensor, config: AttributionConfig,
                      fold: Fold | None | bool = True) -> tuple[Tensor, str]:
    """``A[i, k]`` for one batch of same-class inputs ``x`` (already normalised).

    Args:
        model: the classifier (eval mode).
        ref: the analysis layer.
        x: inputs of one class.
        config: attribution settings.
        fold: a :class:`Fold` found earlier; ``True`` to look for one here (when
            ``config.exact_affine``); ``None`` or ``False`` for the general path.

    Shape:
        x: ``(b, C, H, W)``; returns ``(n, K)``.
    """
    if fold is True:
        fold = find_fold(model, ref, x, config.delta, config.chunk_size) if config.exact_affine else None
    if fold:
        if fold.reaches_output:
            return fold.response.abs().to(torch.float32), "affine"
        point = fold.point
        base, logits = activations(model, point, x)
        shift: Tensor | float = fold.response.to(base)
        n = fold.response.shape[0]
    else:
        point = ref
        base, logits = activations(model, point, x)
        shift, n = config.delta, base.shape[1]
    g, kind = make_head(model, point, x, base, logits)
    b = base.shape[0]
    per = max(1, config.chunk_size // b)
    out = torch.empty(n, logits.shape[1], device=base.device)
    for i0 in range(0, n, per):
        i1 = min(n, i0 + per)
        moved = g(_shifted_rows(base, shift, i0, i1)).reshape(i1 - i0, b, -1)
        out[i0:i1] = (moved - logits.unsqueeze(0)).abs().mean(1)
    return out, ("folded-" + kind) if fold else kind


@torch.no_grad()
def naive_class_attribution(model: nn.Module, ref: LayerRef, x: Tensor, delta: float = 1.0,
                            batch_size: int = 64) -> Tensor:
    """The study's procedure: for each batch and each neuron, one forward pass of ``g``.

    Used as the reference in tests and benchmarks; slow by design.
    """
    total = None
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        h, logits = activations(model, ref, xb)
        g, _ = make_head(model, ref, xb, h, logits)
        rows = []
        for i in range(h.shape[1]):
            hh = h.clone()
            hh[:, i] += delta
            rows.append((g(hh) - logits).abs().sum(0))
        part = torch.stack(rows)
        total = part if total is None else total + part
    return total / len(x)


def compute_neuron_effects(model: nn.Module, ref: LayerRef, class_inputs: dict[int, Tensor],
                           config: AttributionConfig | None = None, progress: bool = False) -> NeuronEffects:
    """Attribution matrices for every class in ``class_inputs``.

    Args:
        model: the classifier (put in eval mode for the duration).
        ref: the analysis layer.
        class_inputs: class index -> normalised inputs of that class, on the model's device.
        config: attribution settings.
        progress: show a progress bar over classes.
    """
    config = config or AttributionConfig()
    start = time.perf_counter()
    mats, counts, kinds = [], [], set()
    classes = tuple(sorted(class_inputs))
    with eval_mode(model):
        fold = None
        if config.exact_affine and classes and len(class_inputs[classes[0]]):
            fold = find_fold(model, ref, class_inputs[classes[0]][:4], config.delta, config.chunk_size)
        for c in tqdm(classes, desc="causal attribution", disable=not progress, leave=False, unit="class"):
            x = class_inputs[c][:config.num_samples]
            if len(x) == 0:
                from ..errors import UserInputError
                raise UserInputError(f"class {c} has no clean samples to analyse")
            acc = None
            for s in range(0, len(x), config.chunk_size):
                a, kind = class_attribution(model, ref, x[s:s + config.chunk_size], config, fold)
                kinds.add(kind)
                w = min(len(x), s + config.chunk_size) - s
                acc = a * w if acc is None else acc + a * w
            mats.append((acc / len(x)).cpu())
            counts.append(len(x))
    method = "affine" if kinds == {"affine"} else "batched-" + "+".join(sorted(kinds))
    return NeuronEffects(str(ref), torch.stack(mats), classes, tuple(counts), method, config,
                         time.perf_counter() - start, fold.describe() if fold else "")
