"""Target and source detection (docs/method.md §2.2, §2.3).

Target: for each analysed class c and each class k != c, ``rho_c[k]`` is the Pearson
correlation between column k of ``A_c`` and the mean of the other columns; ``rho_c[c] = 0``;
``rho = mean_c rho_c`` and the score is ``1 - rho``. Upper outliers (MAD test, ``tau_target``)
are candidate targets.

Source (default rule ``fastest``): for each candidate target t, the class whose clean samples
reach t in the fewest steps of the input optimisation (docs/method.md §2.4). A semantic backdoor is a
shortcut from its source to the target, so that path is the shortest. ``one_way`` divides by
the reverse path (class-t samples reaching c); ``mean_logit`` is the study's rule (mean target
logit), which picks naturally similar classes. Evidence: docs/detection.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..analysis.effects import AttributionConfig, NeuronEffects, compute_neuron_effects
from ..analysis.hooks import LayerRef
from ..analysis.optimize import optimize_batch
from ..errors import check_at_least, check_choice, check_finite
from ..utils import cpu_channels_last, eval_mode, frozen, inference_view, pass_batch
from .errors import ErrorConfig
from .stats import OutlierTest, mad_outliers, pearson

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionConfig:
    """Settings of detection.

    Attributes:
        tau_target: MAD anomaly-index threshold for target classes.
        tau_source: MAD anomaly-index threshold reported for the source scores.
        source_rule: how the source is chosen: ``fastest`` (default: the class whose samples
            reach the target in the fewest optimisation steps), ``one_way`` (log ratio of
            reverse to forward steps), ``mean_logit`` (the study's rule), or ``asymmetry``.
        source_samples: samples per class for the step-based rules.
        source_steps: step budget per sample for the step-based rules.
        source_lr: learning rate of the step-based rules' optimisation (finer than the
            reconstruction's; why: docs/method.md §2.3).
        attribution: settings of the causal attribution.
        evidence: what the verdict rests on: ``errors`` (default: confident errors on natural
            data against a reference of clean models, :mod:`.errors`; the weight profile where
            no reference covers the model's dataset) or ``weights`` (the weight-profile target
            score and a source rule, as the study).
        errors: settings of the confident-error verdict.
    """

    tau_target: float = 4.5
    tau_source: float = 2.0
    source_rule: str = "fastest"
    source_samples: int = 64
    source_steps: int = 50
    source_lr: float = 0.01
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    evidence: str = "errors"
    errors: ErrorConfig = field(default_factory=ErrorConfig)

    def __post_init__(self) -> None:
        check_choice("evidence", self.evidence, EVIDENCE)
        check_finite("tau_target", self.tau_target)
        check_finite("tau_source", self.tau_source)
        check_choice("source_rule", self.source_rule, tuple(SOURCE_RULES))
        check_at_least("source_samples", self.source_samples, 1)
        check_at_least("source_steps", self.source_steps, 1)
        check_finite("source_lr", self.source_lr, positive=True)


SOURCE_RULES = ("fastest", "one_way", "mean_logit", "asymmetry")
EVIDENCE = ("errors", "weights")


@dataclass(frozen=True)
class TransferSettings:
    """Settings of the input optimisation (docs/method.md, 2.4) used to measure distances between classes."""

    steps: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: float = 0.9
    threshold: float = 0.99


@dataclass(frozen=True)
class SourceAnalysis:
    """Source scores for one candidate target."""

    target: int
    source: int
    rule: str
    scores: tuple[float, ...]
    forward: tuple[float, ...]
    reverse: tuple[float, ...]
    mean_logit: tuple[float, ...]
    outlier: OutlierTest


@dataclass(frozen=True)
class DetectionResult:
    """Verdict of :func:`detect_backdoor` with every score behind it."""

    backdoor: bool
    pairs: tuple[tuple[int, int], ...]
    target_scores: tuple[float, ...]
    target_test: OutlierTest
    sources: tuple[SourceAnalysis, ...]
    layer: str
    config: DetectionConfig
    attribution_method: str
    seconds: float
    folded: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [{"source": s, "target": t} for s, t in self.pairs]
        return d


def target_scores(effects: NeuronEffects, num_classes: int) -> Tensor:
    """``s[k] = 1 - mean_c rho_c[k]`` (docs/method.md §2.2)."""
    rho = torch.zeros(len(effects.classes), num_classes, dtype=torch.double)
    for ci, c in enumerate(effects.classes):
        a = effects.matrices[ci].double()
        total = a.sum(1)
        for k in range(num_classes):
            if k == c:
                continue
            others = (total - a[:, k]) / (num_classes - 1)
            rho[ci, k] = pearson(a[:, k], others)
    return 1.0 - rho.mean(0)


@torch.no_grad()
def mean_logits(model: nn.Module, class_inputs: dict[int, Tensor], num_classes: int,
                batch_size: int | None = None) -> Tensor:
    """``E[c, k]``: mean logit k over the clean samples of class c."""
    out = torch.zeros(num_classes, num_classes, dtype=torch.double)
    with inference_view(model) as fast:
        for c, x in class_inputs.items():
            batch_size = batch_size or pass_batch(x.device)
            parts = [fast(x[i:i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)]
            out[c] = torch.cat(parts).mean(0)
    return out


def transfer_steps(model: nn.Module, groups: list[tuple[Tensor, int]], steps: int, lr: float = 0.1,
                   only_fastest: bool = False) -> Tensor:
    """Mean optimisation steps (docs/method.md §2.4) for each group of inputs to reach its target class.

    All groups run as one batch with per-row targets and per-row early stopping. Steps are
    counted continuously (the interpolated threshold crossing); a row that never reaches the
    threshold counts as ``steps``.

    Args:
        model: the classifier.
        groups: ``(inputs, target)`` pairs.
        steps: step budget per row.
        lr: learning rate of the optimisation.
        only_fastest: only the group with the fewest steps matters. A group is given up as
            soon as its lowest possible mean exceeds the highest possible mean of another
            group; its unfinished rows then count as ``steps``. The fastest group, and so the
            argmin, is the one the full run gives; the other means are upper bounds.

    Returns:
        ``(len(groups),)`` mean steps per group.
    """
    x = torch.cat([g[0] for g in groups])
    tgt = torch.cat([torch.full((len(g[0]),), g[1], dtype=torch.long) for g in groups]).to(x.device)
    owner = torch.cat([torch.full((len(g[0]),), i) for i, g in enumerate(groups)]).to(x.device)
    stop = _slower_groups(owner, len(groups), steps) if only_fastest else None
    with eval_mode(model), frozen(model), cpu_channels_last(model):
        crossing = optimize_batch(model, x, tgt, TransferSettings(steps, lr), stop=stop).crossing.cpu().double()
    owner = owner.cpu()
    return torch.stack([crossing[owner == i].mean() for i in range(len(groups))])


def _slower_groups(owner: Tensor, n_groups: int, budget: int):
    """Row stop for :func:`transfer_steps`: the rows of groups that can no longer be the fastest.

    Before step ``taken`` a running row will cross at ``taken - 1`` or later, and at ``budget``
    at the latest; a finished row's crossing is known. A group whose lowest possible mean is
    above the lowest highest-possible mean of all groups cannot be the fastest.
    """
    size = torch.bincount(owner, minlength=n_groups).double()

    def stop(taken: int, crossing: Tensor, active: Tensor) -> Tensor:
        run = active.double()
        known = crossing.double() * (1 - run)
        low = (torch.bincount(owner, known, n_groups) + torch.bincount(owner, run, n_groups) * max(taken - 1, 0)) / size
        high = (torch.bincount(owner, known, n_groups) + torch.bincount(owner, run, n_groups) * budget) / size
        return active & (low > high.min())[owner]
    return stop


@dataclass(frozen=True)
class SourceEvidence:
    """What every source rule may look at for one candidate target.

    Attributes:
        model: the classifier.
        class_inputs: clean normalised samples per class.
        target: the candidate target class.
        num_classes: K.
        mean_logits: ``E[c, k]``, mean logit k over the clean samples of class c.
        config: the detection settings (step budget and learning rate of the step rules).
    """

    model: nn.Module
    class_inputs: dict[int, Tensor]
    target: int
    num_classes: int
    mean_logits: Tensor
    config: DetectionConfig


SourceRule = Callable[[SourceEvidence], tuple[Tensor, Tensor, Tensor]]
"""A source rule: evidence in, ``(scores, forward, reverse)`` out, one entry per class."""

_SOURCE_RULES: dict[str, SourceRule] = {}


def register_source_rule(name: str) -> Callable[[SourceRule], SourceRule]:
    """Decorator: add a source rule to the registry under ``name``."""
    def add(fn: SourceRule) -> SourceRule:
        _SOURCE_RULES[name] = fn
        return fn
    return add


def get_source_rule(name: str) -> SourceRule:
    """The registered rule called ``name``."""
    if name not in _SOURCE_RULES:
        raise ValueError(f"unknown source rule {name!r}; valid: {', '.join(SOURCE_RULES)}")
    return _SOURCE_RULES[name]


def _forward_steps(ev: SourceEvidence, only_fastest: bool = False) -> tuple[Tensor, list[int]]:
    others = [c for c in range(ev.num_classes) if c != ev.target]
    n, cfg = ev.config.source_samples, ev.config
    fwd = torch.zeros(ev.num_classes, dtype=torch.double)
    fwd[others] = transfer_steps(ev.model, [(ev.class_inputs[c][:n], ev.target) for c in others],
                                 cfg.source_steps, cfg.source_lr, only_fastest)
    return fwd, others


@register_source_rule("fastest")
def fastest_rule(ev: SourceEvidence) -> tuple[Tensor, Tensor, Tensor]:
    """Minus the mean steps class c needs to reach the target: the shortcut is the shortest path.

    Classes that can no longer be the fastest are given up early (:func:`transfer_steps`):
    the source is the one the full run picks, the other classes' steps are upper bounds.
    """
    fwd, _ = _forward_steps(ev, only_fastest=True)
    return -fwd, fwd, torch.zeros(ev.num_classes, dtype=torch.double)


@register_source_rule("one_way")
def one_way_rule(ev: SourceEvidence) -> tuple[Tensor, Tensor, Tensor]:
    """``log((1 + reverse) / (1 + forward))``: the forward path is short, the way back is not."""
    fwd, others = _forward_steps(ev)
    n, cfg = ev.config.source_samples, ev.config
    rev = torch.zeros(ev.num_classes, dtype=torch.double)
    rev[others] = transfer_steps(ev.model, [(ev.class_inputs[ev.target][:n], c) for c in others],
                                 cfg.source_steps, cfg.source_lr)
    return torch.log((1.0 + rev) / (1.0 + fwd)), fwd, rev


@register_source_rule("mean_logit")
def mean_logit_rule(ev: SourceEvidence) -> tuple[Tensor, Tensor, Tensor]:
    """The study's rule: ``E[c, t]``, how hard class c pushes the target logit."""
    return source_scores(ev.mean_logits, ev.target, "mean_logit")


@register_source_rule("asymmetry")
def asymmetry_rule(ev: SourceEvidence) -> tuple[Tensor, Tensor, Tensor]:
    """``E[c, t] - E[t, c]``: natural similarity is symmetric, a semantic backdoor is one-way."""
    return source_scores(ev.mean_logits, ev.target, "asymmetry")


def source_scores(e: Tensor, target: int, rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """Score every class from the mean logits ``e`` (rules ``mean_logit`` and ``asymmetry``).

    ``mean_logit`` (the study): ``e_c = E[c, t]``. ``asymmetry``: ``E[c, t] - E[t, c]``.

    Returns:
        ``(scores, E[:, t], E[t, :])`` with the target's own entry set to 0.
    """
    fwd = e[:, target].clone()
    rev = e[target, :].clone()
    if rule == "mean_logit":
        scores = fwd.clone()
    elif rule == "asymmetry":
        scores = fwd - rev
    else:
        raise ValueError(f"source_scores scores the logit rules mean_logit and asymmetry, not {rule!r}")
    scores[target], fwd[target], rev[target] = 0.0, 0.0, 0.0
    return scores, fwd, rev


def _floats(t: Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t)


def detect_backdoor(model: nn.Module, ref: LayerRef, class_inputs: dict[int, Tensor], num_classes: int,
                    config: DetectionConfig | None = None, progress: bool = False,
                    effects: NeuronEffects | None = None,
                    find_sources: bool = True) -> tuple[DetectionResult, NeuronEffects]:
    """Run causal attribution and detection.

    Args:
        model: the classifier.
        ref: analysis layer.
        class_inputs: clean normalised samples per class (every class present).
        num_classes: K.
        config: thresholds and attribution settings.
        progress: progress bar.
        effects: reuse precomputed attributions.
        find_sources: run the source rule for each flagged target (``False``: the target
            scores only, and no pairs, when another evidence gives the verdict).

    Returns:
        The detection result and the attribution matrices.
    """
    config = config or DetectionConfig()
    start = time.perf_counter()
    if effects is None:
        effects = compute_neuron_effects(model, ref, class_inputs, config.attribution, progress)
    s = target_scores(effects, num_classes)
    test = mad_outliers(s, config.tau_target)
    sources = []
    pairs = []
    if test.flagged and find_sources:
        rule = get_source_rule(config.source_rule)
        e = mean_logits(model, {c: x[:config.attribution.num_samples] for c, x in class_inputs.items()}, num_classes)
        for t in test.flagged:
            evidence = SourceEvidence(model, class_inputs, t, num_classes, e, config)
            scores, fwd, rev = rule(evidence)
            scores[t] = 0.0
            out = mad_outliers(scores, config.tau_source, exclude=(t,))
            cand = [c for c in range(num_classes) if c != t]
            src = max(cand, key=lambda c: float(scores[c]))
            logit_t = e[:, t].clone()
            logit_t[t] = 0.0
            sources.append(SourceAnalysis(t, src, config.source_rule, _floats(scores), _floats(fwd), _floats(rev),
                                          _floats(logit_t), out))
            pairs.append((src, t))
    return DetectionResult(bool(pairs), tuple(pairs), test.scores, test, tuple(sources), effects.layer, config,
                           effects.method, time.perf_counter() - start, effects.folded), effects
