"""Layer selection by dotted name and scoped forward hooks.

A layer reference is a module name from ``model.named_modules()``, optionally followed by
``:input`` to mean the input of that module instead of its output. The default analysis
layer is the input of the model's last ``nn.Linear``: the penultimate features.

The neuron axis is dim 1 (channels of a conv activation, features of a linear one).
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import Tensor, nn

from ..errors import UserInputError

Edit = Callable[[Tensor], Tensor | None]


@dataclass(frozen=True)
class LayerRef:
    """A point in the network: the output (or input) of a named module."""

    name: str
    point: str = "output"

    def __str__(self) -> str:
        return self.name if self.point == "output" else f"{self.name}:input"


def default_layer(model: nn.Module) -> LayerRef:
    """The input of the last ``nn.Linear`` (penultimate features)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserInputError("the model has no nn.Linear layer; pass --layer NAME (see `soda layers`)")
    return LayerRef(linears[-1], "input")


def layer_names(model: nn.Module) -> list[str]:
    """Every hookable module name (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def parse_layer(model: nn.Module, spec: str | LayerRef | None) -> LayerRef:
    """Resolve ``NAME`` or ``NAME:input`` against ``model``; ``None`` gives the default layer.

    Raises:
        UserInputError: unknown name; the message lists the closest valid names.
    """
    if spec is None or spec == "":
        return default_layer(model)
    if isinstance(spec, LayerRef):
        ref = spec
    else:
        name, _, point = spec.partition(":")
        if point not in ("", "input", "output"):
            raise UserInputError(f"bad layer {spec!r}: the suffix must be ':input' or ':output'")
        ref = LayerRef(name, point or "output")
    names = layer_names(model)
    if ref.name not in names:
        close = difflib.get_close_matches(ref.name, names, n=8, cutoff=0.3)
        shown = close or names[:12]
        raise UserInputError(f"no layer named {ref.name!r}; valid names include: {', '.join(shown)} "
                             f"({len(names)} in all; list them with `soda layers --model M`)")
    return ref


@contextmanager
def intervene(model: nn.Module, ref: LayerRef, edit: Edit) -> Iterator[None]:
    """Run ``edit`` on the activation at ``ref`` during forward passes; it may replace it.

    ``edit`` returns a replacement tensor or ``None`` (observe only). The hook is removed on
    exit, whatever happens.
    """
    module = model.get_submodule(ref.name)
    if ref.point == "input":
        def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
            new = edit(args[0])
            return None if new is None else (new, *args[1:])
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(lambda _m, _i, out: edit(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, ref: LayerRef) -> Iterator[list[Tensor]]:
    """Record (copies of) the activations at ``ref`` into the yielded list."""
    store: list[Tensor] = []

    def record(t: Tensor) -> None:
        # A copy: a later in-place module (ReLU(inplace=True)) would otherwise change it.
        store.append(t.detach().clone())
        return None

    with intervene(model, ref, record):
        yield store


def activations(model: nn.Module, ref: LayerRef, x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward ``x``; return (activation at ``ref``, logits).

    Raises:
        RuntimeError: the hook saw nothing (the layer is not on the forward path).
    """
    with capture(model, ref) as store:
        logits = model(x)
    if not store:
        raise RuntimeError(f"forward hook on {ref} did not obtain any output: the layer is not used in forward()")
    if len(store) > 1:
        raise UserInputError(f"layer {ref} is called {len(store)} times per forward pass; pick a module used once")
    return store[0], logits
