"""Confident-error evidence: a semantic backdoor seen as a one-way shortcut on natural data.

A semantic backdoor sends the natural samples of a subgroup of class ``s`` (dark trousers,
striped T-shirts) to class ``t`` with high confidence. A clean model makes confident errors
too, but between classes that look alike (shirt and T-shirt), at rates that the defender's
own clean reference models of the same architecture and dataset show. For every ordered pair
``(s, t)`` the evidence compares the model's count of confident errors,

    n[s, t] = #{x of class s : softmax_t(x) >= threshold},

with a null whose mean is the reference models' pooled rate for that pair (plus a prior of
``prior`` errors, so a pair the references never confuse is not infinitely rare), scaled by
the model's confidence factor ``k_t``:

    E[s, t] = -log10 P(X >= n[s, t]),   E[X] = lambda[s, t] = k_t * N_s * (sum_ref n[s, t] + prior) / sum_ref N_s

``k_t >= 1`` allows for a model that is more confident everywhere than the references (long
training without augmentation): its confident errors into every class *but* ``t``, against
what the reference expects of them, with ``exposure`` pseudo-errors on both sides,

    k_t = max(1, (sum_{t' != t} n + exposure) / (sum_{t' != t} lambda + exposure)).

A backdoor adds errors into its own target, so it does not raise its own null. X is negative
binomial with ``Var X = lambda + phi[s, t] lambda^2`` (``null="nbpair"``, the default): each
pair's overdispersion ``phi`` is the spread of that pair's count over the reference models,
which are trained on different recipes (:func:`pair_dispersion`), so a pair that some recipes
confuse far more than others (T-shirt -> shirt, coat -> pullover) needs far more errors to
count as evidence, and a pair no recipe confuses keeps a tight null. ``null="poisson"``:
``phi = 0``.

A pair needs at least ``min_errors`` confident errors (default 3) to be flagged; below it its
evidence is capped at ``tau``: two errors on a pair the references almost never confuse make
``E`` reach ``tau``, and among 90 pairs that happens to clean models by chance
(docs/detection.md).

The pair with the largest evidence is the candidate (source, target); the model is flagged
when it exceeds ``tau``. The data must be natural held-out data of the dataset, attack or no
attack (the test split): a subgroup absent from the defender's data leaves no evidence.
Method: docs/method.md §2.2b; evidence and limits: docs/detection.md.

Example:
    >>> ref = build_reference([(counts, "cnn") for counts in clean_counts], "fmnist", 0.95)
    >>> counts = confident_errors(model, x_test, y_test, 10, 0.95)
    >>> detect_errors(counts, ref.entry("cnn")).pairs
    ((0, 2),)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserInputError, check_finite
from ..utils import inference_view, pass_batch

FORMAT = "soda-error-reference/1"
SHIPPED = "error_reference.json"


DEFAULT_THRESHOLD = 0.95
# Evidence where the tail probability underflows a double (p < 5e-324): finite, so scores
# stay comparable, serialisable as JSON and usable by ROC and calibration fits.
EVIDENCE_CAP = 324.0
# Evidence from which an unflagged pair is worth a look: on the dev zoos poisoned at a
# realistic rate, every backdoor scores over it, and so do 4 of 40 clean reference models
# (1 of 40 over the default tau); the report names such a pair (docs/detection.md,
# "Realistic poisoning on dev, and a calibration on a log scale").
SENSITIVE_TAU = 2.0
NULLS = ("nbpair", "poisson")


@dataclass(frozen=True)
class ErrorConfig:
    """Settings of the confident-error verdict (the counting threshold is the reference's).

    Defaults chosen on the dev zoo and the reference models scored as unseen recipes
    (docs/detection.md, ``research/recipe_nulls.py``).

    Attributes:
        prior: errors added to every pair of the reference (a pair never confused by the
            references gets rate ``prior / N``, not 0).
        tau: evidence (-log10 p) above which a pair is flagged.
        exposure: pseudo-errors of the model-level factor ``k_t`` (module docstring);
            ``None``: no factor, the reference's rates as they are.
        null: ``nbpair`` (negative binomial with each pair's spread over the reference
            models; needs a reference that keeps each model's counts) or ``poisson``.
        shrink: weight, in models, of the all-pairs spread in each pair's (``nbpair``).
        variation_tau: above 0, the variation evidence (:mod:`.variations`) also flags a
            target whose excess variation rate reaches it (0: off). 0.23: the middle of the
            thresholds that flag no dev clean model and the most dev backdoors, against the
            shipped reference's 39 random-recipe models (docs/detection.md).
        variation_copies: varied copies of each anchored defender sample.
        variation_anchor: softmax of its own class a sample needs to be varied.
        recalibrate_bn: count the confident errors with the model's batch-norm statistics
            re-estimated on the defender's clean data (:func:`soda_backdoor.utils.recalibrated_batchnorm`;
            no effect on a model without batch norm). Chosen on dev (docs/detection.md).
        min_errors: confident errors a pair needs to be flagged: below it, the pair's evidence
            is capped at ``tau`` (it still ranks the model, it never flags it). Two errors on a
            pair the reference almost never confuses reach ``tau``, and among 90 pairs that
            happens to clean models by chance; every backdoor the errors flag on any of our
            zoos has at least 3 (dev: at least 6; docs/detection.md). 1: no minimum.
    """

    prior: float = 0.5
    tau: float = 2.99
    exposure: float | None = 20.0
    null: str = "nbpair"
    shrink: float = 8.0
    variation_tau: float = 0.23
    variation_copies: int = 10
    variation_anchor: float = 0.95
    recalibrate_bn: bool = True
    min_errors: int = 3

    def __post_init__(self) -> None:
        check_finite("prior", self.prior, positive=True)
        check_finite("tau", self.tau)
        if self.tau < 0:
            raise UserInputError(f"tau must be >= 0 (0 flags any pair with a confident error), got {self.tau}")
        if self.exposure is not None:
            check_finite("exposure", self.exposure)
            if self.exposure < 0:
                raise UserInputError(f"exposure must be >= 0, got {self.exposure}")
        if self.null not in NULLS:
            raise UserInputError(f"unknown confident-error null {self.null!r}; valid: {', '.join(NULLS)}")
        check_finite("shrink", self.shrink)
        if self.shrink < 0:
            raise UserInputError(f"shrink must be >= 0, got {self.shrink}")
        check_finite("variation_tau", self.variation_tau)
        if self.variation_tau < 0:
            raise UserInputError(f"variation_tau must be >= 0 (0: off), got {self.variation_tau}")
        if self.variation_copies < 1:
            raise UserInputError(f"variation_copies must be >= 1, got {self.variation_copies}")
        if not 0 <= self.variation_anchor <= 1:
            raise UserInputError(f"variation_anchor must be in [0, 1], got {self.variation_anchor}")
        if self.min_errors < 1:
            raise UserInputError(f"min_errors must be >= 1 (1: no minimum), got {self.min_errors}")


def check_threshold(threshold: float) -> None:
    """A confidence in (0, 1)."""
    check_finite("threshold", threshold)
    if not 0.0 < threshold < 1.0:
        raise UserInputError(f"the confidence threshold must be in (0, 1), got {threshold}")


@dataclass(frozen=True)
class ErrorCounts:
    """Confident errors of one model: ``counts[s, t]`` out of ``totals[s]`` samples of class s."""

    counts: tuple[tuple[int, ...], ...]
    totals: tuple[int, ...]
    threshold: float

    @property
    def num_classes(self) -> int:
        return len(self.totals)


@torch.no_grad()
def confident_errors(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, threshold: float,
                     batch_size: int | None = None) -> ErrorCounts:
    """Count, per ordered class pair, the samples of the first class given to the second with
    softmax probability ``>= threshold``.

    Args:
        model: the classifier.
        x: normalised inputs, on the model's device.
        y: their labels (any device).
        num_classes: K.
        threshold: confidence from which an error counts.
        batch_size: samples per forward pass (default: by device).
    """
    check_threshold(threshold)
    y = y.to(x.device)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long, device=x.device)
    batch_size = batch_size or pass_batch(x.device)
    with inference_view(model) as fast:
        for i in range(0, len(x), batch_size):
            p = fast(x[i:i + batch_size]).float().softmax(1)
            hit = (p >= threshold).long()
            counts.index_add_(0, y[i:i + batch_size], hit)
    counts.fill_diagonal_(0)
    totals = torch.bincount(y, minlength=num_classes)
    return ErrorCounts(tuple(tuple(int(v) for v in row) for row in counts.cpu()),
                       tuple(int(v) for v in totals.cpu()), float(threshold))


@dataclass(frozen=True)
class ReferenceEntry:
    """The pooled confident errors of the clean reference models of one architecture."""

    arch: str
    counts: tuple[tuple[int, ...], ...]
    totals: tuple[int, ...]
    num_models: int
    models: tuple[str, ...] = ()
    model_counts: tuple[tuple[tuple[int, ...], ...], ...] = ()
    model_totals: tuple[tuple[int, ...], ...] = ()

    @property
    def per_model(self) -> bool:
        """Whether each model's own counts are kept (the ``nbpair`` null needs them)."""
        return len(self.model_counts) == self.num_models > 0


class FormatFile:
    """A dataclass saved as JSON with a ``format`` tag: ``to_dict``, ``save``, and the tag's check."""

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def check_format(cls, d: dict[str, Any], where: str) -> None:
        if d.get("format") != cls.FORMAT:
            raise UserInputError(f"{where} is not a {cls.KIND} (format {d.get('format')!r}, expected {cls.FORMAT!r})")


@dataclass(frozen=True)
class ErrorReference(FormatFile):
    """Per-architecture null of confident errors on one dataset (``soda zoo reference``).

    Attributes:
        dataset: the dataset the counts are on.
        threshold: the confidence the counts used.
        entries: one per architecture.
        provenance: where the models came from (zoo, commit, torch).
        variations: the same clean models' largest variation rates (:mod:`.variations`), the
            null of the variation evidence; ``None`` in a file written before they existed.
    """

    FORMAT: ClassVar[str] = FORMAT
    KIND: ClassVar[str] = "confident-error reference"

    dataset: str
    threshold: float
    entries: tuple[ReferenceEntry, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    variations: Any = None  # VariationReference | None (defined in .variations, which imports this module)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["variations"] = None if self.variations is None else self.variations.to_dict()
        return d

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(e.arch for e in self.entries)

    def entry(self, arch: str) -> ReferenceEntry | None:
        """The entry of ``arch``; ``None`` when there is none."""
        return next((e for e in self.entries if e.arch == arch), None)

    def pooled(self) -> ReferenceEntry:
        """Every architecture's models together (for an architecture without an entry)."""
        k = len(self.entries[0].totals)
        counts = [[sum(e.counts[s][t] for e in self.entries) for t in range(k)] for s in range(k)]
        totals = [sum(e.totals[s] for e in self.entries) for s in range(k)]
        per_model = all(e.per_model for e in self.entries)
        return ReferenceEntry("+".join(self.archs), tuple(map(tuple, counts)), tuple(totals),
                              sum(e.num_models for e in self.entries),
                              tuple(m for e in self.entries for m in e.models),
                              tuple(c for e in self.entries for c in e.model_counts) if per_model else (),
                              tuple(n for e in self.entries for n in e.model_totals) if per_model else ())

    def for_model(self, arch: str, dataset: str) -> tuple[ReferenceEntry | None, str]:
        """The entry that serves a model of ``arch`` on ``dataset``, and a note when it is not its own.

        Its own architecture's entry; the pooled entry of the other architectures when it
        has none (the natural confusions are mostly the dataset's); nothing on another dataset.
        """
        if dataset != self.dataset:
            return None, (f"no confident-error reference for dataset {dataset} (the reference is on "
                          f"{self.dataset}); build one with `soda zoo reference`")
        own = self.entry(arch)
        if own is not None:
            return own, ""
        pooled = self.pooled()
        return pooled, (f"no confident-error reference for arch {arch} on {dataset}: compared with the "
                        f"{pooled.num_models} clean reference models of {', '.join(self.archs)}; "
                        f"build one for {arch} with `soda zoo reference` for a verdict of its own")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "reference") -> "ErrorReference":
        cls.check_format(d, where)
        try:
            entries = tuple(ReferenceEntry(e["arch"], tuple(map(tuple, e["counts"])), tuple(e["totals"]),
                                           int(e["num_models"]), tuple(e.get("models", ())),
                                           tuple(tuple(map(tuple, c)) for c in e.get("model_counts", ())),
                                           tuple(map(tuple, e.get("model_totals", ()))))
                            for e in d["entries"])
            ref = cls(d["dataset"], float(d["threshold"]), entries, d.get("provenance", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{where} is malformed: {exc}") from None
        if not entries:
            raise UserInputError(f"{where} has no architecture entries")
        if d.get("variations") is not None:
            from .variations import VariationReference

            v = VariationReference.from_dict(d["variations"], f"the variation rates of {where}")
            if v.dataset != ref.dataset or len(v.rate_max) != len(entries[0].totals):
                raise UserInputError(f"{where} is malformed: its variation rates are on {v.dataset} with "
                                     f"{len(v.rate_max)} classes, its counts on {ref.dataset} with "
                                     f"{len(entries[0].totals)}")
            ref = replace(ref, variations=v)
        for e in entries:
            k = len(e.totals)
            if e.model_counts and not (len(e.model_counts) == len(e.model_totals) == e.num_models
                                       and all(len(c) == k and all(len(r) == k for r in c) for c in e.model_counts)
                                       and all(len(n) == k for n in e.model_totals)):
                raise UserInputError(f"{where} is malformed: the per-model counts of {e.arch} do not match its "
                                     f"{e.num_models} models of {k} classes")
        return ref

    @classmethod
    def load(cls, path: str | Path) -> "ErrorReference":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserInputError(f"reference file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise UserInputError(f"reference file {path} is not JSON: {exc}") from None
        return cls.from_dict(d, str(path))


@lru_cache(maxsize=1)
def shipped_reference() -> ErrorReference:
    """The reference that ships with the package (Fashion-MNIST, ``cnn`` and ``lenet``; docs/detection.md),
    with the shipped variation rates (kept in their own file, built from their own records)."""
    from .variations import shipped_variation_reference

    text = resources.files("soda_backdoor.detection").joinpath(SHIPPED).read_text()
    ref = ErrorReference.from_dict(json.loads(text), f"the shipped {SHIPPED}")
    return ref if ref.variations is not None else replace(ref, variations=shipped_variation_reference())


def build_reference(models: Sequence[tuple[ErrorCounts, str, str]], dataset: str,
                    provenance: dict[str, Any] | None = None) -> ErrorReference:
    """Pool the confident errors of clean models, per architecture.

    Args:
        models: ``(counts, arch, name)`` of each clean reference model, all at one threshold.
        dataset: the dataset the counts are on.
        provenance: recorded as is.
    """
    if not models:
        raise UserInputError("a reference needs at least one clean model")
    thresholds = {c.threshold for c, _, _ in models}
    if len(thresholds) != 1:
        raise UserInputError(f"reference models counted at different thresholds: {sorted(thresholds)}")
    entries = []
    for arch in sorted({a for _, a, _ in models}):
        mine = [(c, n) for c, a, n in models if a == arch]
        k = mine[0][0].num_classes
        counts = [[sum(c.counts[s][t] for c, _ in mine) for t in range(k)] for s in range(k)]
        totals = [sum(c.totals[s] for c, _ in mine) for s in range(k)]
        entries.append(ReferenceEntry(arch, tuple(map(tuple, counts)), tuple(totals), len(mine),
                                      tuple(n for _, n in mine), tuple(c.counts for c, _ in mine),
                                      tuple(c.totals for c, _ in mine)))
    return ErrorReference(dataset, thresholds.pop(), tuple(entries), provenance or {})


def error_evidence(counts: ErrorCounts, reference: ReferenceEntry, prior: float,
                   exposure: float | None = None, null: str = "poisson", shrink: float = 8.0) -> Tensor:
    """``E[s, t] = -log10 P(X >= n[s, t])`` under the reference's null (module docstring).

    The null's mean is the reference's pooled rate, scaled per target by the model's
    confidence factor ``k_t`` when ``exposure`` is set. ``null="poisson"``: X is Poisson.
    ``null="nbpair"``: X is negative binomial with the pair's own overdispersion across the
    reference models (:func:`pair_dispersion`), so a pair whose count varies with the recipe
    gets a wider null; it needs a reference that keeps each model's counts, and is Poisson
    otherwise. 0 on the diagonal and for a pair without errors; ``EVIDENCE_CAP`` where the
    tail underflows.
    """
    # the tails from scipy.special (scipy.stats costs a second to import): P(X >= n) is
    # I_{lam / (r + lam)}(n, r) for the negative binomial and Q(n, lam) for Poisson
    from scipy.special import betainc, pdtrc

    k = counts.num_classes
    if len(reference.totals) != k:
        raise UserInputError(f"the reference has {len(reference.totals)} classes, the model {k}")
    n = np.asarray(counts.counts, dtype=np.float64)
    rate = (np.asarray(reference.counts, dtype=np.float64) + prior) / np.maximum(reference.totals, 1)[:, None]
    lam = rate * np.asarray(counts.totals, dtype=np.float64)[:, None]
    if exposure is not None:
        lam = lam * exposure_factors(n, lam, exposure)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):  # n = 0 (no errors) is 0 below
        if null == "nbpair" and reference.per_model:
            r = 1.0 / pair_dispersion(reference, rate, shrink)
            e = -np.log(betainc(n, r, lam / (r + lam))) / math.log(10)
        else:
            e = -np.log(pdtrc(n - 1, lam)) / math.log(10)
    e = np.where(n > 0, np.minimum(e, EVIDENCE_CAP), 0.0)
    np.fill_diagonal(e, 0.0)
    return torch.from_numpy(e)


def pair_dispersion(reference: ReferenceEntry, rate: np.ndarray, shrink: float) -> np.ndarray:
    """Each pair's overdispersion ``phi[s, t]`` over the reference models (method of moments).

    With ``mu_j = rate[s, t] * N_js`` the count model ``j`` would have at the pooled rate,
    ``phi = max(mean_j (n_j - mu_j)^2 - mean_j mu_j, 0) / (mean_j mu_j)^2``, shrunk toward the
    value pooled over all pairs with the weight of ``shrink`` models (a pair seen in a few
    models is not trusted alone). ``Var = mu + phi mu^2``: ``phi = 0`` is Poisson.
    """
    counts = np.asarray(reference.model_counts, dtype=np.float64)            # (J, k, k)
    totals = np.asarray(reference.model_totals, dtype=np.float64)            # (J, k)
    mu = rate[None] * totals[:, :, None]
    m = mu.mean(0)
    excess = np.maximum(((counts - mu) ** 2).mean(0) - m, 0.0)
    off = ~np.eye(len(m), dtype=bool)
    pooled = max(float(excess[off].sum() / (m[off] ** 2).sum()), 1e-6)
    own = excess / np.maximum(m, 1e-9) ** 2
    j = len(counts)
    return np.maximum((j * own + shrink * pooled) / (j + shrink), 1e-6)


def exposure_factors(n: np.ndarray, lam: np.ndarray, exposure: float) -> np.ndarray:
    """``k_t`` for every target ``t``: the model's confident errors into the other classes over
    the reference's expectation of them, with ``exposure`` pseudo-errors, at least 1."""
    off = ~np.eye(len(n), dtype=bool)
    n_off, lam_off = np.where(off, n, 0.0), np.where(off, lam, 0.0)
    k = (n_off.sum() - n_off.sum(0) + exposure) / (lam_off.sum() - lam_off.sum(0) + exposure)
    return np.maximum(k, 1.0)


def variation_source(variations: np.ndarray, target: int) -> int:
    """The source of a target flagged by the variations alone: the class whose varied samples
    reach it in the largest excess over the clean references (the lowest class on a tie)."""
    column = np.asarray(variations, dtype=np.float64)[:, target].copy()
    column[target] = -np.inf
    return int(np.argmax(column))


@dataclass(frozen=True)
class ErrorDetection:
    """The verdict of the confident-error evidence.

    Attributes:
        backdoor: some pair's evidence exceeds ``config.tau``.
        pairs: flagged ``(source, target)`` pairs, strongest first, one per target.
        score: the model-level score, the largest evidence of any pair.
        class_scores: per class t, the largest evidence of any pair into t.
        evidence: ``E[s, t]`` for every ordered pair.
        counts: the confident errors behind it.
        reference: which reference entry served (architecture and model count).
        note: set when the model's own architecture had no entry, or the reference keeps
            no per-model counts (then the null is Poisson).
        config: the settings.
        variation_excess: with the variation evidence on, ``V[s, t]`` for every ordered pair
            (:mod:`.variations`; the diagonal is 0 and unused); ``None`` when off.
    """

    backdoor: bool
    pairs: tuple[tuple[int, int], ...]
    score: float
    class_scores: tuple[float, ...]
    evidence: tuple[tuple[float, ...], ...]
    counts: ErrorCounts
    reference: str
    note: str
    config: ErrorConfig
    variation_excess: tuple[tuple[float, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pairs"] = [{"source": s, "target": t} for s, t in self.pairs]
        return d


def detect_errors(counts: ErrorCounts, reference: ReferenceEntry, config: ErrorConfig | None = None,
                  note: str = "", variations: np.ndarray | None = None) -> ErrorDetection:
    """Flag the pairs whose confident errors the reference cannot explain (module docstring).

    With ``variations`` (``V[s, t]`` of :func:`.variations.variation_excess`) and
    ``config.variation_tau > 0``, a target whose largest ``V`` reaches ``variation_tau`` is
    flagged too (after the errors' pairs). Each pair's source comes from the evidence that
    flagged its target: the errors' strongest source where the errors flag it, the
    variations' strongest source where they flag it alone (the errors into such a target
    are within their null, so their largest says nothing; docs/detection.md). The scores
    become ``max(E, tau * V / variation_tau)``, so ``tau`` stays the threshold.
    """
    config = config or ErrorConfig()
    e = error_evidence(counts, reference, config.prior, config.exposure, config.null, config.shrink)
    few = torch.tensor(counts.counts) < config.min_errors  # capped at tau: ranks the model, never flags it
    e = torch.where(few, e.clamp(max=config.tau), e)
    if config.null == "nbpair" and not reference.per_model:
        note = "; ".join(x for x in (note, "the reference keeps no per-model counts (an older file): Poisson "
                                     "null; rebuild it with `soda zoo reference` for the per-pair spread") if x)
    per_target = e.clone().fill_diagonal_(-math.inf).max(0)  # a target's source is another class
    order = sorted(range(counts.num_classes), key=lambda t: -float(per_target.values[t]))
    pairs = tuple((int(per_target.indices[t]), t) for t in order if float(per_target.values[t]) > config.tau)
    score, class_scores = float(e.max()), [float(v) for v in per_target.values]
    excess = None
    if variations is not None and config.variation_tau > 0:
        v_t = variations.max(0)
        flagged = {t for _, t in pairs}
        extra = [int(t) for t in np.argsort(-v_t) if v_t[t] >= config.variation_tau and int(t) not in flagged]
        pairs += tuple((variation_source(variations, t), t) for t in extra)
        scaled = config.tau * v_t / config.variation_tau
        class_scores = [max(c, float(x)) for c, x in zip(class_scores, scaled)]
        score = max(score, float(scaled.max()))
        excess = tuple(tuple(0.0 if s == t else float(variations[s, t]) for t in range(len(v_t)))
                       for s in range(len(v_t)))
    return ErrorDetection(bool(pairs), pairs, score, tuple(class_scores),
                          tuple(tuple(float(v) for v in row) for row in e), counts,
                          f"{reference.arch} ({reference.num_models} clean models)", note, config, excess)
