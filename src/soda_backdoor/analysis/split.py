"""Cut a network in two at a named module's output: ``model(x) == tail(prefix(x))``.

Used by the repair to fine-tune only the layers after a point (docs/repair.md): the frozen
prefix runs once per sample, and each training step runs the tail alone. The cut is made on
the ``torch.fx`` graph of the model, so it works for networks whose ``forward`` calls
functions (``F.relu``, residual additions), as long as nothing before the cut is used after
it (no skip connection crosses it). The two halves share the model's modules and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import UserInputError


class UntraceableModel(UserInputError):
    """``torch.fx`` cannot trace the model: no cut of it can be made."""


@dataclass(frozen=True)
class Split:
    """The two halves of a model cut after ``layer``."""

    layer: str
    prefix: fx.GraphModule
    tail: fx.GraphModule


def split_after(model: nn.Module, layer: str) -> Split:
    """Cut ``model`` after the module ``layer`` (its output is the tail's only input).

    Raises:
        UserInputError: the model cannot be traced, ``layer`` is not called exactly once in
            its forward pass, or a value from before the cut is used after it.
    """
    if layer not in dict(model.named_modules()):
        raise UserInputError(f"cannot cut at {layer!r}: the model has no module of that name (see `soda layers`)")

    class _Tracer(fx.Tracer):  # keeps ``layer`` whole, so its output is one node
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == layer or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on untraceable code
        raise UntraceableModel(f"cannot cut {type(model).__name__}: torch.fx cannot trace it "
                             f"({type(exc).__name__}: {exc})") from exc
    nodes = list(graph.nodes)
    cuts = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(cuts) != 1:
        raise UserInputError(f"cannot cut at {layer!r}: the forward pass calls it {len(cuts)} times (need 1)")
    i_cut = cuts[0]
    cut = nodes[i_cut]
    before = set(nodes[:i_cut + 1])
    for n in nodes[i_cut + 1:]:
        for a in n.all_input_nodes:
            if a in before and a is not cut and a.op != "get_attr":
                raise UserInputError(f"cannot cut at {layer!r}: {n.name} after the cut uses {a.name} from before "
                                     f"it (a skip connection crosses the cut)")
    prefix_g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:i_cut + 1]:
        env[n] = prefix_g.node_copy(n, lambda a: env[a])
    prefix_g.output(env[cut])
    tail_g = fx.Graph()
    env = {cut: tail_g.placeholder("h")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter or buffer fetched before the cut
            env[a] = tail_g.node_copy(a)
        return env[a]
    for n in nodes[i_cut + 1:]:
        if n.op == "placeholder":
            raise UserInputError(f"cannot cut at {layer!r}: the model takes more than one input")
        env[n] = tail_g.node_copy(n, arg)
    return Split(layer, fx.GraphModule(model, prefix_g), fx.GraphModule(model, tail_g))


def deepest_split(model: nn.Module, x: Tensor, min_tail_params: float = 0.5) -> Split:
    """The cut closest to the output whose tail still holds ``min_tail_params`` of the weights.

    Every module called once in a forward pass of ``x`` (one sample is enough) is a candidate,
    cut after its output; candidates are tried from the last to finish to the first, and the
    first one :func:`split_after` accepts and whose tail holds at least that fraction of the
    parameters wins. One rule for every architecture: on `cnn` it tunes the last conv block
    and the head, on `lenet` the MLP, on ResNet-18 ``layer4`` (docs/repair.md).

    Raises:
        UserInputError: no candidate qualifies.
    """
    names = {m: n for n, m in model.named_modules() if n}
    finished: list[str] = []
    handles = [m.register_forward_hook(lambda m, _i, _o: finished.append(names[m])) for m in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    own = {n: sum(p.numel() for p in model.get_submodule(n).parameters(recurse=False)) for n in set(finished)}
    total = sum(p.numel() for p in model.parameters())
    after = 0  # parameters of the modules that finish after position i
    counts = {n: finished.count(n) for n in set(finished)}
    errors = []
    for i in range(len(finished) - 1, -1, -1):
        name = finished[i]
        if counts[name] == 1 and total and after / total >= min_tail_params:
            try:
                return split_after(model, name)
            except UntraceableModel:
                raise
            except UserInputError as exc:
                errors.append(str(exc))
        after += own[name] if counts[name] == 1 else 0
    raise UserInputError(f"no cut of {type(model).__name__} leaves {min_tail_params:.0%} of its weights in the tail"
                         + (f" ({errors[-1]})" if errors else ""))
