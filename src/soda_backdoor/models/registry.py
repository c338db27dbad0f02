"""Model registry and the one factory, in the style of timm's ``register_model``.

What we know about an architecture lives in its :class:`ModelSpec`, never in branches
elsewhere in the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserInputError


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry of an architecture.

    Attributes:
        name: registry name (``cnn``, ``resnet18``, ...).
        builder: ``builder(num_classes=..., in_channels=..., input_size=...) -> nn.Module``.
        description: one line for ``--help`` and reports.
        study_ana_layers: the original study's ``--ana_layer`` numbers mapped to our layer names.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str = ""
    study_ana_layers: tuple[tuple[int, str], ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, description: str = "", aliases: tuple[str, ...] = (),
                   study_ana_layers: dict[int, str] | None = None) -> Callable:
    """Decorator: register ``builder`` under ``name`` (and case-insensitive aliases)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, builder, description, tuple(sorted((study_ana_layers or {}).items())))
        for alias in (name, *aliases):
            _ALIASES[alias.lower()] = name
        return builder

    return wrap


def get_model_spec(name: str) -> ModelSpec:
    """Look up a registered architecture by name (case-insensitive)."""
    _ensure_loaded()
    key = _ALIASES.get(name.lower())
    if key is None:
        raise UserInputError(f"unknown architecture {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[key]


def list_models() -> list[str]:
    """Names of every registered architecture."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_channels: int, input_size: int = 32) -> nn.Module:
    """Build an architecture by name.

    Args:
        name: a registered name (see :func:`list_models`).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: side of the square input (used by heads whose size depends on it).
    """
    spec = get_model_spec(name)
    return spec.builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def _ensure_loaded() -> None:
    # Import the modules that register architectures (kept lazy to avoid import cycles).
    from . import cnn, lenet, zoo  # noqa: F401
