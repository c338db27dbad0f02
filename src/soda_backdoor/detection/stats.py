"""Pure statistics of the detector: Pearson correlation and the MAD outlier test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAD_SCALE = 1.4826
EPS = 1e-12


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (0 when either is constant)."""
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > EPS else 0.0


@dataclass(frozen=True)
class OutlierTest:
    """Result of the MAD outlier test on a score vector.

    Attributes:
        scores: the raw scores.
        normalized: scores divided by their maximum.
        median: median of the normalised scores.
        mad: ``MAD_SCALE * median(|s - median|)``.
        anomaly_index: ``(s - median) / mad`` per entry.
        threshold: the tau the test used.
        flagged: indices with ``s > median`` and anomaly index above tau, most anomalous first.
    """

    scores: tuple[float, ...]
    normalized: tuple[float, ...]
    median: float
    mad: float
    anomaly_index: tuple[float, ...]
    threshold: float
    flagged: tuple[int, ...]


def mad_outliers(scores: Tensor, threshold: float, exclude: tuple[int, ...] = ()) -> OutlierTest:
    """Flag upper outliers of ``scores`` with the median-absolute-deviation test (docs/method.md §2.2).

    Entries in ``exclude`` take no part in the median and MAD and are never flagged (the
    target itself when testing sources).
    """
    s = scores.double().flatten()
    keep = torch.ones(len(s), dtype=torch.bool)
    for i in exclude:
        keep[i] = False
    top = s[keep].abs().max() if keep.any() else torch.tensor(0.0, dtype=torch.double)
    norm = s / top if top > EPS else torch.zeros_like(s)
    ref = norm[keep]
    med = ref.median() if len(ref) else torch.tensor(0.0, dtype=torch.double)
    mad = MAD_SCALE * (ref - med).abs().median() if len(ref) else torch.tensor(0.0, dtype=torch.double)
    mad_f = float(mad)
    index = (norm - med) / mad if mad_f > EPS else torch.where(norm > med, torch.full_like(norm, float("inf")),
                                                                 torch.zeros_like(norm))
    flagged = [i for i in range(len(s)) if keep[i] and norm[i] > med and index[i] > threshold]
    flagged.sort(key=lambda i: -float(index[i]))
    return OutlierTest(tuple(float(v) for v in s), tuple(float(v) for v in norm), float(med), mad_f,
                       tuple(float(v) for v in index), float(threshold), tuple(flagged))
