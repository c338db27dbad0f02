"""Variation evidence: how far a model's classes give way under natural variations.

A backdoor keyed on a natural property of a subgroup (darker, larger, narrower, smoother
objects) usually generalises along that property: varied copies of *ordinary* source samples
(the repair's family, :func:`~soda_backdoor.data.augment.natural_variation`) reach the target
in large numbers, while a clean model sends few of them anywhere. For every ordered pair

    rate[s, t] = fraction of the varied copies of class s's anchored samples given to t,

where a sample is anchored when the model gives its own class softmax >= ``anchor`` (a
variation of a sample the model already half-confuses says nothing), the evidence is the
excess over the largest rate of that pair among clean reference models,

    V[s, t] = rate[s, t] - max_ref rate[s, t].

The detection flags the target of the largest ``V`` when it reaches ``tau``, beside the
confident-error verdict (:mod:`.errors`); the source is the errors' strongest source into
that target where the errors flag it too, else the largest ``V`` into it
(:func:`.errors.variation_source`). On by default (``ErrorConfig.variation_tau``, chosen on the dev zoo and measured
on the others in docs/detection.md, "The variation evidence"), with its limit: the family and
the zoos' synthetic attacks move the same properties, so an attack outside the family only
has the errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data.augment import natural_variation
from ..errors import UserInputError
from .errors import FormatFile
from ..utils import inference_view, run_batched

FORMAT = "soda-variation-reference/1"
SHIPPED = "variation_reference.json"


@dataclass(frozen=True)
class VariationReference(FormatFile):
    """The largest variation rate of every pair among clean reference models of a dataset."""

    FORMAT: ClassVar[str] = FORMAT
    KIND: ClassVar[str] = "variation reference"

    dataset: str
    copies: int
    anchor: float
    rate_max: tuple[tuple[float, ...], ...]
    num_models: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "variation reference") -> "VariationReference":
        cls.check_format(d, where)
        try:
            ref = cls(d["dataset"], int(d["copies"]), float(d["anchor"]), tuple(map(tuple, d["rate_max"])),
                      int(d["num_models"]), d.get("provenance", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{where} is malformed: {exc}") from None
        k = len(ref.rate_max)
        if k < 2 or any(len(row) != k for row in ref.rate_max):
            raise UserInputError(f"{where} is malformed: rate_max must be a square matrix")
        return ref


@lru_cache(maxsize=1)
def shipped_variation_reference() -> VariationReference:
    """The variation reference that ships with the package (Fashion-MNIST; docs/detection.md)."""
    text = resources.files("soda_backdoor.detection").joinpath(SHIPPED).read_text()
    return VariationReference.from_dict(json.loads(text), f"the shipped {SHIPPED}")


def variation_rates(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, copies: int, anchor: float,
                    normalize: Callable[[Tensor], Tensor], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``rate[s, t]`` (module docstring) and the number of anchored samples per class.

    Shape:
        x: ``(N, C, H, W)`` pixels in [0, 1] (or uint8); y: ``(N,)``; returns ``(k, k)`` and ``(k,)``.
    """
    if x.dtype == torch.uint8:
        x = x.float() / 255
    y = y.to(x.device)
    rate, anchored = torch.zeros(num_classes, num_classes), torch.zeros(num_classes, dtype=torch.long)
    with inference_view(model) as fast, torch.inference_mode():
        def predict(v: Tensor) -> Tensor:
            return run_batched(lambda u: fast(normalize(u)).float().softmax(1), v)

        for s in range(num_classes):
            xs = x[y == s]
            if len(xs) == 0:
                continue
            xs = xs[predict(xs)[:, s] >= anchor]
            anchored[s] = len(xs)
            if len(xs) == 0:
                continue
            varied = torch.cat([natural_variation(xs, gen) for _ in range(copies)])
            pred = predict(varied).argmax(1).cpu()
            rate[s] = torch.bincount(pred, minlength=num_classes).float() / len(varied)
    return rate, anchored


def variation_excess(rate: Tensor, reference: VariationReference) -> np.ndarray:
    """``V[s, t] = rate[s, t] - max_ref rate[s, t]``, with the diagonal at ``-inf``."""
    ref = np.asarray(reference.rate_max, dtype=float)
    if ref.shape != tuple(rate.shape):
        raise UserInputError(f"the variation reference has {len(ref)} classes; the model has {rate.shape[0]}")
    v = rate.numpy().astype(float) - ref
    np.fill_diagonal(v, -np.inf)
    return v


def build_variation_reference(rates: list[Tensor], dataset: str, copies: int, anchor: float,
                              provenance: dict[str, Any] | None = None) -> VariationReference:
    """The largest rate of every pair over clean reference models (every architecture together).

    Args:
        rates: each clean model's ``(k, k)`` rates from :func:`variation_rates` with ``copies``
            and ``anchor``.
        dataset: the dataset the rates are on.
        provenance: recorded as is.
    """
    if not rates:
        raise UserInputError("a variation reference needs at least one clean model")
    rate_max = torch.stack([r.float().cpu() for r in rates]).amax(0)
    return VariationReference(dataset, int(copies), float(anchor),
                              tuple(tuple(round(float(v), 6) for v in row) for row in rate_max), len(rates),
                              provenance or {})
