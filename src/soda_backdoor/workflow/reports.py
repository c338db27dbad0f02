"""Typed results of the workflow steps.

Each report is a frozen dataclass; ``to_dict()`` gives the JSON the CLI and ``soda run``
write (its keys are the files' schema, see the README). In-memory objects (the trained or
repaired model, the attribution matrices, the reconstruction) ride along for callers in
Python and are left out of ``to_dict()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..analysis import NeuronEffects
from ..detection import CalibratedScore, DetectionResult
from ..detection.errors import ErrorDetection
from ..models import LoadedModel
from ..reconstruction import Reconstruction
from ..repair import BaselineRepairResult, RepairConfig, RepairResult
from ..training import EvalResult, TrainConfig


@dataclass(frozen=True)
class EvaluateReport:
    """ACC on the clean test split, ASR on the semantic test samples."""

    acc: float
    asr: float
    n_clean: int
    n_semantic: int
    attack: str

    @classmethod
    def from_eval(cls, ev: EvalResult, attack: str) -> EvaluateReport:
        return cls(ev.acc, ev.asr, ev.n_clean, ev.n_semantic, attack)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainReport:
    """A trained model and how well it learnt the task and the backdoor."""

    arch: str
    dataset: str
    attack: str
    evaluation: EvaluateReport
    seconds: float
    history: list[dict[str, float]]
    config: TrainConfig
    model: LoadedModel = field(repr=False, compare=False)
    model_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        ev = self.evaluation
        return {"model": self.model_path, "arch": self.arch, "dataset": self.dataset, "attack": self.attack,
                "acc": ev.acc, "asr": ev.asr, "n_clean": ev.n_clean, "n_semantic": ev.n_semantic,
                "seconds": self.seconds, "history": self.history, "config": asdict(self.config)}


@dataclass(frozen=True)
class DetectReport:
    """The detection verdict, with the class names it refers to (and probabilities, when calibrated).

    ``errors`` is the confident-error verdict when it gave the verdict (``DetectionConfig.evidence``);
    ``result`` always holds the causal attribution's target scores (and, without ``errors``,
    the weight-profile verdict). ``note`` says when the verdict fell back or used another
    architecture's reference.
    """

    result: DetectionResult
    class_names: tuple[str, ...]
    seconds: float
    effects: NeuronEffects = field(repr=False, compare=False)
    model_path: str = ""
    calibrated: CalibratedScore | None = None
    errors: ErrorDetection | None = None
    note: str = ""

    @property
    def backdoor(self) -> bool:
        return self.errors.backdoor if self.errors is not None else self.result.backdoor

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return self.errors.pairs if self.errors is not None else self.result.pairs

    @property
    def evidence(self) -> str:
        """What the verdict rests on: ``errors`` or ``weights``."""
        return "errors" if self.errors is not None else "weights"

    @property
    def class_scores(self) -> tuple[float, ...]:
        """Per class, the score the verdict thresholds (evidence into it, or its anomaly index)."""
        return self.errors.class_scores if self.errors is not None else self.result.target_test.anomaly_index

    def to_dict(self) -> dict[str, Any]:
        out = self.result.to_dict()
        # the weight profile's own verdict; its sources are only sought when it gives the verdict
        out["weight_profile"] = {"targets": list(self.result.target_test.flagged), "pairs": out["pairs"],
                                 "sources_sought": self.errors is None}
        out["backdoor"] = self.backdoor
        out["pairs"] = [{"source": s, "target": t} for s, t in self.pairs]
        out["evidence"] = self.evidence
        out["errors"] = self.errors.to_dict() if self.errors is not None else None
        out["note"] = self.note
        out["seconds"] = self.seconds
        out["analysis_seconds"] = self.result.seconds
        out["model"] = self.model_path
        out["class_names"] = list(self.class_names)
        out["calibration"] = asdict(self.calibrated) if self.calibrated is not None else None
        return out


@dataclass(frozen=True)
class ReconstructReport:
    """Reconstructed infected samples of one class pair."""

    reconstruction: Reconstruction = field(repr=False, compare=False)
    fingerprint: str = ""
    samples_path: str = ""
    png_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        rec = self.reconstruction
        steps = rec.steps.float()
        some = len(steps) > 0
        return {"kept": rec.kept, "tried": rec.tried, "seconds": rec.seconds, "source": rec.source,
                "target": rec.target, "samples": self.samples_path, "png": self.png_path,
                "mean_steps": float(steps.mean()) if some else 0.0, "max_steps": int(rec.steps.max()) if some else 0,
                "mean_target_prob": float(rec.target_prob.mean()) if some else 0.0,
                "config": asdict(rec.config)}


@dataclass(frozen=True)
class RepairReport:
    """ACC, ASR and R-ASR (held-out reconstructed samples sent to the target) before and after."""

    before: EvaluateReport
    after: EvaluateReport
    rasr_before: float
    rasr_after: float
    n_repair_samples: int
    n_heldout_samples: int
    n_defender: int
    layer: str
    source: int
    target: int
    seconds: float
    result: RepairResult = field(repr=False, compare=False)
    model: LoadedModel = field(repr=False, compare=False)
    config: RepairConfig = field(default_factory=RepairConfig)
    model_path: str = ""
    n_varied: int = 0
    feature_guard_loss: float | None = None
    feature_fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"acc_before": self.before.acc, "asr_before": self.before.asr, "acc_after": self.after.acc,
                "asr_after": self.after.asr, "rasr_before": self.rasr_before, "rasr_after": self.rasr_after,
                "n_clean": self.after.n_clean, "n_semantic": self.after.n_semantic,
                "n_repair_samples": self.n_repair_samples, "n_heldout_samples": self.n_heldout_samples,
                "n_varied_samples": self.n_varied, "n_feature_samples": self.result.num_feature,
                "feature_guard_loss": self.feature_guard_loss, "feature_fallback": self.feature_fallback,
                "n_defender": self.n_defender, "neurons_kept": self.result.num_kept,
                "num_neurons": self.result.num_neurons, "layer": self.layer, "source": self.source,
                "target": self.target, "model": self.model_path, "seconds": self.seconds,
                "repair_seconds": self.result.seconds, "history": self.result.history,
                "tuned_from": self.result.tuned_from, "config": asdict(self.config)}


@dataclass(frozen=True)
class BaselineRepairReport:
    """ACC and ASR before and after a baseline repair (no reconstructed samples, so no R-ASR)."""

    method: str
    before: EvaluateReport
    after: EvaluateReport
    n_defender: int
    seconds: float
    result: BaselineRepairResult = field(repr=False, compare=False)
    model: LoadedModel = field(repr=False, compare=False)
    model_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "acc_before": self.before.acc, "asr_before": self.before.asr,
                "acc_after": self.after.acc, "asr_after": self.after.asr, "rasr_before": None, "rasr_after": None,
                "n_clean": self.after.n_clean, "n_semantic": self.after.n_semantic, "n_defender": self.n_defender,
                "model": self.model_path, "seconds": self.seconds, "repair": self.result.to_dict()}
