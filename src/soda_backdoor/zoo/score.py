"""Score a detector on a zoo, as the field scores backdoor detectors (docs/zoo.md).

Every model gets a continuous model-level score (higher: more likely backdoored) and a
verdict at the detector's default threshold. Over the zoo: ROC-AUC of the score (clean vs
working backdoors), true- and false-positive rates of the verdict, whether the flagged
target is the attack's target, whether the source is right given the right target, and the
same broken down by architecture, attack and every recipe setting that varies. Given a
calibration (:func:`apply_calibration`), also how well its probabilities fit the labels:
log loss (cross-entropy) and Brier score, as TrojAI scores detectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..detection.calibration import Calibration, model_score
from ..executor import run_tasks
from .build import append_jsonl, read_jsonl, read_manifest
from .spec import POISON_FIELDS

logger = logging.getLogger(__name__)

MIN_ASR = 0.5
MAX_ACC_DROP = 0.02
MIN_ACC = 0.5  # below it, a training failed (a diverged model answers one class: 0.10 on 10 classes)


def label_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each manifest row a ``role``: ``clean``, ``backdoored`` or ``excluded`` (with a reason).

    A backdoored model counts only if its backdoor works (ASR >= 0.5) and its clean accuracy
    is within 2 points of its clean twin's. A clean model counts only if its training worked
    (accuracy >= 0.5): a diverged model is no evidence of what clean models do.
    """
    by_key = {r["key"]: r for r in rows}
    out = []
    for r in rows:
        r = dict(r)
        if r["attack"] == "none":
            if r["acc"] < MIN_ACC:
                r["role"], r["reason"] = "excluded", f"training failed: accuracy {r['acc']:.4f} < {MIN_ACC}"
            else:
                r["role"], r["reason"] = "clean", ""
        else:
            twin = by_key.get(r.get("twin", ""))
            if twin is None:
                r["role"], r["reason"] = "excluded", "its clean twin is not in the zoo"
            elif r["asr"] < MIN_ASR:
                r["role"], r["reason"] = "excluded", f"backdoor does not work: ASR {r['asr']:.2f} < {MIN_ASR}"
            elif r["acc"] < twin["acc"] - MAX_ACC_DROP:
                r["role"], r["reason"] = "excluded", (f"accuracy {r['acc']:.4f} is more than "
                                                      f"{MAX_ACC_DROP * 100:.0f} points below its clean twin's "
                                                      f"{twin['acc']:.4f}")
            else:
                r["role"], r["reason"] = "backdoored", ""
        out.append(r)
    return out


# ----------------------------------------------------------------------------- detectors

def _open(task: dict[str, Any]):
    from ..utils import resolve_device
    from ..workflow import open_model
    from .build import worker_context

    device = resolve_device(task["device"])
    ctx = worker_context(task["dataset"], task["data_dir"] or None, task["attack"], task["attack_file"] or None)
    return open_model(task["path"], ctx.data, device), ctx, device


def _detect_soda(task: dict[str, Any]) -> dict[str, Any]:
    """SODA's detector, exactly as `soda detect` runs it on the file (data loaded once per worker)."""
    import time

    from ..workflow import detect

    start = time.perf_counter()
    loaded, ctx, device = _open(task)
    rep = detect(loaded, ctx, task["config"], task["layer"], device, calibration=None, reference=task.get("reference"))
    scores = [a if a == a else 0.0 for a in rep.class_scores]
    return {"score": model_score(scores), "flagged": bool(rep.backdoor), "pairs": [list(p) for p in rep.pairs],
            "class_scores": scores, "evidence": rep.evidence, "note": rep.note,
            "seconds": time.perf_counter() - start}


def _detect_nc(task: dict[str, Any]) -> dict[str, Any]:
    """Neural Cleanse (trigger reverse engineering, MAD over mask norms) on the same clean data."""
    import time

    from ..detection import NeuralCleanseConfig, detect_neural_cleanse
    from ..utils import seed_everything
    from ..workflow import class_inputs

    start = time.perf_counter()
    config = task["config"] or NeuralCleanseConfig()
    seed_everything(config.seed)
    loaded, ctx, device = _open(task)
    inputs = class_inputs(ctx, loaded.meta, config.num_samples_per_class, device)
    res = detect_neural_cleanse(loaded.module, inputs, ctx.data.num_classes, config, mean=loaded.meta.mean,
                                std=loaded.meta.std)
    ai = [a if a == a else 0.0 for a in res.anomaly_index]
    return {"score": float(res.score), "flagged": bool(res.backdoor), "pairs": [[None, int(t)] for t in res.flagged],
            "class_scores": ai, "seconds": time.perf_counter() - start}


DETECTORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"soda": _detect_soda, "nc": _detect_nc}


def settings_key(config: Any, layer: str | None, reference: Any = None) -> str:
    """Hash of a detector's settings (a config dataclass, the layer and a confident-error
    reference, when one is given): the name of its score cache."""
    parts = [asdict(config), layer] + ([reference.to_dict()] if reference is not None else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class GroupScore:
    """Detection numbers over a group of models."""

    n_clean: int
    n_backdoored: int
    auc: float | None
    tpr: float | None
    fpr: float | None
    target_acc: float | None
    source_acc: float | None


@dataclass(frozen=True)
class CalibrationScore:
    """How well a calibration's probabilities fit a zoo's labels (lower is better).

    The reference is the best constant in hindsight: the zoo's own base rate, predicted for
    every model (or class). A calibration that does not beat it adds nothing to the base rate.

    Attributes:
        fitted_on: what the calibration was fitted on, in words.
        num_models: clean and backdoored models with a probability.
        num_uncovered: clean and backdoored models of an arch or dataset the calibration does not cover.
        log_loss: mean cross-entropy of P(backdoor) (natural log).
        brier: mean squared error of P(backdoor).
        reference_log_loss: the same for the zoo's base rate.
        reference_brier: the same for the zoo's base rate.
        class_log_loss: mean cross-entropy of P(class is the target) over every class of every model.
        class_brier: mean squared error of P(class is the target).
        class_reference_log_loss: the same for the fraction of classes that are targets.
        class_reference_brier: the same for that fraction.
    """

    fitted_on: str
    num_models: int
    num_uncovered: int
    log_loss: float | None
    brier: float | None
    reference_log_loss: float | None
    reference_brier: float | None
    class_log_loss: float | None
    class_brier: float | None
    class_reference_log_loss: float | None
    class_reference_brier: float | None


@dataclass(frozen=True)
class ZooScore:
    """A detector's numbers on a zoo, with the per-model rows."""

    detector: str
    zoo: str
    overall: GroupScore
    breakdown: dict[str, dict[str, GroupScore]]
    rows: list[dict[str, Any]]
    seconds_per_model: float
    config: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationScore | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def group_score(rows: list[dict[str, Any]]) -> GroupScore:
    """AUC, TPR/FPR at the default threshold, target and source accuracy."""
    from sklearn.metrics import roc_auc_score

    clean = [r for r in rows if r["role"] == "clean"]
    bad = [r for r in rows if r["role"] == "backdoored"]
    auc = None
    if clean and bad:
        auc = float(roc_auc_score([0] * len(clean) + [1] * len(bad), [r["score"] for r in clean + bad]))
    right_target = [r for r in bad if r["target_found"] and r["source_found"] is not None]
    return GroupScore(len(clean), len(bad), auc, _rate([r["flagged"] for r in bad]),
                      _rate([r["flagged"] for r in clean]), _rate([r["target_found"] for r in bad]),
                      _rate([r["source_found"] for r in right_target]))


def recipe_axes(rows: list[dict[str, Any]]) -> list[str]:
    """Training settings that take more than one value in the zoo."""
    values = defaultdict(set)
    for r in rows:
        for k, v in r["config"]["train"].items():
            if k != "seed" and not (k in POISON_FIELDS and r["attack"] == "none"):
                values[k].add(json.dumps(v))
    return sorted(k for k, v in values.items() if len(v) > 1)


def breakdown(rows: list[dict[str, Any]]) -> dict[str, dict[str, GroupScore]]:
    """Scores by architecture, attack and recipe setting.

    Attacks and poisoning settings (which clean models do not have) are scored against every
    clean model; architectures and the other settings against the clean models that share them.
    """
    clean = [r for r in rows if r["role"] == "clean"]
    out: dict[str, dict[str, GroupScore]] = {}
    axes = [("arch", lambda r: r["arch"]), ("attack", lambda r: r["attack"])] + [
        (f"train.{k}", (lambda k: lambda r: json.dumps(r["config"]["train"][k]))(k)) for k in recipe_axes(rows)]
    for axis, value in axes:
        shared = axis == "attack" or axis.removeprefix("train.") in POISON_FIELDS
        groups = defaultdict(list)
        for r in rows:
            if not (shared and r["attack"] == "none"):
                groups[value(r)].append(r)
        out[axis] = {k: group_score(clean + v if shared else v) for k, v in sorted(groups.items())}
    return out


def _annotate(row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    targets = [p[1] for p in result["pairs"]]
    row = {**row, **result}
    row["target_found"] = row["role"] == "backdoored" and row["target"] in targets
    sources = [p[0] for p in result["pairs"] if p[1] == row["target"]]
    # A detector that names no source (Neural Cleanse) leaves source accuracy undefined.
    row["source_found"] = (None if sources and all(s is None for s in sources)
                           else row["target_found"] and row["source"] in sources)
    return row


def score_zoo(zoo_dir: str | Path, detector: str = "soda", config: Any = None, layer: str | None = None,
              jobs: int = 1, device: str = "cpu", cache_key: str = "",
              on_model: Callable[[dict[str, Any], int, int], None] | None = None,
              reference: Any = None) -> ZooScore:
    """Run ``detector`` on every model of a built zoo and score it.

    Results are cached per model in ``DIR/scores/<detector>-<cache_key>.jsonl``, so a rerun
    with the same settings only detects the models it lacks.

    Args:
        zoo_dir: a folder written by :func:`~soda_backdoor.zoo.build_zoo`.
        detector: a name in :data:`DETECTORS`.
        config: the detector's configuration (``DetectionConfig`` for ``soda``).
        layer: analysis layer (``None``: the default).
        jobs: detections at once, one thread each.
        device: ``cpu``, ``cuda`` or ``auto``.
        cache_key: identifies the settings in the cache file name.
        on_model: called with each finished row, done and total.
        reference: the confident-error reference for ``soda`` (``None``: the shipped one).
    """
    from ..errors import UserInputError

    if detector not in DETECTORS:
        raise UserInputError(f"unknown detector {detector!r}; valid: {', '.join(sorted(DETECTORS))}")
    root = Path(zoo_dir)
    manifest = read_manifest(root)
    if not manifest:
        raise UserInputError(f"{root} holds no built zoo ({root / 'manifest.jsonl'} is missing or empty)")
    rows = label_rows(list(manifest.values()))
    cache_path = root / "scores" / f"{detector}-{cache_key or 'default'}.jsonl"
    cache_path.parent.mkdir(exist_ok=True)
    cached = read_jsonl(cache_path)
    tasks = [{"key": r["key"], "path": str(root / r["file"]), "dataset": r["dataset"], "data_dir": r.get("data_dir", ""),
              "attack": r["attack"], "attack_file": r.get("attack_file", ""), "config": config, "layer": layer,
              "device": device, "reference": reference} for r in rows if r["key"] not in cached]
    for i, outcome in enumerate(run_tasks(DETECTORS[detector], tasks, jobs), 1):
        res = outcome.result if outcome.ok else {"error": outcome.error}
        cached[outcome.task["key"]] = {"key": outcome.task["key"], **res}
        if outcome.ok:
            append_jsonl(cache_path, cached[outcome.task["key"]])
        if on_model is not None:
            on_model(cached[outcome.task["key"]], i, len(tasks))
    scored, failed = [], []
    for r in rows:
        res = cached[r["key"]]
        if "error" in res:
            failed.append({**r, "error": res["error"]})
        else:
            scored.append(_annotate(r, res))
    if failed:
        raise UserInputError(f"{len(failed)} model(s) could not be scored, e.g. {failed[0]['file']}: "
                             f"{failed[0]['error']}")
    counted = [r for r in scored if r["role"] != "excluded"]
    secs = [r["seconds"] for r in scored]
    settings = {"layer": layer, "detector_config": asdict(config) if config is not None else None}
    if reference is not None:
        settings["reference"] = reference.provenance
    return ZooScore(detector, str(root), group_score(counted), breakdown(counted), scored,
                    sum(secs) / len(secs) if secs else 0.0, settings)


def _losses(y: list[int], p: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    """(log loss, Brier, and both for the base rate of ``y`` predicted throughout)."""
    from sklearn.metrics import brier_score_loss, log_loss

    if not y:
        return None, None, None, None
    base = [sum(y) / len(y)] * len(y)
    return (float(log_loss(y, p, labels=[0, 1])), float(brier_score_loss(y, p, pos_label=1)),
            float(log_loss(y, base, labels=[0, 1])), float(brier_score_loss(y, base, pos_label=1)))


def apply_calibration(score: ZooScore, calibration: Calibration) -> ZooScore:
    """``score`` with each row's probabilities and the calibration's losses over the zoo.

    Every row gains ``probability`` (P(backdoor)) and ``class_probabilities``; both are
    ``None`` for a model whose arch or dataset the calibration does not cover (``calibration_note``
    says why). The losses count the clean and backdoored models with a probability.
    """
    rows, y, p, cy, cp, uncovered = [], [], [], [], [], 0
    for r in score.rows:
        got = calibration.apply(r["class_scores"], r["arch"], r["dataset"])
        rows.append({**r, "probability": got.probability, "class_probabilities":
                     list(got.class_probabilities) if got.probability is not None else None,
                     "calibration_note": got.message})
        if r["role"] == "excluded":
            continue
        if got.probability is None:
            uncovered += 1
            continue
        bad = r["role"] == "backdoored"
        y.append(int(bad))
        p.append(got.probability)
        cy += [int(bad and k == r["target"]) for k in range(len(r["class_scores"]))]
        cp += got.class_probabilities
    ll, brier, ref_ll, ref_brier = _losses(y, p)
    cll, cbrier, cref_ll, cref_brier = _losses(cy, cp)
    return replace(score, rows=rows, calibration=CalibrationScore(
        calibration.describe(), len(y), uncovered, ll, brier, ref_ll, ref_brier, cll, cbrier, cref_ll, cref_brier))


def plot_reliability(score: ZooScore, path: str | Path, num_bins: int = 5) -> Path:
    """The reliability diagram of P(backdoor) over the zoo, as a PNG.

    Models are binned by their probability (``num_bins`` equal-width bins); each point is a
    bin's mean probability against its fraction of backdoored models (scikit-learn's
    ``calibration_curve``). A calibrated detector lies on the diagonal. Below: how many models
    fall at each probability.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    rows = [r for r in score.rows if r["role"] != "excluded" and r.get("probability") is not None]
    y = [1 if r["role"] == "backdoored" else 0 for r in rows]
    p = [r["probability"] for r in rows]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    cal = score.calibration
    if rows:
        frac, mean_p = calibration_curve(y, p, n_bins=num_bins, strategy="uniform")
        label = f"{score.detector}: log loss {cal.log_loss:.3f}, Brier {cal.brier:.3f}" if cal else score.detector
        ax.plot(mean_p, frac, marker="o", lw=2, label=label)
        hist.hist([[q for q, t in zip(p, y) if not t], [q for q, t in zip(p, y) if t]], bins=20, range=(0, 1),
                  stacked=True, label=["clean", "backdoored"])
        hist.legend(loc="upper left", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction backdoored")
    hist.set_xlabel("P(backdoor)")
    hist.set_ylabel("models")
    ax.set_title(f"{Path(score.zoo).name}: {len(rows)} models", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_roc(score: ZooScore, path: str | Path) -> Path:
    """The clean/backdoored ROC curve of the model-level score, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    rows = [r for r in score.rows if r["role"] != "excluded"]
    y = [1 if r["role"] == "backdoored" else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if 0 < sum(y) < len(y):
        fpr, tpr, _ = roc_curve(y, [r["score"] for r in rows])
        ax.plot(fpr, tpr, lw=2, label=f"{score.detector}: AUC {score.overall.auc:.3f}")
        ax.legend(loc="lower right")
    else:  # one role only: no curve to draw, say why instead of an empty legend
        ax.text(0.5, 0.5, "no ROC: the zoo needs clean and backdoored models",
                ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false-positive rate (clean models flagged)")
    ax.set_ylabel("true-positive rate (backdoored models flagged)")
    ax.set_title(f"{Path(score.zoo).name}: {score.overall.n_clean} clean, {score.overall.n_backdoored} backdoored")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_score(score: ZooScore) -> str:
    """The table a user reads."""
    f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731

    def line(name: str, g: GroupScore) -> str:
        return (f"{name:<28}{g.n_clean:>6}{g.n_backdoored:>6}{f(g.auc):>8}{f(g.tpr):>8}{f(g.fpr):>8}"
                f"{f(g.target_acc):>9}{f(g.source_acc):>9}")

    head = f"{'group':<28}{'clean':>6}{'bd':>6}{'AUC':>8}{'TPR':>8}{'FPR':>8}{'target':>9}{'source':>9}"
    lines = [f"detector {score.detector} on {score.zoo} ({score.seconds_per_model:.1f} s per model)", head,
             line("all", score.overall)]
    for axis, groups in score.breakdown.items():
        for value, g in groups.items():
            lines.append(line(f"{axis}={value}", g))
    cal = score.calibration
    if cal is not None:
        lines.append(f"calibrated probability ({cal.fitted_on}) on {cal.num_models} models"
                     + (f"; {cal.num_uncovered} not covered" if cal.num_uncovered else "") + ":")
        lines.append(f"  P(backdoor):       log loss {f(cal.log_loss)} (base rate: {f(cal.reference_log_loss)}), "
                     f"Brier {f(cal.brier)} (base rate: {f(cal.reference_brier)})")
        lines.append(f"  P(class = target): log loss {f(cal.class_log_loss)} (base rate: "
                     f"{f(cal.class_reference_log_loss)}), Brier {f(cal.class_brier)} (base rate: "
                     f"{f(cal.class_reference_brier)})")
    excluded = [r for r in score.rows if r["role"] == "excluded"]
    if excluded:
        lines.append(f"excluded from the scores: {len(excluded)} model(s)")
        lines += [f"  {r['arch']} {r['attack']} seed {r['seed']}: {r['reason']}" for r in excluded]
    wrong = [r for r in score.rows if (r["role"] == "clean" and r["flagged"])
             or (r["role"] == "backdoored" and not (r["target_found"] and r["source_found"] is not False))]
    if wrong:
        lines.append("failures:")
        for r in wrong:
            what = ("clean model flagged" if r["role"] == "clean" else
                    "missed" if not r["flagged"] else "wrong target" if not r["target_found"] else "wrong source")
            lines.append(f"  {r['arch']} {r['attack']} seed {r['seed']} ({r['key']}): {what}; score "
                         f"{r['score']:.2f}, pairs {r['pairs']}")
    return "\n".join(lines)
