"""The whole job in one run folder: train -> evaluate -> detect -> reconstruct -> repair -> evaluate -> report.

Each step records the hash of its settings and inputs in ``steps/<step>.json``; a step whose
record matches and whose outputs exist is not redone (``force`` redoes all). Every file is
written atomically, so an interrupted run never leaves a half-written artifact that a
resumed run would trust.

Example:
    >>> from soda_backdoor.workflow import PipelineConfig, run_pipeline
    >>> report = run_pipeline(PipelineConfig(out_dir="runs/demo", model="m.safetensors"))
    >>> report.verdict
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from ..artifacts import DEFAULT_CALIBRATION, load_samples, resolve_calibration, save_effects, save_reconstruction
from ..data import get_attack, load_dataset
from ..detection import DetectionConfig
from ..detection.errors import ErrorReference, shipped_reference
from ..errors import UserInputError
from ..models import ModelMeta, save_model
from ..reconstruction import ReconstructionConfig
from ..repair import RepairConfig
from ..reporting.text import verdict
from ..training import TrainConfig
from ..utils import resolve_device, write_json
from .context import DataContext, open_model, resolve_attack
from .reports import EvaluateReport
from .steps import detect, evaluate, reconstruct, repair, train

logger = logging.getLogger(__name__)

DEFAULT_DIR = "runs/default"


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``soda run`` needs.

    Attributes:
        out_dir: the run folder.
        dataset: dataset name.
        data_dir: where the dataset is (``None``: the standard places).
        attack: attack name (``None``: ``stripet`` on fmnist when training, else the model's own).
        attack_file: a user's JSON file of attacks.
        seed: seed of every step.
        arch: architecture to train, or of a state_dict given as ``model``.
        model: audit this model file instead of training one.
        init: fine-tune this checkpoint instead of training from scratch.
        layer: analysis (and mask) layer; ``None``: the input of the last Linear.
        num_samples: clean samples per class for the repair mask.
        train, detect, reconstruct, repair: the steps' settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: redo every step.
        progress: progress bars.
        calibration: the detection also reports P(backdoor) and P(class is the target)
            (docs/detection.md): ``default`` (the shipped calibration, where it covers the model
            and the settings), a file from ``soda zoo calibrate``, or ``none``.
        reference: a reference from ``soda zoo reference``, its confident errors and variation rates
            (``None``: the shipped one).
    """

    out_dir: str = DEFAULT_DIR
    dataset: str = "fmnist"
    data_dir: str | None = None
    attack: str | None = None
    attack_file: str | None = None
    seed: int = 0
    arch: str | None = "cnn"
    model: str | None = None
    init: str | None = None
    layer: str | None = None
    num_samples: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectionConfig = field(default_factory=DetectionConfig)
    reconstruct: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    device: str = "auto"
    force: bool = False
    progress: bool = False
    calibration: str | None = DEFAULT_CALIBRATION
    reference: str | None = None


@dataclass(frozen=True)
class StepRecord:
    """One step of a run: its JSON result, how long it took, and whether it was reused."""

    step: str
    seconds: float
    cached: bool
    result: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PipelineReport:
    """The outcome of :func:`run_pipeline` (``to_dict()`` is ``summary.json``)."""

    run_dir: str
    verdict: str
    backdoor: bool
    pairs: tuple[tuple[int, int], ...]
    before: EvaluateReport
    after: EvaluateReport | None
    total_seconds: float
    steps: tuple[StepRecord, ...]
    detection: dict[str, Any]
    repair: dict[str, Any] | None = None
    report_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "verdict": self.verdict, "backdoor": self.backdoor,
                "pairs": [{"source": s, "target": t} for s, t in self.pairs], "before": self.before.to_dict(),
                "after": self.after.to_dict() if self.after else None, "total_seconds": self.total_seconds,
                "steps": [r.to_dict() for r in self.steps]}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class _Runner:
    """Runs named steps with caching by key in ``out/steps``."""

    def __init__(self, out: Path, force: bool, say: Callable[[str], None]) -> None:
        self.out = out
        self.force = force
        self.say = say
        self.records: list[StepRecord] = []

    def step(self, name: str, settings: dict[str, Any], outputs: list[str],
             fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = _hash(settings)
        state_path = self.out / "steps" / f"{name}.json"
        if not self.force and state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("key") == key and all((self.out / o).is_file() for o in outputs):
                self.say(f"[{name}] up to date, reusing ({state.get('seconds', 0):.1f}s before)")
                self.records.append(StepRecord(name, state["seconds"], True, state["result"]))
                return state["result"]
        self.say(f"[{name}] running ...")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        write_json(state_path, {"step": name, "key": key, "seconds": seconds, "outputs": outputs, "result": result,
                                "settings": settings})
        self.records.append(StepRecord(name, seconds, False, result))
        self.say(f"[{name}] done in {seconds:.1f}s")
        return result


def _written(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    write_json(path, result)
    return result


def run_pipeline(config: PipelineConfig, say: Callable[[str], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_result: Callable[[str, dict[str, Any]], None] | None = None) -> PipelineReport:
    """Run (or resume) the whole job in ``config.out_dir``; render ``report.html`` there.

    Args:
        config: the run's settings.
        say: receives one line per step event ("[detect] running ..."); default: the log.
        on_epoch: receives each training epoch's record.
        on_result: receives each step's name and JSON result as soon as it is known.
    """
    say = say or logger.info
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    progress = config.progress
    attack = config.attack
    if attack is None and config.attack_file is None and config.model is None:
        attack = "stripet" if config.dataset == "fmnist" else "none"
    train_cfg, det_cfg, rec_cfg, rep_cfg = config.train, config.detect, config.reconstruct, config.repair
    data_key = {"dataset": config.dataset, "data_dir": config.data_dir, "attack": attack,
                "attack_file": config.attack_file, "seed": config.seed}
    write_json(out / "config.json", {**data_key, "arch": config.arch, "model": config.model,
                                     "train": asdict(train_cfg), "detect": asdict(det_cfg), "layer": config.layer,
                                     "reconstruct": asdict(rec_cfg), "repair": asdict(rep_cfg),
                                     "device": str(device)})
    runner = _Runner(out, config.force, say)
    t_start = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir)
    contexts: dict[tuple[str, int], DataContext] = {}

    def context(model_meta: ModelMeta, required: bool, seed: int) -> DataContext:
        atk = resolve_attack(data, attack, config.attack_file, model_meta, required)
        key = (atk.name if atk else "none", seed)
        if key not in contexts:
            contexts[key] = DataContext.build(data, atk, seed)
        return contexts[key]

    # 1. the model: trained here, or given
    if config.model is None:
        model_path = "model.safetensors"

        def run_train() -> dict:
            ctx = DataContext.build(data, get_attack(attack, data.spec.name, config.attack_file), train_cfg.seed)
            init = open_model(config.init, data, device, config.arch) if config.init else None
            rep = train(ctx, train_cfg, device, config.arch or "cnn", init, config.init or "", progress, on_epoch)
            save_model(out / model_path, rep.model.module, rep.model.meta)
            res = rep.to_dict() | {"model": str(out / model_path)}
            write_json(out / "train_history.json", res["history"])
            return res

        runner.step("train", {**data_key, "arch": config.arch, "train": asdict(train_cfg), "init": config.init},
                    [model_path], run_train)
        model_file = out / model_path
    else:
        model_file = Path(config.model)
        if not model_file.is_file():
            raise UserInputError(f"model file {model_file} does not exist")
    # refuse an unsafe or mismatched model before any step runs
    loaded = open_model(str(model_file), data, device, config.arch)
    model_key = _file_hash(model_file)

    # 2. evaluate the model as given
    before = runner.step("evaluate", {**data_key, "model": model_key}, [],
                         lambda: evaluate(loaded, context(loaded.meta, True, 0), device).to_dict())

    # 3. detect
    calibration = resolve_calibration(config.calibration)
    reference = ErrorReference.load(config.reference) if config.reference else shipped_reference()

    def run_detect() -> dict:
        rep = detect(loaded, context(loaded.meta, False, 0), det_cfg, config.layer, device, config.seed, progress,
                     calibration, reference)
        save_effects(out / "effects.npz", rep.effects)
        return _written(out / "detect.json", rep.to_dict() | {"model": str(model_file)})

    calibrated = {"calibration": _hash(calibration.to_dict())} if calibration is not None else {}
    if det_cfg.evidence == "errors":
        calibrated["reference"] = _hash(reference.to_dict())
    det = runner.step("detect", {**data_key, "model": model_key, "detect": asdict(det_cfg), "layer": config.layer,
                                 **calibrated},
                      ["detect.json", "effects.npz"], run_detect)
    if on_result is not None:
        on_result("detect", det)

    rep = after = None
    if det["backdoor"]:
        src, tgt = det["pairs"][0]["source"], det["pairs"][0]["target"]

        # 4. reconstruct
        def run_reconstruct() -> dict:
            rec = reconstruct(loaded, context(loaded.meta, False, config.seed), src, tgt, rec_cfg, device,
                              config.seed, progress)
            save_reconstruction(out / "samples.npz", rec.reconstruction, rec.fingerprint)
            png = out / "figures" / "reconstructions.png"
            from ..reporting.plots import plot_reconstructions

            plot_reconstructions(rec.reconstruction, loaded.meta.mean, loaded.meta.std, str(png),
                                 data.spec.class_names)
            return _written(out / "reconstruct.json",
                            rec.to_dict() | {"samples": str(out / "samples.npz"), "png": str(png)})

        runner.step("reconstruct", {**data_key, "model": model_key, "pair": [src, tgt],
                                    "reconstruct": asdict(rec_cfg)},
                    ["samples.npz", "figures/reconstructions.png"], run_reconstruct)
        samples_key = _file_hash(out / "samples.npz")

        # 5. repair (a fresh copy of the model: repair changes it in place)
        def run_repair() -> dict:
            target_model = open_model(str(model_file), data, device, config.arch)
            measured = EvaluateReport(**{f.name: before[f.name] for f in fields(EvaluateReport)})  # step 2
            res = repair(target_model, context(target_model.meta, True, rep_cfg.seed), src, tgt,
                         load_samples(out / "samples.npz"), rep_cfg, config.layer, device, config.num_samples, progress,
                         measured)
            save_model(out / "repaired.safetensors", res.model.module, res.model.meta)
            return _written(out / "repair.json", res.to_dict() | {"model": str(out / "repaired.safetensors")})

        rep = runner.step("repair", {**data_key, "model": model_key, "pair": [src, tgt], "samples": samples_key,
                                     "repair": asdict(rep_cfg), "layer": config.layer},
                          ["repaired.safetensors", "repair.json"], run_repair)

        # 6. evaluate the repaired file as any user would
        def run_after() -> dict:
            repaired = open_model(str(out / "repaired.safetensors"), data, device)
            return evaluate(repaired, context(repaired.meta, True, 0), device).to_dict()

        after = runner.step("evaluate_repaired", {**data_key, "model": _file_hash(out / "repaired.safetensors")}, [],
                            run_after)

    report = PipelineReport(str(out), verdict(det), det["backdoor"],
                            tuple((p["source"], p["target"]) for p in det["pairs"]), EvaluateReport(**before),
                            EvaluateReport(**after) if after else None, time.perf_counter() - t_start,
                            tuple(runner.records), det, rep)
    write_json(out / "summary.json", report.to_dict())
    from ..reporting.report import render_report

    path = render_report(out)
    return replace(report, report_path=str(path))
