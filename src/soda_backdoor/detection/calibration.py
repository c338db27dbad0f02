"""Calibrated probabilities from a detector's scores (Platt scaling on a scored zoo).

The detector gives each class an anomaly index and the model the largest of them (the
model-level score). A :class:`Calibration` maps them to probabilities, as TrojAI scores
detectors: ``P(backdoor)`` from the model-level score and, per class, ``P(class k is the
target)`` from its anomaly index. Both maps are logistic (Platt scaling, Platt 1999),
fitted on the models of a zoo whose labels are known (docs/zoo.md), per architecture where
the zoo has enough models of it, and pooled over the zoo otherwise. A map reads the score
through ``transform``: ``log`` (the default for new fits), ``sign(s) log(1 + |s|)``, or
``identity``. The evidence has a heavy tail (a dev backdoor scores 2.2, another 180): on the
raw score one logistic slope cannot be steep near the threshold and right in the tail, so the
fit flattens and every score gets a middling probability (docs/detection.md, "Realistic
poisoning on dev, and a calibration on a log scale").

Two things keep a handful of models from giving probabilities of 0 or 1: Platt's targets
(``(N+ + 1) / (N+ + 2)`` for the positives, ``1 / (N- + 2)`` for the negatives, instead of
1 and 0) and an L2 penalty on the slope (scikit-learn's ``C``). A fitted slope below 0 (the
score ranks the fitting zoo backwards) is set to 0: the map then gives the base rate, and
never reverses the detector's evidence.

The package ships one calibration (``calibration.json``, :func:`shipped_calibration`): the
default detector's scores on the dev zoos (``zoo/dev.toml`` and ``zoo/lowratio_dev.toml``,
``cnn`` and ``lenet`` on Fashion-MNIST), so a detection with the default settings reports
probabilities without a calibration of the user's own (docs/detection.md, "Calibrated
probability").

Example:
    >>> cal = fit_calibration(score.rows, "soda")       # the rows of a scored zoo
    >>> cal.probability(4.2, "cnn")                     # P(backdoor) at model-level score 4.2
    >>> cal.apply(anomaly_index, "lenet", "cifar10").message
    'no calibration for arch lenet on dataset cifar10 (have: cnn, lenet on fmnist); ...'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from ..errors import UserInputError
from ..models import get_model_spec

FORMAT = "soda-calibration/1"
SHIPPED = "calibration.json"
MIN_CLEAN = 4
MIN_BACKDOORED = 4
DEFAULT_C = 1.0
SCORE_CAP = 1e3  # an infinite anomaly index (zero MAD) counts as this
TRANSFORMS = ("log", "identity")
DEFAULT_TRANSFORM = "log"  # chosen on the dev zoos (docs/detection.md, "... a calibration on a log scale")


def _finite(score: float) -> float:
    """NaN as 0 (as the zoo scores it), infinities capped at ``SCORE_CAP``."""
    if score != score:
        return 0.0
    return max(-SCORE_CAP, min(SCORE_CAP, float(score)))


def transformed(score: float, transform: str) -> float:
    """``score`` (made finite) as a map of ``transform`` reads it: ``log`` is ``sign(s) log(1 + |s|)``."""
    check_transform(transform)
    s = _finite(score)
    return math.copysign(math.log1p(abs(s)), s) if transform == "log" else s


def check_transform(transform: str) -> None:
    """A :class:`UserInputError` unless ``transform`` is one of ``TRANSFORMS``."""
    if transform not in TRANSFORMS:
        raise UserInputError(f"unknown calibration transform {transform!r}; valid: {', '.join(TRANSFORMS)}")


def canonical_arch(arch: str) -> str:
    """The registry name of ``arch`` (an alias resolved); an unregistered name as it is."""
    try:
        return get_model_spec(arch).name
    except UserInputError:
        return arch


def model_score(anomaly_index: Sequence[float]) -> float:
    """The model-level score: the largest anomaly index of any class (NaN counts as 0)."""
    return max((a if a == a else 0.0) for a in anomaly_index)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class PlattMap:
    """``p = 1 / (1 + exp(-(slope * f(score) + intercept)))``, ``f`` the ``transform``.

    Attributes:
        slope: weight of the score (at least 0).
        intercept: the log-odds at score 0.
        num_positive: positives it was fitted on (backdoored models, or target classes).
        num_negative: negatives it was fitted on.
        clamped: the fitted slope was negative and was set to 0 (the map gives the base rate).
        transform: how the map reads the score (:func:`transformed`); ``identity`` in a file
            written before the transform existed.
    """

    slope: float
    intercept: float
    num_positive: int
    num_negative: int
    clamped: bool = False
    transform: str = "identity"

    def probability(self, score: float) -> float:
        """The probability at ``score``, in (0, 1) for any finite slope and score."""
        return _sigmoid(self.slope * transformed(score, self.transform) + self.intercept)


def fit_platt(scores: Sequence[float], labels: Sequence[int], c: float = DEFAULT_C,
              transform: str = DEFAULT_TRANSFORM) -> PlattMap:
    """Platt scaling: a logistic regression of the labels on the scores (read through ``transform``).

    The labels are replaced by Platt's targets, as sample weights on a positive and a negative
    copy of each score, and the slope has an L2 penalty of inverse strength ``c``.

    Args:
        scores: one score per example.
        labels: 1 (positive) or 0, one per example; both must occur.
        c: inverse regularisation strength (scikit-learn's ``C``).
        transform: ``log`` or ``identity`` (:func:`transformed`).
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.array([transformed(s, transform) for s in scores], dtype=float)
    y = np.array(labels, dtype=int)
    num_pos, num_neg = int(y.sum()), int(len(y) - y.sum())
    if not num_pos or not num_neg:
        raise ValueError(f"Platt scaling needs positives and negatives, got {num_pos} and {num_neg}")
    target = np.where(y == 1, (num_pos + 1) / (num_pos + 2), 1 / (num_neg + 2))
    fit = LogisticRegression(C=c).fit(np.concatenate([x, x])[:, None], np.r_[np.ones(len(x)), np.zeros(len(x))],
                                      sample_weight=np.concatenate([target, 1 - target]))
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope >= 0:
        return PlattMap(slope, intercept, num_pos, num_neg, transform=transform)
    base = float(target.mean())  # the intercept-only fit: the mean of the targets
    return PlattMap(0.0, math.log(base / (1 - base)), num_pos, num_neg, clamped=True, transform=transform)


@dataclass(frozen=True)
class ArchCalibration:
    """The maps one architecture uses, and what they were fitted on.

    Attributes:
        arch: the architecture.
        model: model-level score -> P(backdoor).
        target: a class's anomaly index -> P(the class is a backdoor target).
        num_clean: clean models of this arch in the zoo.
        num_backdoored: backdoored models of this arch in the zoo.
        pooled: too few models of this arch for its own fit: the maps are the fit over every arch.
    """

    arch: str
    model: PlattMap
    target: PlattMap
    num_clean: int
    num_backdoored: int
    pooled: bool


@dataclass(frozen=True)
class CalibratedScore:
    """A detection's probabilities, or why there are none.

    Attributes:
        probability: P(backdoor) (``None``: the calibration does not cover the model).
        class_probabilities: P(class k is a backdoor target), one per class (empty: not covered).
        message: why there is no probability (empty when there is one).
        fitted_on: what the calibration was fitted on, in words.
    """

    probability: float | None
    class_probabilities: tuple[float, ...]
    message: str
    fitted_on: str


@dataclass(frozen=True)
class Calibration:
    """Probabilities from a detector's scores, fitted on a zoo, with what it was fitted on.

    Attributes:
        detector: the detector whose scores it maps (``soda``, ``nc``).
        dataset: the dataset of the zoo's models.
        archs: the maps per architecture of the zoo.
        num_clean: clean models it was fitted on (excluded models left out).
        num_backdoored: backdoored models it was fitted on.
        c: inverse L2 strength of the logistic regressions.
        min_clean: clean models an arch needs for its own fit.
        min_backdoored: backdoored models an arch needs for its own fit.
        zoo: the zoo folder.
        zoo_spec: the zoo's spec (name, path and a hash of its model keys).
        detector_settings: hash of the detector settings (the name of the zoo's score cache).
        settings: the detector settings themselves (``layer`` and ``detector_config``).
        torch: torch version of the fit.
        commit: source commit of the fit (empty when unknown).
        notes: what the record should say in words (pooled fits, clamped slopes).
        shipped: the calibration that ships with the package (:func:`shipped_calibration`); a
            detection whose settings it was not fitted on reports no probability instead of a
            warning. Not written to the file.
    """

    detector: str
    dataset: str
    archs: tuple[ArchCalibration, ...]
    num_clean: int
    num_backdoored: int
    c: float = DEFAULT_C
    min_clean: int = MIN_CLEAN
    min_backdoored: int = MIN_BACKDOORED
    zoo: str = ""
    zoo_spec: dict[str, str] = field(default_factory=dict)
    detector_settings: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    torch: str = ""
    commit: str = ""
    notes: tuple[str, ...] = ()
    shipped: bool = field(default=False, compare=False)

    @property
    def covers(self) -> str:
        """``"cnn, lenet on fmnist"``."""
        return f"{', '.join(a.arch for a in self.archs)} on {self.dataset}"

    def for_arch(self, arch: str, dataset: str) -> ArchCalibration:
        """The maps for models of ``arch`` on ``dataset``; a :class:`UserInputError` if not covered."""
        arch = canonical_arch(arch)
        found = [a for a in self.archs if a.arch == arch]
        if dataset != self.dataset or not found:
            raise UserInputError(f"no calibration for arch {arch} on dataset {dataset} (have: {self.covers}); "
                                 "the verdict comes from the uncalibrated threshold (--tau-target)")
        return found[0]

    def probability(self, score: float, arch: str, dataset: str | None = None) -> float:
        """P(backdoor) of a model of ``arch`` with model-level ``score``."""
        return self.for_arch(arch, dataset or self.dataset).model.probability(score)

    def class_probabilities(self, class_scores: Sequence[float], arch: str,
                            dataset: str | None = None) -> tuple[float, ...]:
        """P(class k is a backdoor target) from each class's anomaly index."""
        target = self.for_arch(arch, dataset or self.dataset).target
        return tuple(target.probability(s) for s in class_scores)

    def apply(self, anomaly_index: Sequence[float], arch: str, dataset: str) -> CalibratedScore:
        """Both probabilities of one detection, or the message saying why there are none."""
        try:
            fit = self.for_arch(arch, dataset)
        except UserInputError as exc:
            return CalibratedScore(None, (), str(exc), self.describe())
        return CalibratedScore(fit.model.probability(model_score(anomaly_index)),
                               tuple(fit.target.probability(s) for s in anomaly_index), "", self.describe())

    def describe(self) -> str:
        """One line: detector, models and zoo."""
        where = self.zoo_spec.get("name") or self.zoo or "a zoo"
        return (f"{self.detector} scores of {self.num_clean} clean / {self.num_backdoored} backdoored models "
                f"({self.covers}) of zoo {where}{', shipped with soda-backdoor' if self.shipped else ''}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["shipped"]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """The inverse of :meth:`to_dict`; a :class:`UserInputError` for anything else."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserInputError(f"not a calibration (its 'format' is not {FORMAT!r}); "
                                 "write one with `soda zoo calibrate`")
        try:
            archs = tuple(ArchCalibration(**{**a, "model": PlattMap(**a["model"]), "target": PlattMap(**a["target"])})
                          for a in d["archs"])
            kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("archs", "shipped")}
            return cls(archs=archs, **{**kwargs, "notes": tuple(kwargs.get("notes", ()))})
        except (KeyError, TypeError) as exc:
            raise UserInputError(f"a malformed calibration ({type(exc).__name__}: {exc})") from exc


def _labels(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[int], list[float], list[int]]:
    """(model scores, model labels, class scores, class labels) of the clean and backdoored rows."""
    ms, ml, cs, cl = [], [], [], []
    for r in rows:
        bad = r["role"] == "backdoored"
        ms.append(r["score"])
        ml.append(int(bad))
        cs += list(r["class_scores"])
        cl += [int(bad and k == r["target"]) for k in range(len(r["class_scores"]))]
    return ms, ml, cs, cl


def _fit_maps(rows: Sequence[dict[str, Any]], c: float, transform: str) -> tuple[PlattMap, PlattMap]:
    ms, ml, cs, cl = _labels(rows)
    return fit_platt(ms, ml, c, transform), fit_platt(cs, cl, c, transform)


def fit_calibration(rows: Sequence[dict[str, Any]], detector: str, c: float = DEFAULT_C,
                    min_clean: int = MIN_CLEAN, min_backdoored: int = MIN_BACKDOORED, pooled: bool = False,
                    transform: str = DEFAULT_TRANSFORM, **record: Any) -> Calibration:
    """Fit the maps on the rows of a scored zoo (``ZooScore.rows``).

    Each architecture with at least ``min_clean`` clean and ``min_backdoored`` backdoored
    models gets its own fit; the others use the fit over every model of the zoo, and the
    record says so. Excluded models (``role == "excluded"``) are left out.

    Args:
        rows: scored zoo rows: ``role``, ``arch``, ``dataset``, ``score``, ``class_scores``
            and, for backdoored models, the attack's ``target``.
        detector: the detector that scored them.
        c: inverse L2 strength (scikit-learn's ``C``).
        min_clean: clean models an arch needs for its own fit.
        min_backdoored: backdoored models an arch needs for its own fit.
        pooled: one fit for every arch.
        transform: how the maps read the scores: ``log`` (default) or ``identity`` (:func:`transformed`).
        **record: what else the calibration records (``zoo``, ``zoo_spec``,
            ``detector_settings``, ``settings``, ``torch``, ``commit``).

    Raises:
        UserInputError: the rows hold no clean or no backdoored model, or several datasets.
    """
    check_transform(transform)
    counted = [{**r, "arch": canonical_arch(r["arch"])} for r in rows if r["role"] in ("clean", "backdoored")]
    datasets = sorted({r["dataset"] for r in counted})
    n_clean = sum(r["role"] == "clean" for r in counted)
    n_bad = len(counted) - n_clean
    if not n_clean or not n_bad:
        raise UserInputError(f"a calibration needs clean and backdoored models; the zoo has {n_clean} clean and "
                             f"{n_bad} backdoored (excluded models left out)")
    if len(datasets) > 1:
        raise UserInputError(f"a calibration is for one dataset; the zoo has {', '.join(datasets)}")
    all_maps = _fit_maps(counted, c, transform)
    archs, notes = [], []
    for arch in sorted({r["arch"] for r in counted}):
        mine = [r for r in counted if r["arch"] == arch]
        nc = sum(r["role"] == "clean" for r in mine)
        nb = len(mine) - nc
        own = not pooled and nc >= min_clean and nb >= min_backdoored
        model, target = _fit_maps(mine, c, transform) if own else all_maps
        if not own:
            why = "--pooled" if pooled else f"fewer than {min_clean} clean or {min_backdoored} backdoored models"
            notes.append(f"{arch}: {nc} clean / {nb} backdoored models, pooled fit over all {len(counted)} ({why})")
        for name, m in (("model-level", model), ("per-class", target)):
            if m.clamped and own:
                notes.append(f"{arch}: the {name} score ranks the zoo backwards (fitted slope < 0); slope set to 0, "
                             "the map gives the base rate")
        archs.append(ArchCalibration(arch, model, target, nc, nb, not own))
    for name, m in (("model-level", all_maps[0]), ("per-class", all_maps[1])):
        if m.clamped and any(a.pooled for a in archs):
            notes.append(f"pooled fit: the {name} score ranks the zoo backwards (fitted slope < 0); slope set to 0, "
                         "the map gives the base rate")
    if "settings" in record:  # as JSON would give it back, so that a round trip compares equal
        record["settings"] = json.loads(json.dumps(record["settings"]))
    return Calibration(detector, datasets[0], tuple(archs), n_clean, n_bad, c, min_clean, min_backdoored,
                       notes=tuple(notes), **record)


@lru_cache(maxsize=1)
def shipped_calibration() -> Calibration:
    """The calibration that ships with the package: the default detector's scores of the dev
    zoos, ``cnn`` and ``lenet`` on Fashion-MNIST (docs/detection.md, "Calibrated probability")."""
    text = resources.files("soda_backdoor.detection").joinpath(SHIPPED).read_text()
    return replace(Calibration.from_dict(json.loads(text)), shipped=True)
