"""Target and source detection (SPEC 2.2, 2.3).

Target: for each analysed class c and each class k != c, ``rho_c[k]`` is the Pearson
correlation between column k of ``A_c`` and the mean of the other columns; ``rho_c[c] = 0``;
``rho = mean_c rho_c`` and the score is ``1 - rho``. Upper outliers (MAD test, ``tau_target``)
are candidate targets.

Source: for each candidate target t, every class c is scored by how one-way the path between
c and t is: ``log((1 + rev) / (1 + fwd))`` where ``fwd`` is the mean number of
input-optimisation steps (SPEC 2.4) class-c samples need to reach t and ``rev`` the steps
class-t samples need to reach c. Natural similarity (coats and
pullovers) is symmetric and cancels; a semantic backdoor is one-way. The study's rule (mean
target logit) is available as ``source_rule="mean_logit"``. Evidence: docs/detection.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..analysis.effects import AttributionConfig, NeuronEffects, compute_neuron_effects
from ..analysis.hooks import LayerRef
from ..analysis.optimize import optimize_batch
from ..utils import eval_mode, frozen
from .stats import OutlierTest, mad_outliers, pearson

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionConfig:
    """Settings of detection.

    Attributes:
        tau_target: MAD anomaly-index threshold for target classes.
        tau_source: MAD anomaly-index threshold reported for the source scores.
        source_rule: how the source is chosen: ``one_way`` (default), ``mean_logit`` (the
            study's), or ``asymmetry`` (mean-logit asymmetry).
        source_samples: samples per class and direction for the ``one_way`` rule.
        source_steps: step budget per sample for the ``one_way`` rule.
        attribution: settings of the causal attribution.
    """

    tau_target: float = 3.0
    tau_source: float = 2.0
    source_rule: str = "one_way"
    source_samples: int = 32
    source_steps: int = 50
    attribution: AttributionConfig = field(default_factory=AttributionConfig)


SOURCE_RULES = ("one_way", "mean_logit", "asymmetry")


@dataclass(frozen=True)
class _StepSettings:
    """SPEC 2.4 optimisation settings used to measure distances between classes."""

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [{"source": s, "target": t} for s, t in self.pairs]
        return d


def target_scores(effects: NeuronEffects, num_classes: int) -> Tensor:
    """``s[k] = 1 - mean_c rho_c[k]`` (SPEC 2.2)."""
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
                batch_size: int = 512) -> Tensor:
    """``E[c, k]``: mean logit k over the clean samples of class c."""
    out = torch.zeros(num_classes, num_classes, dtype=torch.double)
    with eval_mode(model):
        for c, x in class_inputs.items():
            parts = [model(x[i:i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)]
            out[c] = torch.cat(parts).mean(0)
    return out


def transfer_steps(model: nn.Module, class_inputs: dict[int, Tensor], target: int, num_samples: int,
                   steps: int) -> tuple[Tensor, Tensor]:
    """Mean optimisation steps from each class c to ``target`` and from ``target`` to c.

    All ``2 (K - 1) num_samples`` optimisations run as one batch with per-row targets.
    A row that never reaches the threshold counts as ``steps``.

    Returns:
        ``(forward, reverse)``: ``(K,)`` each; the target's own entry is 0.
    """
    classes = [c for c in sorted(class_inputs) if c != target]
    xt = class_inputs[target][:num_samples]
    xs, tg, owner = [], [], []
    for c in classes:
        xc = class_inputs[c][:num_samples]
        xs += [xc, xt]
        tg += [torch.full((len(xc),), target), torch.full((len(xt),), c)]
        owner += [torch.full((len(xc),), 2 * c), torch.full((len(xt),), 2 * c + 1)]
    x = torch.cat(xs)
    tgt = torch.cat(tg).to(x.device)
    own = torch.cat(owner)
    with eval_mode(model), frozen(model):
        _, n_steps, _ = optimize_batch(model, x, tgt, _StepSettings(steps))
    n_steps = n_steps.cpu().double()
    k = max(class_inputs) + 1
    fwd = torch.zeros(k, dtype=torch.double)
    rev = torch.zeros(k, dtype=torch.double)
    for c in classes:
        fwd[c] = n_steps[own == 2 * c].mean()
        rev[c] = n_steps[own == 2 * c + 1].mean()
    return fwd, rev


def source_scores(e: Tensor, target: int, rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """Score every class as the source of a backdoor into ``target``.

    ``mean_logit`` (the study): ``e_c = E[c, t]``, how hard class c pushes the target logit.
    ``asymmetry``: ``E[c, t] - E[t, c]``: natural similarity is symmetric (pullovers also look
    like coats), a semantic backdoor is one-way.

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
        raise ValueError(f"unknown source rule {rule!r}; valid: {', '.join(SOURCE_RULES)}")
    scores[target], fwd[target], rev[target] = 0.0, 0.0, 0.0
    return scores, fwd, rev


def _floats(t: Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t)


def detect_backdoor(model: nn.Module, ref: LayerRef, class_inputs: dict[int, Tensor], num_classes: int,
                    config: DetectionConfig | None = None, progress: bool = False,
                    effects: NeuronEffects | None = None) -> tuple[DetectionResult, NeuronEffects]:
    """Run causal attribution and detection.

    Args:
        model: the classifier.
        ref: analysis layer.
        class_inputs: clean normalised samples per class (every class present).
        num_classes: K.
        config: thresholds and attribution settings.
        progress: progress bar.
        effects: reuse precomputed attributions.

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
    if test.flagged:
        e = mean_logits(model, {c: x[:config.attribution.num_samples] for c, x in class_inputs.items()}, num_classes)
        for t in test.flagged:
            if config.source_rule == "one_way":
                fwd, rev = transfer_steps(model, class_inputs, t, config.source_samples, config.source_steps)
                scores = torch.log((1.0 + rev) / (1.0 + fwd))
            else:
                scores, fwd, rev = source_scores(e, t, config.source_rule)
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
                           effects.method, time.perf_counter() - start), effects
