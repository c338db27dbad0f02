"""The tool's steps on in-memory objects: a loaded model, a data context, a config.

Each step calls one library function and returns a typed report (:mod:`.reports`); none
reads or writes files. Front ends (the CLI, ``soda run``, the study scripts, research
scripts) load the inputs with :mod:`.context`, call a step, and save what they want with
:mod:`soda_backdoor.artifacts` and :func:`soda_backdoor.models.save_model`.

"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, replace
from typing import Callable

import numpy as np
import torch

from ..analysis import AttributionConfig, activations, compute_neuron_effects, parse_layer
from ..analysis.split import split_after
from ..artifacts import DEFAULT_CALIBRATION, SampleSet, model_fingerprint, resolve_calibration
from ..data import normalize
from ..detection import CalibratedScore, Calibration, DetectionConfig, detect_backdoor
from ..detection.calibration import canonical_arch
from ..detection.errors import (ErrorConfig, ErrorCounts, ErrorDetection, ErrorReference, confident_errors,
                                detect_errors, shipped_reference)
from ..detection.variations import shipped_variation_reference, variation_excess, variation_rates
from ..errors import UserInputError
from ..models import LoadedModel, ModelMeta, create_model, get_model_spec
from ..reconstruction import ReconstructionConfig, reconstruct_inputs
from ..repair import BaselineRepairConfig, RepairConfig, mine_variations, repair_model, repair_with
from ..training import EvalResult, TrainConfig, evaluate_attack, evaluate_attack_shared, train_model
from ..training.train import predict, predict_shared
from ..utils import recalibrated_batchnorm, seed_everything
from .context import DataContext, class_inputs
from .reports import (BaselineRepairReport, DetectReport, EvaluateReport, ReconstructReport, RepairReport,
                      TrainReport)


def train(ctx: DataContext, config: TrainConfig, device: torch.device | str = "cpu", arch: str = "cnn",
          init: LoadedModel | None = None, init_name: str = "", progress: bool = False,
          on_epoch: Callable[[dict], None] | None = None) -> TrainReport:
    """Train a (semantic-backdoored or clean) model on ``ctx``.

    Args:
        ctx: the data and the attack to plant (``ctx.attack is None``: clean training).
        config: training settings (``ratio`` is set to 0 for clean training).
        device: where to train.
        arch: registry name of the architecture (ignored with ``init``).
        init: fine-tune this model instead of training a new one (the study's semtune).
        init_name: what ``init`` was (a path), recorded in the metadata.
        progress: progress bars.
        on_epoch: called with each epoch's record.
    """
    spec = ctx.data.spec
    seed_everything(config.seed)
    if init is not None:
        module, arch = init.module, init.meta.arch
    else:
        module = create_model(arch, spec.num_classes, spec.in_channels, spec.image_size)
    if ctx.attack is None and config.ratio:
        config = replace(config, ratio=0.0)
    result = train_model(module, ctx.data, ctx.splits, ctx.attack, config, spec.mean, spec.std, device,
                         progress, on_epoch)
    ev = evaluate_attack(module, ctx.data, ctx.splits, ctx.attack, spec.mean, spec.std, device)
    meta = ModelMeta(arch=get_model_spec(arch).name, num_classes=spec.num_classes, in_channels=spec.in_channels,
                     input_size=spec.image_size, mean=spec.mean, std=spec.std, dataset=spec.name,
                     attack=ctx.attack_name, train_config={**asdict(config), "init": init_name, "acc": ev.acc,
                                                          "asr": ev.asr})
    return TrainReport(meta.arch, spec.name, meta.attack, EvaluateReport.from_eval(ev, meta.attack), result.seconds,
                       result.history, config, LoadedModel(module, meta))


def evaluate(model: LoadedModel, ctx: DataContext, device: torch.device | str = "cpu") -> EvaluateReport:
    """ACC on the clean test split and ASR on the semantic test samples of ``ctx.attack``."""
    ev = evaluate_attack(model.module, ctx.data, ctx.splits, ctx.attack, model.meta.mean, model.meta.std, device)
    return EvaluateReport.from_eval(ev, ctx.attack_name)


def detect(model: LoadedModel, ctx: DataContext, config: DetectionConfig | None = None, layer: str | None = None,
           device: torch.device | str = "cpu", seed: int = 0, progress: bool = False,
           calibration: Calibration | str | None = DEFAULT_CALIBRATION,
           reference: ErrorReference | None = None) -> DetectReport:
    """Causal attribution and target/source detection (docs/method.md §2.2-2.3, docs/detection.md).

    With ``config.evidence == "errors"`` (the default) the verdict is the confident-error
    evidence (:mod:`soda_backdoor.detection.errors`): the model's confident errors on the
    dataset's whole test split (attack or no attack: the detector does not know it) against
    ``reference`` (default: the shipped one). Where the reference does not cover the
    dataset, the verdict falls back to the weight profile, and the report says so. The
    causal attribution always runs (its target scores are in the report); ``ctx.attack``
    only keeps the attack's semantic samples out of its clean analysis data.

    With a ``calibration`` the report also carries P(backdoor) and P(class is the target), or,
    for a model of an arch or dataset the calibration does not cover, the message saying so;
    the verdict is unchanged. ``calibration`` is a :class:`Calibration`, a file from ``soda
    zoo calibrate``, ``"default"`` (the shipped one, applied when the detection uses the
    settings and reference it was fitted on; otherwise the report says why there is no
    probability) or ``"none"``/``None``.
    """
    config = config or DetectionConfig()
    calibration = resolve_calibration(calibration)
    unfitted = ""
    if calibration is not None:
        unfitted = _check_calibration(calibration, config, layer, reference)
    t0 = time.perf_counter()
    seed_everything(seed)
    errors, note = None, ""
    if config.evidence == "errors":
        errors, note = confident_error_verdict(model, ctx, config.errors, reference, torch.device(device))
        if errors is None:
            warnings.warn(note, stacklevel=2)
    ref = parse_layer(model.module, layer)
    inputs = class_inputs(ctx, model.meta, config.attribution.num_samples, torch.device(device))
    result, effects = detect_backdoor(model.module, ref, inputs, ctx.data.num_classes, config, progress,
                                      find_sources=errors is None)
    calibrated = None
    if calibration is not None and unfitted and calibration.shipped:
        calibrated = CalibratedScore(None, (), unfitted, calibration.describe())
    elif calibration is not None:
        scores = errors.class_scores if errors is not None else result.target_test.anomaly_index
        calibrated = calibration.apply(scores, model.meta.arch, ctx.data.spec.name)
    return DetectReport(result, tuple(ctx.data.spec.class_names), time.perf_counter() - t0, effects,
                        calibrated=calibrated, errors=errors, note=note)


def confident_error_verdict(model: LoadedModel, ctx: DataContext, config: ErrorConfig,
                            reference: ErrorReference | None = None,
                            device: torch.device | str = "cpu") -> tuple[ErrorDetection | None, str]:
    """The confident-error verdict on the dataset's whole test split, and a note.

    ``(None, why)`` when ``reference`` (default: the shipped one) does not cover the dataset.
    """
    reference = reference or shipped_reference()
    entry, note = reference.for_model(model.meta.arch, ctx.data.spec.name)
    if entry is None:
        return None, note + "; the verdict comes from the weight profile (docs/detection.md)"
    counts = count_confident_errors(model, ctx, reference.threshold, config.recalibrate_bn, device)
    built = reference.provenance.get("recalibrate_bn")
    if built is not None and built != config.recalibrate_bn:
        note = "; ".join(x for x in (note, f"the reference counted its models' errors "
                                     f"{'with' if built else 'without'} re-estimated batch-norm statistics, "
                                     f"this detection {'with' if config.recalibrate_bn else 'without'}: build "
                                     "the reference with the same setting") if x)
    excess = None
    if config.variation_tau > 0:
        excess, why = variation_evidence(model, ctx, config, reference, device)
        note = "; ".join(x for x in (note, why) if x)
    return detect_errors(counts, entry, config, note, excess), note


def count_confident_errors(model: LoadedModel, ctx: DataContext, threshold: float, recalibrate_bn: bool,
                           device: torch.device | str = "cpu") -> ErrorCounts:
    """The model's confident errors on the dataset's whole test split; with ``recalibrate_bn``,
    with its batch-norm statistics first re-estimated on the defender's clean data (a copy;
    ``model`` is unchanged). What the detection counts, and what ``soda zoo reference`` counts."""
    module = model.module
    if recalibrate_bn:
        d = ctx.splits.defender
        module = recalibrated_batchnorm(module, normalize(ctx.data.x_train[d].to(device), model.meta.mean,
                                                          model.meta.std))
    x = normalize(ctx.data.x_test.to(device), model.meta.mean, model.meta.std)
    return confident_errors(module, x, ctx.data.y_test, ctx.data.num_classes, threshold)


def variation_evidence(model: LoadedModel, ctx: DataContext, config: ErrorConfig, reference: ErrorReference,
                       device: torch.device | str = "cpu") -> tuple[np.ndarray | None, str]:
    """``V[s, t]`` on the defender's clean data (:mod:`soda_backdoor.detection.variations`) against
    ``reference``'s variation rates, and a note.

    A reference file written before the variation rates existed has none: the shipped ones
    serve when they are on the same dataset, with a note; else the evidence is off.
    """
    ref, why = reference.variations, ""
    if ref is None:
        ref = shipped_variation_reference()
        if ref.dataset != ctx.data.spec.name:
            return None, (f"the confident-error reference holds no variation rates and none ship for "
                          f"{ctx.data.spec.name}: the variation evidence is off; build a reference with "
                          f"`soda zoo reference` (docs/detection.md)")
        why = (f"the confident-error reference holds no variation rates (a file from before them): compared "
               f"with the shipped ones of {ref.num_models} clean {ref.dataset} models; build the reference again "
               f"with `soda zoo reference` for rates of your own models")
    notes = [why]
    archs = ref.provenance.get("archs") or []
    if archs and canonical_arch(model.meta.arch) not in archs:
        notes.append(f"no variation rates of clean {model.meta.arch} models: compared with those of "
                     f"{', '.join(archs)}; build a reference for {model.meta.arch} with `soda zoo reference` for "
                     "a verdict of its own")
    if (config.variation_copies, config.variation_anchor) != (ref.copies, ref.anchor):
        notes.append(f"the variation reference was measured with {ref.copies} copies at anchor {ref.anchor:g}; "
                     f"this detection uses {config.variation_copies} at {config.variation_anchor:g}, so its rates "
                     "may not compare")
    why = "; ".join(x for x in notes if x)
    rate = defender_variation_rates(model, ctx, config.variation_copies, config.variation_anchor, device)
    return variation_excess(rate, ref), why


def defender_variation_rates(model: LoadedModel, ctx: DataContext, copies: int, anchor: float,
                             device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's variation rates on the defender's clean data, from a fixed seed (what the
    detection measures, and what ``soda zoo reference`` measures on clean models)."""
    d = ctx.splits.defender
    rate, _ = variation_rates(model.module, ctx.data.x_train[d].to(device), ctx.data.y_train[d],
                              ctx.data.num_classes, copies, anchor,
                              lambda v: normalize(v, model.meta.mean, model.meta.std),
                              torch.Generator().manual_seed(0))
    return rate


# The settings of a calibration file written before they existed: the variation evidence was
# off, the errors were counted with the batch-norm statistics as trained, and every pair's
# evidence counted from its first error.
UNRECORDED_SETTINGS = {"variation_tau": 0.0, "variation_copies": 10, "variation_anchor": 0.95,
                       "recalibrate_bn": False, "min_errors": 1}


def _check_calibration(calibration: Calibration, config: DetectionConfig, layer: str | None,
                       reference: ErrorReference | None = None) -> str:
    """Why ``calibration`` may not apply to a detection with these settings ("" when it does).

    A calibration of another detector or evidence is an error, one fitted on scores of other
    settings (the confident-error settings and reference, or the weight profile's layer and
    attribution) a warning; the shipped calibration instead is left out (the caller reports
    the returned message in place of a probability).
    """
    shipped = calibration.shipped
    if calibration.detector != "soda":
        raise UserInputError(f"the calibration maps the scores of detector {calibration.detector}, not soda's; "
                             "fit one with `soda zoo calibrate DIR --detector soda`")
    fitted = calibration.settings
    if not fitted:
        return ""
    evidence = (fitted.get("detector_config") or {}).get("evidence", "weights")
    if evidence != config.evidence:
        why = f"the calibration maps scores of the {evidence} evidence, this detection's verdict uses {config.evidence}"
        if not shipped:
            raise UserInputError(f"{why}; fit one on scores of this setting (`soda zoo calibrate`) or pass "
                                 f"--evidence {evidence}")
    elif evidence == "errors":
        ref = reference or shipped_reference()
        mine = json.loads(json.dumps({"errors": asdict(config.errors), "reference": ref.provenance.get("models_hash")}))
        theirs_errors = (fitted.get("detector_config") or {}).get("errors")
        if isinstance(theirs_errors, dict):  # a file from before some settings existed
            theirs_errors = {**UNRECORDED_SETTINGS, **theirs_errors}
        theirs = {"errors": theirs_errors,
                  "reference": (fitted.get("reference") or {}).get("models_hash")}
        why = _differences(mine, theirs)
    else:
        mine = json.loads(json.dumps({"layer": layer, "attribution": asdict(config.attribution)}))
        theirs = {"layer": fitted.get("layer"), "attribution": (fitted.get("detector_config") or {}).get("attribution")}
        why = _differences(mine, theirs)
    if why and shipped:
        return (f"no probability: the shipped calibration covers the default detector settings only (this "
                f"detection: {why}); fit one for these settings with `soda zoo calibrate` and pass --calibration")
    if why:
        warnings.warn(f"the calibration was fitted on scores of other detector settings (this detection: {why}), "
                      "so its probabilities may not apply; fit one again with `soda zoo calibrate`", stacklevel=3)
    return why


def _differences(mine: dict, theirs: dict, prefix: str = "") -> str:
    """``"tau 3.5 (fitted: 2.99), ..."``: the settings of ``mine`` that differ from ``theirs``."""
    out = []
    for key in dict.fromkeys([*mine, *(theirs or {})]):
        a, b = mine.get(key), (theirs or {}).get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key} {a} (fitted: {b})")
    return ", ".join(x for x in out if x)


def check_pair(source: int, target: int, num_classes: int) -> None:
    """Both classes in range and distinct."""
    for name, c in (("source", source), ("target", target)):
        if not 0 <= c < num_classes:
            raise UserInputError(f"--{name} {c} is out of range 0..{num_classes - 1}")
    if source == target:
        raise UserInputError("--source and --target must differ")


def reconstruct(model: LoadedModel, ctx: DataContext, source: int, target: int,
                config: ReconstructionConfig | None = None, device: torch.device | str = "cpu", seed: int = 0,
                progress: bool = False) -> ReconstructReport:
    """Reconstruct infected samples of ``source`` that the model sends to ``target`` (docs/method.md, 2.4).

    The starts are the clean training samples of ``source``, in an order drawn with ``seed``.
    """
    config = config or ReconstructionConfig()
    seed_everything(seed)
    check_pair(source, target, ctx.data.num_classes)
    idx = ctx.splits.clean_train[ctx.data.y_train[ctx.splits.clean_train] == source]
    gen = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=gen)]
    starts = normalize(ctx.data.x_train[idx].to(device), model.meta.mean, model.meta.std)
    rec = reconstruct_inputs(model.module, starts, idx, source, target, config, progress)
    return ReconstructReport(rec, model_fingerprint(model.module))


def rasr(module: torch.nn.Module, x: torch.Tensor, target: int) -> float:
    """R-ASR: the fraction of (held-out reconstructed, normalised) samples ``x`` sent to ``target``."""
    with torch.no_grad():
        return float((module(x).argmax(1) == target).float().mean())


def repair(model: LoadedModel, ctx: DataContext, source: int, target: int, samples: SampleSet,
           config: RepairConfig | None = None,
           layer: str | None = None, device: torch.device | str = "cpu", num_samples: int = 256,
           progress: bool = False, before: EvaluateReport | None = None) -> RepairReport:
    """Repair ``model`` in place with reconstructed samples (docs/method.md, 2.5).

    ``samples`` must be reconstructed for ``source -> target`` from this model. Every other
    sample is used for the repair, the rest are held out to measure R-ASR. ACC and ASR are
    measured on ``ctx`` before and after (ASR needs ``ctx.attack``; without one it is 0);
    ``before`` is :func:`evaluate` of this model on this data when the caller already has it.
    Without it, the model before is measured after the repair, beside the repaired one, in
    one pass of the layers the repair left untouched (:func:`_before_and_after`).
    """
    config = config or RepairConfig()
    t0 = time.perf_counter()
    seed_everything(config.seed)
    module, meta = model.module, model.meta
    check_pair(source, target, ctx.data.num_classes)
    samples.check(source, target, model_fingerprint(module), tuple(ctx.data.x_train.shape[1:]))
    x_fix, x_hold = (x.to(device) for x in samples.split())
    ref = parse_layer(module, layer)
    original = None if before is not None else copy.deepcopy(module)  # measured beside the repaired one, after
    rasr_before = rasr(module, x_hold, target)
    if config.top < 1.0:
        inputs = class_inputs(ctx, meta, num_samples, torch.device(device))
        effects = compute_neuron_effects(module, ref, {source: inputs[source]}, AttributionConfig(num_samples=num_samples))
        attribution = effects.for_class(source)[:, target]
    else:
        with torch.no_grad():
            h, _ = activations(module, ref, x_hold[:1])
        attribution = torch.ones(h.shape[1])
    dfd = ctx.splits.defender
    x_dfd, y_dfd = ctx.data.x_train[dfd].to(device), ctx.data.y_train[dfd].to(device)
    x_clean, y_clean = normalize(x_dfd, meta.mean, meta.std), y_dfd
    x_source = x_dfd[y_dfd == source].float() / 255  # uint8 images
    x_varied = mine_variations(module, x_source, target, config.variations, config.max_variations,
                               lambda x: normalize(x, meta.mean, meta.std), torch.Generator().manual_seed(config.seed),
                               config.variation_confidence, source, config.variation_anchor,
                               config.variation_generations)
    x_infected = torch.cat([x_fix, x_varied])
    guarded = config.feature_guard is not None and config.feature_samples > 0
    rng = _rng_state(device) if guarded else None
    if guarded and original is None:
        original = copy.deepcopy(module)
    result = repair_model(module, ref, attribution, x_clean, y_clean, x_infected, source, target, config, progress)
    guard_loss, fell_back = None, False
    if guarded and result.num_feature:  # the guard reads the evaluation pass, so it costs no pass of its own
        ev_before, ev_after, guard_loss = _guarded_before_and_after(model, original, result.tuned_from, ctx, device)
        if guard_loss <= config.feature_guard:
            before, after = before or ev_before, ev_after
        else:  # too costly on held-out data: the same repair without the feature samples
            module.load_state_dict(original.state_dict())
            _set_rng_state(rng, device)
            result = repair_model(module, ref, attribution, x_clean, y_clean, x_infected, source, target,
                                  replace(config, feature_samples=0), progress)
            fell_back = True
            before, after = _before_and_after(model, original, None, result.tuned_from, ctx, device)
    else:
        before, after = _before_and_after(model, original, before, result.tuned_from, ctx, device)
    rasr_after = rasr(module, x_hold, target)
    note = (f"repaired: source {source} -> target {target}, top {config.top}, epochs {config.epochs}, "
            f"lr {config.lr}, reg {config.reg}, {len(x_fix)} reconstructed samples"
            + (f" and {len(x_varied)} varied source samples" if len(x_varied) else "")
            + (f" and {result.num_feature} feature-space samples" if result.num_feature else "")
            + (f" (feature-space samples dropped: they cost {guard_loss:.2f} points of held-out accuracy, "
               f"more than the guard's {config.feature_guard})" if fell_back else "")
            + (f", layers after {result.tuned_from} tuned" if result.tuned_from else "")
            + (f", tuned in {result.config.precision}" if result.config.precision != "float32" else ""))
    return RepairReport(before, after, rasr_before, rasr_after, len(x_fix), len(x_hold), len(dfd), str(ref),
                        source, target, time.perf_counter() - t0, result, LoadedModel(module, meta.with_note(note)),
                        result.config, n_varied=len(x_varied), feature_guard_loss=guard_loss,
                        feature_fallback=fell_back)


def _rng_state(device: torch.device | str) -> tuple:
    """The global generators' state, so a second attempt starts where the first one did."""
    cuda = torch.device(device).type == "cuda"
    return torch.get_rng_state(), (torch.cuda.get_rng_state(torch.device(device)) if cuda else None)


def _set_rng_state(state: tuple, device: torch.device | str) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], torch.device(device))


def _shared_split(module: torch.nn.Module, original: torch.nn.Module, tuned_from: str | None):
    """``(after, before)`` split at ``tuned_from`` when the repair left every weight and buffer
    before the cut as it was (the frozen part can then run once for both), else ``None``."""
    if tuned_from is None:
        return None
    new, old = split_after(module, tuned_from), split_after(original, tuned_from)
    kept = old.prefix.state_dict()
    return (new, old) if all(torch.equal(v, kept[k]) for k, v in new.prefix.state_dict().items()) else None


def _labels_before_after(model: LoadedModel, original: torch.nn.Module, tuned_from: str | None, x: torch.Tensor,
                         device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels of ``original`` (the model before) and ``model`` (after) on images
    ``x``; the frozen part runs once when the repair left it as it was (:func:`_before_and_after`)."""
    meta = model.meta
    shared = _shared_split(model.module, original, tuned_from)
    if shared is not None:
        new, old = shared
        b, a = predict_shared(new.prefix, [old.tail, new.tail], x, meta.mean, meta.std, device=device)
        return b, a
    return predict(original, x, meta.mean, meta.std, device=device), predict(model.module, x, meta.mean, meta.std,
                                                                            device=device)


def _guard_loss(before: torch.Tensor, after: torch.Tensor, y: torch.Tensor) -> float:
    """Points of accuracy lost from ``before`` to ``after`` labels on the guard half: every
    other clean test sample (``RepairConfig.feature_guard``, docs/repair.md)."""
    before, after, y = before[::2], after[::2], y[::2]
    return 100.0 * ((before == y).float().mean() - (after == y).float().mean()).item() if len(y) else 0.0


def _guarded_before_and_after(model: LoadedModel, original: torch.nn.Module, tuned_from: str | None,
                              ctx: DataContext, device: torch.device | str
                              ) -> tuple[EvaluateReport, EvaluateReport, float]:
    """:func:`_before_and_after` with the labels kept, and the guard's loss read from them."""
    xc, yc = ctx.data.x_test[ctx.splits.clean_test], ctx.data.y_test[ctx.splits.clean_test]
    xs = ctx.data.x_test[ctx.splits.semantic_test] if ctx.attack is not None else ctx.data.x_test[:0]
    clean = _labels_before_after(model, original, tuned_from, xc, device)
    semantic = _labels_before_after(model, original, tuned_from, xs, device)
    evs = [EvalResult(acc=(c == yc).float().mean().item() if len(yc) else 0.0,
                      asr=(s_ == ctx.attack.target).float().mean().item() if len(xs) else 0.0,
                      n_clean=len(yc), n_semantic=len(xs)) for c, s_ in zip(clean, semantic)]
    ev_before, ev_after = (EvaluateReport.from_eval(ev, ctx.attack_name) for ev in evs)
    return ev_before, ev_after, _guard_loss(*clean, yc)


def _before_and_after(model: LoadedModel, original: torch.nn.Module | None, before: EvaluateReport | None,
                      tuned_from: str | None, ctx: DataContext,
                      device: torch.device | str) -> tuple[EvaluateReport, EvaluateReport]:
    """ACC and ASR of the model before the repair (``before``, or ``original``: an untouched
    copy) and after it (``model``).

    When the repair tuned only the layers after ``tuned_from`` and left every weight and
    buffer before the cut as it was, both models are measured in one pass whose frozen part
    runs once: the same labels as two passes (each half folded as the whole model is), at
    about one test pass plus two tails (docs/benchmarks.md).
    """
    if before is not None:
        return before, evaluate(model, ctx, device)
    assert original is not None
    shared = _shared_split(model.module, original, tuned_from)
    if shared is not None:
        new, old = shared
        evs = evaluate_attack_shared(new.prefix, [old.tail, new.tail], ctx.data, ctx.splits, ctx.attack,
                                     model.meta.mean, model.meta.std, device)
        ev_before, ev_after = (EvaluateReport.from_eval(ev, ctx.attack_name) for ev in evs)
        return ev_before, ev_after
    return evaluate(LoadedModel(original, model.meta), ctx, device), evaluate(model, ctx, device)


def repair_baseline(model: LoadedModel, ctx: DataContext, method: str, config: BaselineRepairConfig | None = None,
                    layer: str | None = None, device: torch.device | str = "cpu",
                    progress: bool = False) -> BaselineRepairReport:
    """Repair ``model`` in place with a baseline defense (docs/baselines.md) on the defender's clean subset.

    The same clean data budget as :func:`repair` (``ctx.splits.defender``, 5% of the training
    split), no reconstructed samples; ACC and ASR are measured on ``ctx`` before and after.
    """
    config = config or BaselineRepairConfig()
    t0 = time.perf_counter()
    seed_everything(config.seed)
    meta = model.meta
    before = evaluate(model, ctx, device)
    dfd = ctx.splits.defender
    x_clean = normalize(ctx.data.x_train[dfd].to(device), meta.mean, meta.std)
    y_clean = ctx.data.y_train[dfd].to(device)
    result = repair_with(method, model.module, layer, x_clean, y_clean, config, progress)
    after = evaluate(model, ctx, device)
    return BaselineRepairReport(method, before, after, len(dfd), time.perf_counter() - t0, result,
                                LoadedModel(model.module, meta.with_note(f"repaired by {method}")))
