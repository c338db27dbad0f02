"""What follows the analysis layer: the affine chain to fold, and the module chain to replay.

The intervention ``do(h_i := h_i + delta)`` adds the same constant to every position of
neuron (channel) i. Through an affine map ``A`` (convolution, linear layer, batch norm in
eval mode, average pooling, flattening) that shift becomes ``A(h + delta e_i) = A(h) + R_i``
with a response ``R_i`` that does not depend on the input. Max pooling passes a shift that
is still constant over each channel unchanged. So when the analysis layer is followed by a
chain of such modules, ``R_i`` is computed once per neuron, and for every sample only the
rest of the network after the chain runs on ``A(h) + R_i``: the same numbers as the
study's procedure, with the chain's arithmetic done once instead of once per (neuron,
sample) pair.

The chain is found by module types over one recorded forward pass, never by architecture
name, and verified numerically before use: perturbing the layer while pinning the end of
the chain must leave the logits unchanged (no other path from the layer to the output),
and ``A(h + delta e_i) = A(h) + R_i`` must hold on probe samples. Anything else falls back
to the general path.

When the modules after the layer form a plain chain up to the model's output (each one the
only consumer of the previous one's output, as in ``nn.Sequential`` heads), the rest of the
network can also run by calling those modules directly, instead of a whole forward pass on
a stub input; :func:`run_tail` does that, and the caller verifies it against the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .hooks import LayerRef, intervene

logger = logging.getLogger(__name__)

# Modules whose output is an affine function of their input (in eval mode).
AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
                nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Affine modules that map a shift constant over each channel to a shift constant over each channel.
CHANNEL_CONSTANT_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity, nn.Dropout,
                          nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Not affine, but max(h + c) = max(h) + c when c is constant over each pooling window.
SHIFT_EQUIVARIANT_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                           nn.AdaptiveMaxPool3d)
TRAIN_MODE_DEPENDENT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d)


@dataclass(frozen=True)
class Downstream:
    """The modules after the analysis layer, as seen in one recorded forward pass.

    Attributes:
        chain: modules that carry the activation one after the other, each the only consumer
            of the previous output (names, in forward order). Empty when the activation
            branches or goes through a functional operation first.
        num_affine: how many of the first modules in ``chain`` fold exactly.
        reaches_output: the chain's last module produces the model's output.
    """

    chain: tuple[str, ...]
    num_affine: int
    reaches_output: bool

    def tail(self, start: int) -> tuple[str, ...] | None:
        """The modules that compute the logits from the output of ``chain[start - 1]``, if any."""
        return self.chain[start:] if self.reaches_output else None


@dataclass(frozen=True)
class Fold:
    """The affine chain after the analysis layer, folded into one response per neuron.

    Attributes:
        modules: names of the folded modules, in forward order.
        point: the end of the chain (output of the last folded module), where the rest of
            the network takes over.
        response: ``R``: the change at ``point`` caused by adding ``delta`` to each neuron.
        reaches_output: the chain ends at the logits, so ``|R_i|`` is the attribution itself.

    Shape:
        response: ``(n, *activation shape at point without the batch axis)``.
    """

    modules: tuple[str, ...]
    point: LayerRef
    response: Tensor
    reaches_output: bool

    def describe(self) -> str:
        return " -> ".join(self.modules)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    output: object


def _record_calls_after(model: nn.Module, ref: LayerRef, x: Tensor) -> tuple[Tensor, list[_Call], object, dict]:
    """One forward pass recording the leaf-module calls that follow ``ref``, in order.

    Returns the tensor at ``ref``, the calls made after it, the model's output and the number
    of calls per module name (over the whole pass). The tensors are kept alive, so ``is``
    comparisons between calls are meaningful.
    """
    calls: list[_Call] = []
    counts: dict[str, int] = {}
    at_ref: list[Tensor] = []
    handles = []

    def mark(t: Tensor) -> None:
        at_ref.append(t)
        calls.clear()  # only what runs after the layer matters

    try:
        for name, module in model.named_modules():
            if name and next(module.children(), None) is None:
                def hook(m: nn.Module, args: tuple, out: object, _name: str = name) -> None:
                    counts[_name] = counts.get(_name, 0) + 1
                    calls.append(_Call(_name, m, tuple(a for a in args if isinstance(a, Tensor)), out))
                handles.append(module.register_forward_hook(hook))
        with intervene(model, ref, mark):
            output = model(x)
    finally:
        for h in handles:
            h.remove()
    if len(at_ref) != 1:
        raise RuntimeError(f"layer {ref} was used {len(at_ref)} times in one forward pass")
    return at_ref[0], calls, output, counts


def _num_affine(chain: Sequence[_Call]) -> int:
    """How many of the first modules of ``chain`` map the channel-constant shift exactly."""
    constant = True
    for k, call in enumerate(chain):
        m = call.module
        if isinstance(m, TRAIN_MODE_DEPENDENT) and m.training:
            return k
        if isinstance(m, AFFINE_TYPES):
            constant = constant and isinstance(m, CHANNEL_CONSTANT_TYPES)
        elif not (constant and isinstance(m, SHIFT_EQUIVARIANT_TYPES)):
            return k
    return len(chain)


@torch.no_grad()
def trace_downstream(model: nn.Module, ref: LayerRef, x: Tensor) -> Downstream:
    """Follow the activation at ``ref`` through the modules that consume it (see :class:`Downstream`)."""
    cur, calls, output, counts = _record_calls_after(model, ref, x)
    chain: list[_Call] = []
    for i, call in enumerate(calls):
        if not any(t is cur for t in call.inputs):
            continue  # another branch of the network
        in_place = call.output is cur
        if (len(call.inputs) != 1 or counts[call.name] != 1 or not isinstance(call.output, Tensor)
                or (not in_place and any(any(t is cur for t in c.inputs) for c in calls[i + 1:]))):
            break
        chain.append(call)
        cur = call.output
    return Downstream(tuple(c.name for c in chain), _num_affine(chain), bool(chain) and cur is output)


def run_tail(model: nn.Module, names: Sequence[str], t: Tensor) -> Tensor:
    """Call the modules ``names`` one after the other on ``t``."""
    for name in names:
        t = model.get_submodule(name)(t)
    return t


def _segment(model: nn.Module, ref: LayerRef, point: LayerRef, hh: Tensor, stub: Tensor) -> Tensor:
    """Run the model from ``ref`` (substituting ``hh``) up to ``point`` and return its activation."""
    out: list[Tensor] = []

    def grab(t: Tensor) -> None:
        out.append(t.detach().clone())
        raise _Stop

    try:
        with intervene(model, ref, lambda _t: hh), intervene(model, point, grab):
            model(stub)
    except _Stop:
        pass
    if not out:
        raise RuntimeError(f"the forward pass did not reach {point}")
    return out[0]


@torch.no_grad()
def find_fold(model: nn.Module, ref: LayerRef, x: Tensor, delta: float = 1.0, chunk_size: int = 1024,
              downstream: Downstream | None = None, rtol: float = 1e-4, atol: float = 1e-5) -> Fold | None:
    """Find and verify the affine chain after ``ref``; ``None`` when there is nothing to fold.

    Args:
        model: the classifier, in eval mode.
        ref: the analysis layer.
        x: a few inputs (the first 4 are used) to record the forward pass and verify the fold.
        delta: the intervention size.
        chunk_size: neurons per pass when computing the responses.
        downstream: the result of :func:`trace_downstream`, if already known.
        rtol: relative tolerance of the verification.
        atol: absolute tolerance of the verification, relative to the activations' scale.
    """
    probe = x[:4]
    downstream = downstream or trace_downstream(model, ref, probe)
    names = downstream.chain[:downstream.num_affine]
    if not names:
        return None
    reaches = downstream.reaches_output and len(names) == len(downstream.chain)
    point = LayerRef(names[-1], "output")
    h_store: list[Tensor] = []
    p_store: list[Tensor] = []
    with intervene(model, ref, lambda t: h_store.append(t.detach().clone())), \
            intervene(model, point, lambda t: p_store.append(t.detach().clone())):
        logits = model(probe)
    h, base = h_store[0], p_store[0]
    stub = probe[:1]

    # 1. The layer reaches the output only through the chain: perturb it, pin the chain's end.
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)).to(h) * (h.abs().mean() + 1.0)
    with intervene(model, ref, lambda t: t + noise), intervene(model, point, lambda _t: base.clone()):
        pinned = model(probe)
    if not torch.allclose(pinned, logits, rtol=rtol, atol=atol * (1.0 + float(logits.abs().max()))):
        logger.info("no fold at %s: the output depends on the layer other than through %s", ref, point)
        return None

    # 2. Responses R_i from the first probe sample, then check additivity on the others.
    n = h.shape[1]
    h0 = h[:1]
    ref_out = _segment(model, ref, point, h0.clone(), stub)
    parts = []
    for i0 in range(0, n, chunk_size):
        idx = torch.arange(i0, min(n, i0 + chunk_size), device=h.device)
        hh = h0.repeat(len(idx), *([1] * (h.dim() - 1)))
        hh[torch.arange(len(idx), device=h.device), idx] += delta
        parts.append(_segment(model, ref, point, hh, stub) - ref_out)
    response = torch.cat(parts)
    scale = atol * (1.0 + float(base.abs().max()))
    for j in range(1, len(h)):
        hh = h[j:j + 1].repeat(n, *([1] * (h.dim() - 1)))
        hh[torch.arange(n, device=h.device), torch.arange(n, device=h.device)] += delta
        moved = _segment(model, ref, point, hh, stub)
        if not torch.allclose(moved, base[j:j + 1] + response, rtol=rtol, atol=scale):
            logger.info("no fold at %s: the chain %s is not additive on probe samples", ref, names)
            return None
    return Fold(tuple(names), point, response, reaches)
