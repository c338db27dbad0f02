"""Causal attribution of hidden neurons to the logits (docs/method.md §2.1).

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
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import check_at_least, check_finite
from ..utils import cpu_channels_last, eval_mode
from .fold import Fold, find_fold, run_tail, trace_downstream
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
        forward_batch: samples per forward pass when the activations at the layer are
            recorded. Small batches keep the intermediate maps in the CPU cache (timings:
            docs/benchmarks.md).
        exact_affine: fold the affine modules that follow the layer into one response per
            neuron (exact; see :mod:`.fold`). When the whole rest of the network is affine
            (the default layer: the input of the final Linear) this is the closed form
            ``A_c[i, k] = |g(h + delta e_i)_k - g(h)_k|``, the same for every sample.
    """

    delta: float = 1.0
    num_samples: int = 256
    chunk_size: int = 1024
    forward_batch: int = 64
    exact_affine: bool = True

    def __post_init__(self) -> None:
        check_finite("delta", self.delta, positive=True)
        check_at_least("num_samples", self.num_samples, 1)
        check_at_least("chunk_size", self.chunk_size, 1)
        check_at_least("forward_batch", self.forward_batch, 1)


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


def make_head(model: nn.Module, ref: LayerRef, x: Tensor, h: Tensor, logits: Tensor,
              tail: Sequence[str] | None = None) -> tuple[Head, str]:
    """Build ``g``: a function from activations at ``ref`` to logits.

    In order of preference, each checked on ``(x, h, logits)`` before use:

    - ``chain``: call the modules ``tail`` (a plain module chain from ``ref`` to the output,
      see :func:`.fold.trace_downstream`) directly;
    - ``stub``: run the model on a one-sample stub input while a hook substitutes the given
      activations (the network before ``ref`` runs on one sample only). Exact when the
      output depends on the input through ``ref`` alone;
    - ``tiled``: re-run the whole network on the matching inputs with the substitution.

    ``g`` may change its argument in place (in-place modules after ``ref``).

    Returns:
        ``(g, kind)`` where kind is ``"chain"``, ``"stub"`` or ``"tiled"``.
    """
    def close(out: Tensor) -> bool:
        return out.shape == logits.shape and torch.allclose(out, logits, rtol=1e-4, atol=1e-4)

    if tail is not None:
        def g_chain(hh: Tensor) -> Tensor:
            return run_tail(model, tail, hh)

        try:
            if close(g_chain(h.clone())):
                return g_chain, "chain"
        except RuntimeError:
            pass

    stub = torch.zeros_like(x[:1])

    def g_stub(hh: Tensor) -> Tensor:
        with intervene(model, ref, lambda _out: hh):
            return model(stub.expand(1, *x.shape[1:]))

    try:
        if close(g_stub(h.clone())):
            return g_stub, "stub"
    except RuntimeError:
        pass

    b = x.shape[0]

    def g_tiled(hh: Tensor) -> Tensor:
        reps = hh.shape[0] // b
        with intervene(model, ref, lambda _out: hh):
            return model(x.repeat(reps, *([1] * (x.dim() - 1))))

    return g_tiled, "tiled"


@dataclass(frozen=True)
class AttributionPlan:
    """How the rest of the network is evaluated for one model and layer.

    Attributes:
        fold: the affine modules after the layer, folded (``None``: nothing folded).
        tail: the module chain from the substitution point (the layer, or the end of the
            fold) to the output, when the network is such a chain there.
        relu_offset: set when the folded tail is a ReLU followed by affine modules only
            (checked numerically): ``f(R_i) - f(0)`` per neuron, ``(n, K)``, for the affine rest
            ``f``. Then ``f(relu(b + R_i)) = f(max(b, -R_i)) + f(R_i) - f(0)``: one pass over
            each row instead of an add and a ReLU.
    """

    fold: Fold | None = None
    tail: tuple[str, ...] | None = None
    relu_offset: Tensor | None = None


def _is_affine_chain(model: nn.Module, names: Sequence[str], like: Tensor) -> bool:
    """``run_tail(names)`` is affine on tensors shaped like ``like`` (checked on random inputs)."""
    def f(t: Tensor) -> Tensor:
        return run_tail(model, names, t.clone())

    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(like.shape, generator=gen).to(like) for _ in range(2))
    try:
        lhs, rhs = f(u + v), f(u) + f(v) - f(torch.zeros_like(u))
    except RuntimeError:
        return False
    return bool(torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * float(lhs.abs().max().clamp(min=1.0))))


@torch.no_grad()
def plan_attribution(model: nn.Module, ref: LayerRef, x: Tensor, config: AttributionConfig) -> AttributionPlan:
    """Inspect what follows ``ref`` (on a few samples of ``x``) and decide how to evaluate it."""
    try:
        downstream = trace_downstream(model, ref, x[:4])
    except RuntimeError:
        return AttributionPlan()
    fold = find_fold(model, ref, x, config.delta, config.chunk_size, downstream) if config.exact_affine else None
    tail = downstream.tail(len(fold.modules) if fold else 0)
    relu_offset = None
    if fold and not fold.reaches_output and tail and isinstance(model.get_submodule(tail[0]), nn.ReLU):
        base, _ = activations(model, fold.point, x[:4])
        if _is_affine_chain(model, tail[1:], base):
            r = fold.response.to(base)
            relu_offset = run_tail(model, tail[1:], r.clone()) - run_tail(model, tail[1:], torch.zeros_like(r[:1]))
    return AttributionPlan(fold, tail, relu_offset)


def _activations_batched(model: nn.Module, ref: LayerRef, x: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """:func:`activations` over ``x`` in batches of ``batch`` samples, concatenated."""
    if len(x) <= batch:
        return activations(model, ref, x)
    parts = [activations(model, ref, x[s:s + batch]) for s in range(0, len(x), batch)]
    return torch.cat([h for h, _ in parts]), torch.cat([lg for _, lg in parts])


def _shifted_rows(base: Tensor, shift: Tensor | float, i0: int, i1: int, buf: Tensor) -> Tensor:
    """Rows ``(i, x)`` for neurons ``i0..i1-1``, samples fastest, written into ``buf``.

    ``shift`` is either the folded responses (``base[x] + shift[i]``) or the intervention
    size ``delta`` (``base[x]`` with ``delta`` added to neuron i). Reusing one buffer matters:
    allocating a fresh multi-MB tensor per chunk costs more than the arithmetic.
    """
    m, b = i1 - i0, base.shape[0]
    rows = buf[:m]
    if isinstance(shift, Tensor):
        torch.add(base.unsqueeze(0), shift[i0:i1].unsqueeze(1), out=rows)
    else:
        rows.copy_(base.unsqueeze(0).expand_as(rows))
        idx = torch.arange(m, device=base.device)
        rows[idx, :, i0 + idx] += shift
    return rows.reshape(m * b, *base.shape[1:])


@torch.no_grad()
def class_attribution(model: nn.Module, ref: LayerRef, x: Tensor, config: AttributionConfig,
                      plan: AttributionPlan | None = None) -> tuple[Tensor, str]:
    """``A[i, k]`` for one batch of same-class inputs ``x`` (already normalised).

    Args:
        model: the classifier (eval mode).
        ref: the analysis layer.
        x: inputs of one class.
        config: attribution settings.
        plan: from :func:`plan_attribution` (made here from ``x`` when not given).

    Shape:
        x: ``(b, C, H, W)``; returns ``(n, K)``.
    """
    plan = plan or plan_attribution(model, ref, x, config)
    fold = plan.fold
    if fold:
        if fold.reaches_output:
            return fold.response.abs().to(torch.float32), "affine"
        point = fold.point
        base, logits = _activations_batched(model, point, x, config.forward_batch)
        base = base.contiguous()
        shift: Tensor | float = fold.response.to(base).contiguous()
        n = fold.response.shape[0]
    else:
        point = ref
        base, logits = _activations_batched(model, point, x, config.forward_batch)
        base = base.contiguous()
        shift, n = config.delta, base.shape[1]
    g, kind = make_head(model, point, x, base, logits, plan.tail)
    b = base.shape[0]
    per = min(n, max(1, config.chunk_size // b))
    out = torch.empty(n, logits.shape[1], device=base.device)
    buf = torch.empty(per, *base.shape, dtype=base.dtype, device=base.device)
    if kind == "chain" and plan.relu_offset is not None and isinstance(shift, Tensor):
        # relu(b + r) = max(b, -r) + r, and the affine rest f takes the "+ r" as f(r) - f(0).
        rest = plan.tail[1:]
        neg = shift.neg()
        corr = plan.relu_offset.to(logits)
        for i0 in range(0, n, per):
            i1 = min(n, i0 + per)
            rows = torch.maximum(base.unsqueeze(0), neg[i0:i1].unsqueeze(1), out=buf[:i1 - i0])
            moved = run_tail(model, rest, rows.reshape(-1, *base.shape[1:])).reshape(i1 - i0, b, -1)
            out[i0:i1] = (moved + corr[i0:i1].unsqueeze(1) - logits.unsqueeze(0)).abs().mean(1)
        return out, "folded-chain-relu"
    for i0 in range(0, n, per):
        i1 = min(n, i0 + per)
        moved = g(_shifted_rows(base, shift, i0, i1, buf)).reshape(i1 - i0, b, -1)
        out[i0:i1] = (moved - logits.unsqueeze(0)).abs().mean(1)
    return out, ("folded-" + kind) if fold else kind


@torch.no_grad()
def naive_class_attribution(model: nn.Module, ref: LayerRef, x: Tensor, delta: float = 1.0,
                            batch_size: int = 64) -> Tensor:
    """The study's procedure: for each batch and each neuron, one forward pass of ``g``.

    ``g`` is the chain of modules after the layer when there is one (the study's split
    model), else a stub pass of the whole network. Used as the reference in tests and
    benchmarks; slow by design.
    """
    total = None
    tail = trace_downstream(model, ref, x[:4]).tail(0)
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        h, logits = activations(model, ref, xb)
        g, _ = make_head(model, ref, xb, h, logits, tail)
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
    with eval_mode(model), cpu_channels_last(model):
        probe = [class_inputs[c][:4] for c in classes if len(class_inputs[c])]
        plan = plan_attribution(model, ref, torch.cat(probe)[:4], config) if probe else AttributionPlan()
        for c in tqdm(classes, desc="causal attribution", disable=not progress, leave=False, unit="class"):
            x = class_inputs[c][:config.num_samples]
            if len(x) == 0:
                from ..errors import UserInputError
                raise UserInputError(f"class {c} has no clean samples to analyse")
            acc = None
            for s in range(0, len(x), config.chunk_size):
                a, kind = class_attribution(model, ref, x[s:s + config.chunk_size], config, plan)
                kinds.add(kind)
                w = min(len(x), s + config.chunk_size) - s
                acc = a * w if acc is None else acc + a * w
            mats.append((acc / len(x)).cpu())
            counts.append(len(x))
    method = "affine" if kinds == {"affine"} else "batched-" + "+".join(sorted(kinds))
    return NeuronEffects(str(ref), torch.stack(mats), classes, tuple(counts), method, config,
                         time.perf_counter() - start, plan.fold.describe() if plan.fold else "")
