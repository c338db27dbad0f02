#!/usr/bin/env python
"""Study-compatible front-end: ``python semantic_mitigation.py --option=... ...``.

Accepts the command lines of the original SODA study (sunbing7/SODA) and runs each option
through one step of :mod:`soda_backdoor.workflow`, on in-memory objects:

- ``causality_analysis``: causal attribution (``workflow.detect``); the attribution matrices are
  saved to ``<output_dir>/causality_<arch>_<data_name>_<t_attack>.npz``.
- ``detect``: prints ``[Detection] potential source class: X, target class: Y`` per pair, or
  ``No semantic backdoor detected!``.
- ``gen_trigger``: reconstructs infected samples (``workflow.reconstruct``) and writes the kept ones
  to ``<data_dir>/advsample_<t_attack>.npy`` (float32, N x C x H x W, model input space).
- ``remove``: reads that file, repairs the model (``workflow.repair``), writes
  ``<output_dir>/model_finetune_<t_attack>_last.th`` (a state_dict) and logs PoisonACC (ASR),
  RPoisonACC (R-ASR) and CleanACC before and after.
- ``test``: prints acc and asr (``workflow.evaluate``); ``--test_reverse=1`` adds R-ASR.
- ``export_h5`` (ours): writes a dataset in the study's HDF5 layout to ``--data_set``.

Models are read with ``torch.load(weights_only=True)``: ``--load_type=model`` (a pickled whole
module) is refused unless ``--trust-pickled-model`` is given. See docs/study_compat.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from .common import (COMMON_REASONS, COMMON_USED, CompatError, CompatParser, add_common_args, arch_spec,
                     check_load_type, check_num_class, check_poison_type, dataset_name, note, open_study_model,
                     progress_enabled, publish, report_ignored, resolve_attack, run_main, study_layer,
                     unpickle_state_dict, write_state_dict)

PROG = "semantic_mitigation.py"

OPTIONS = ("causality_analysis", "detect", "gen_trigger", "remove", "test", "export_h5")
UNSUPPORTED_OPTIONS = {
    "plot": "plots come from `soda run` / `soda report`",
    "pre_analysis": "the study's pre-analysis is not implemented here",
    "pre_ana_ifl": "the study's pre-analysis is not implemented here",
    "influence": "influence estimation is not implemented here; use causality_analysis",
    "dfr": "the DFR baseline is not implemented here",
    "drf": "the DFR baseline is not implemented here",
}

MODEL_FLAGS = {"in_model", "load_type", "json"}
USED = {
    "causality_analysis": COMMON_USED | MODEL_FLAGS | {"ana_layer", "num_sample", "poison_target"},
    "detect": COMMON_USED | MODEL_FLAGS | {"ana_layer", "num_sample", "confidence", "confidence2", "poison_target",
                                           "source_rule"},
    "gen_trigger": COMMON_USED | MODEL_FLAGS | {"data_dir", "potential_source", "poison_target", "lr", "reg", "epoch",
                                                "num_sample", "batch_size", "early_stop", "early_stop_th"},
    "remove": COMMON_USED | MODEL_FLAGS | {"data_dir", "potential_source", "poison_target", "lr", "reg", "epoch",
                                           "top", "ana_layer", "num_sample", "batch_size"},
    "test": COMMON_USED | MODEL_FLAGS | {"data_dir", "poison_target", "test_reverse"},
    "export_h5": {"option", "data_set", "data_dir", "data_name", "num_class", "quiet"},
}

REASONS = {
    **COMMON_REASONS,
    "plot": "plots come from `soda run` / `soda report`",
    "reanalyze": "the analysis is always recomputed",
    "resume": "not used by semantic_mitigation.py",
    "potential_target": "only the study's pre-analysis uses it",
    "inf_type": "influence estimation is not implemented",
    "num_subgrp": "influence estimation is not implemented",
    "cnt_per_grp": "influence estimation is not implemented",
    "data_dir": "only gen_trigger, remove and test --test_reverse=1 read or write advsample files",
}



def build_parser() -> argparse.ArgumentParser:
    p = CompatParser(prog=PROG, description="SODA detection and mitigation with the study's flags; a thin front-end "
                     "over soda_backdoor.cli.steps.",
                     epilog="examples (the study's README steps 2-4 for FMNIST/stripet):\n"
                            "  python semantic_mitigation.py --option=causality_analysis --arch=MobileNetV2 --ana_layer 4 "
                            "--num_sample=256 --in_model=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th "
                            "--output_dir=./save --t_attack=stripet --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST\n"
                            "  python semantic_mitigation.py --option=detect --confidence=3 --confidence2=2 ... (same flags)\n"
                            "  python semantic_mitigation.py --option=gen_trigger --lr=0.1 --potential_source=0 "
                            "--poison_target=2 --reg=0.9 --epoch=2000 --num_sample=100 --data_dir=./data/FMNIST ...\n"
                            "  python semantic_mitigation.py --option=remove --lr=0.01 --reg=0.0005 --epoch=5 --top=0.5 "
                            "--ana_layer 4 --potential_source=0 --poison_target=2 --data_dir=./data/FMNIST ...\n"
                            "  python semantic_mitigation.py --option=export_h5 --data_name=FMNIST "
                            "--data_set=./data/FMNIST/fmnist.h5",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", default="detect", choices=[*OPTIONS, *UNSUPPORTED_OPTIONS], help="the step to run")
    add_common_args(p)
    g = p.add_argument_group("mitigation flags of the study")
    g.add_argument("--in_model", default=None, help="model file: a state_dict (.th/.pt) or .safetensors")
    g.add_argument("--load_type", default=None, choices=["state_dict", "model"],
                   help="state_dict (default) or model (a pickled module: refused without --trust-pickled-model)")
    g.add_argument("--ana_layer", nargs="+", default=None,
                   help="the study's analysis-layer number (per architecture, see docs/study_compat.md), or a "
                        "layer name; default: the input of the last Linear layer")
    g.add_argument("--num_sample", type=int, default=None,
                   help="clean samples per class (causality_analysis, detect, remove; default 256) or samples to "
                        "keep (gen_trigger; default 100)")
    g.add_argument("--confidence", type=float, default=None, help="MAD threshold for targets (tau_target, default 4.5)")
    g.add_argument("--confidence2", type=float, default=None, help="MAD threshold for sources (tau_source, default 2)")
    g.add_argument("--potential_source", type=int, default=None, help="source class (gen_trigger, remove)")
    g.add_argument("--potential_target", default=None, help="ignored")
    g.add_argument("--reg", type=float, default=None, help="gen_trigger: weight of mean(x^2) (default 0.9); "
                   "remove: weight of -CE(reconstructed, target) (default 0.01)")
    g.add_argument("--top", type=float, default=None, help="remove: fraction of neurons kept by the mask (default 1.0)")
    g.add_argument("--early_stop", type=int, default=None, help="gen_trigger: 1 (default) = stop a sample at "
                   "--early_stop_th, 0 = run all --epoch steps")
    g.add_argument("--early_stop_th", type=float, default=None, help="gen_trigger: target probability to stop at "
                   "(default 0.99)")
    g.add_argument("--test_reverse", type=int, default=None, help="test: 1 = also R-ASR on advsample_<t_attack>.npy")
    g.add_argument("--plot", type=int, default=None, help="ignored")
    g.add_argument("--reanalyze", type=int, default=None, help="ignored (always recomputed)")
    g.add_argument("--inf_type", default=None, help="ignored")
    g.add_argument("--num_subgrp", type=int, default=None, help="ignored")
    g.add_argument("--cnt_per_grp", type=float, default=None, help="ignored")
    x = p.add_argument_group("extensions")
    x.add_argument("--source_rule", default=None, choices=["fastest", "one_way", "mean_logit", "asymmetry"],
                   help="detect: how the source is chosen (default fastest; mean_logit is the study's)")
    x.add_argument("--json", default=None, help="also write the step's result as JSON here")
    return p


# ----------------------------------------------------------------------------- helpers

def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        hint = " (the classes reported by --option=detect)" if any("source" in m or "target" in m for m in missing) else ""
        raise CompatError(f"--option={args.option} needs {', '.join(missing)}{hint}")


def _advsample_path(args: argparse.Namespace, tag: str) -> Path:
    """``<data_dir>/advsample_<t_attack>.npy``; data_dir defaults to the folder of --data_set."""
    if args.data_dir is not None:
        folder = Path(args.data_dir)
    elif args.data_set is not None:
        folder = Path(args.data_set).parent
    else:
        folder = Path("./data")
    return folder / f"advsample_{tag}.npy"


def _emit_json(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        from soda_backdoor.utils import write_json

        write_json(args.json, result)


def _read_advsample(npy: Path, source: int, target: int):
    """The study's ``advsample_*.npy`` as the samples the repair step takes."""
    import numpy as np
    import torch

    from soda_backdoor.artifacts import SampleSet

    if not npy.is_file():
        raise CompatError(f"{npy} does not exist; run --option=gen_trigger first (with the same --data_dir and "
                          "--t_attack)")
    try:
        samples = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CompatError(f"cannot read {npy} as a numpy array: {exc}") from exc
    if samples.ndim != 4 or len(samples) < 2:
        raise CompatError(f"{npy} holds {len(samples) if samples.ndim else 0} sample(s) of shape "
                          f"{tuple(samples.shape[1:])}; remove needs at least 2 samples of shape N x C x H x W "
                          "(rerun --option=gen_trigger with more --epoch or --num_sample)")
    return SampleSet(torch.from_numpy(np.asarray(samples, dtype=np.float32)), source, target, None, str(npy))


class Context:
    """What every option needs, resolved from the study's flags: the model and the data, loaded."""

    def __init__(self, args: argparse.Namespace) -> None:
        from soda_backdoor.data import load_dataset
        from soda_backdoor.utils import resolve_device
        from soda_backdoor.workflow import DataContext

        self.args = args
        self.arch = args.arch or "resnet18"
        self.spec = arch_spec(self.arch)
        self.data_name = args.data_name or "CIFAR10"
        self.dataset = dataset_name(self.data_name)
        check_num_class(args.num_class, self.dataset)
        self.atk = resolve_attack(PROG, args.t_attack, self.dataset, args.attack_file, args.poison_target)
        self.tag = args.t_attack if args.t_attack is not None else (self.atk.name if self.atk else "clean")
        self.layer = study_layer(self.arch, args.ana_layer, PROG)
        self.device = resolve_device(args.device or "auto")
        self.seed = 0 if args.seed is None else args.seed
        self.out_dir = Path(args.output_dir or "./save")
        self.progress = progress_enabled(args)
        if args.in_model is None:
            raise CompatError(f"--option={args.option} needs --in_model=PATH (the model to analyse)")
        data = load_dataset(self.dataset, args.data_set)
        self.model = open_study_model(args.in_model, args.load_type or "state_dict", bool(args.trust_pickled_model),
                                      data, self.device, self.arch, PROG)
        self._data = data
        self._contexts: dict[int, DataContext] = {}

    def data(self, seed: int = 0):
        """The data divided for the attack, the defender subset drawn with ``seed``."""
        from soda_backdoor.workflow import DataContext

        if seed not in self._contexts:
            self._contexts[seed] = DataContext.build(self._data, self.atk, seed)
        return self._contexts[seed]


# ----------------------------------------------------------------------------- options

def _detection_config(args: argparse.Namespace):
    from soda_backdoor.analysis import AttributionConfig
    from soda_backdoor.detection import DetectionConfig
    from soda_backdoor.errors import build_config

    base = DetectionConfig()
    num = base.attribution.num_samples if args.num_sample is None else args.num_sample
    attribution = build_config(AttributionConfig, {"num_samples": "--num_sample"}, num_samples=num,
                               chunk_size=base.attribution.chunk_size)
    return build_config(DetectionConfig, {"tau_target": "--confidence", "tau_source": "--confidence2",
                                          "source_rule": "--source_rule"},
                        tau_target=base.tau_target if args.confidence is None else args.confidence,
                        tau_source=base.tau_source if args.confidence2 is None else args.confidence2,
                        source_rule=args.source_rule or base.source_rule, attribution=attribution)


def _detect(ctx: Context):
    from soda_backdoor.workflow import detect

    config = _detection_config(ctx.args)
    rep = detect(ctx.model, ctx.data(0), config, ctx.layer, ctx.device, ctx.seed, ctx.progress)
    return rep, rep.to_dict() | {"model": str(ctx.args.in_model)}


def option_causality_analysis(ctx: Context) -> int:
    from soda_backdoor.artifacts import save_effects

    args = ctx.args
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    effects = ctx.out_dir / f"causality_{ctx.arch}_{ctx.data_name}_{ctx.tag}.npz"
    start = time.perf_counter()
    rep, res = _detect(ctx)
    save_effects(effects, rep.effects)
    publish(effects)
    print(f"Analysed layer {res['layer']} ({res['attribution_method']}) on {len(res['target_scores'])} classes")
    print(f"attribution matrices saved to {effects}")
    print(f"Causality analysis time: {time.perf_counter() - start:.2f}")
    _emit_json(args, {**res, "effects": str(effects)})
    return 0


def option_detect(ctx: Context) -> int:
    from soda_backdoor.reporting.text import format_detection

    start = time.perf_counter()
    _, res = _detect(ctx)
    print(format_detection(res))
    if not res["pairs"]:
        print("No semantic backdoor detected!")
    for pair in res["pairs"]:
        print(f"[Detection] potential source class: {int(pair['source'])}, target class: {int(pair['target'])}")
    print(f"Detection time:{time.perf_counter() - start:.2f}")
    _emit_json(ctx.args, res)
    return 0


def option_gen_trigger(ctx: Context) -> int:
    import numpy as np

    from soda_backdoor.errors import build_config
    from soda_backdoor.reconstruction import ReconstructionConfig
    from soda_backdoor.utils import write_atomic
    from soda_backdoor.workflow import reconstruct

    args = ctx.args
    _require(args, "potential_source", "poison_target")
    base = ReconstructionConfig()
    threshold = base.threshold if args.early_stop_th is None else args.early_stop_th
    if args.early_stop_th is not None and not 0 < args.early_stop_th <= 1:
        raise CompatError(f"--early_stop_th must be in (0, 1], got {args.early_stop_th}")
    if args.early_stop is not None and not args.early_stop:
        threshold = 2.0  # never reached: a probability is at most 1, so every sample runs all --epoch steps
    flags = {"steps": "--epoch", "lr": "--lr", "reg": "--reg", "threshold": "--early_stop_th",
             "num_keep": "--num_sample", "batch_size": "--batch_size"}
    config = build_config(ReconstructionConfig, flags, steps=base.steps if args.epoch is None else args.epoch,
                          lr=base.lr if args.lr is None else args.lr, reg=base.reg if args.reg is None else args.reg,
                          threshold=threshold,
                          num_keep=base.num_keep if args.num_sample is None else args.num_sample,
                          batch_size=base.batch_size if args.batch_size is None else args.batch_size)
    rep = reconstruct(ctx.model, ctx.data(ctx.seed), args.potential_source, args.poison_target, config, ctx.device,
                      ctx.seed, ctx.progress)
    samples = np.ascontiguousarray(rep.reconstruction.samples.numpy(), dtype=np.float32)
    dest = _advsample_path(args, ctx.tag)
    write_atomic(dest, lambda p: np.save(str(p), samples))
    publish(dest)
    res = rep.to_dict()
    print(f"kept {res['kept']} of {res['tried']} source-class samples (class {args.potential_source} -> "
          f"{args.poison_target}) in {res['seconds']:.1f}s, mean {res['mean_steps']:.0f} steps")
    print(f"saved {dest} {tuple(samples.shape)}")
    if res["kept"] < 2:
        note(PROG, f"only {res['kept']} sample(s) kept; --option=remove needs at least 2 (raise --epoch or "
                   "--num_sample, or check --potential_source/--poison_target)")
    _emit_json(args, {**res, "samples": str(dest)})
    return 0


def option_remove(ctx: Context) -> int:
    import logging

    from soda_backdoor.errors import build_config
    from soda_backdoor.repair import RepairConfig
    from soda_backdoor.workflow import repair

    args = ctx.args
    _require(args, "potential_source", "poison_target")
    if args.num_sample is not None and args.num_sample < 1:
        raise CompatError(f"--num_sample must be at least 1, got {args.num_sample}")
    base = RepairConfig()
    batch = base.batch_size if args.batch_size is None else args.batch_size
    if batch <= base.num_recon:
        raise CompatError(f"--batch_size must exceed {base.num_recon} (each batch holds {base.num_recon} "
                          f"reconstructed samples), got {batch}")
    flags = {"top": "--top", "epochs": "--epoch", "lr": "--lr", "reg": "--reg", "batch_size": "--batch_size"}
    config = build_config(RepairConfig, flags, top=base.top if args.top is None else args.top,
                          epochs=base.epochs if args.epoch is None else args.epoch,
                          lr=base.lr if args.lr is None else args.lr, reg=base.reg if args.reg is None else args.reg,
                          batch_size=batch, seed=ctx.seed)
    samples = _read_advsample(_advsample_path(args, ctx.tag), args.potential_source, args.poison_target)
    rep = repair(ctx.model, ctx.data(config.seed), args.potential_source, args.poison_target, samples, config,
                 ctx.layer, ctx.device, 256 if args.num_sample is None else args.num_sample, ctx.progress)
    res = rep.to_dict()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    dest = write_state_dict(rep.model.module, ctx.out_dir / f"model_finetune_{ctx.tag}_last.th")

    log = logging.getLogger("semantic_mitigation")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s] - %(message)s", "%Y/%m/%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(ctx.out_dir / "output.log")]
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    try:
        log.info("Stage \t PoisonACC \t RPoisonACC \t CleanACC")
        log.info("before \t %.4f \t %.4f \t %.4f", res["asr_before"], res["rasr_before"], res["acc_before"])
        log.info("after \t %.4f \t %.4f \t %.4f", res["asr_after"], res["rasr_after"], res["acc_after"])
        log.info("layer %s, kept %d of %d neurons (top %g), %d epoch(s), %d repair / %d held-out reconstructed "
                 "samples, %d clean samples", res["layer"], res["neurons_kept"], res["num_neurons"], config.top,
                 config.epochs, res["n_repair_samples"], res["n_heldout_samples"], res["n_defender"])
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
    print(f"saved {dest}")
    print(f"Remove time:{res['seconds']:.2f}")
    _emit_json(args, {**res, "model": str(dest)})
    return 0


def option_test(ctx: Context) -> int:
    import numpy as np
    import torch

    from soda_backdoor import workflow

    args = ctx.args
    res = workflow.evaluate(ctx.model, ctx.data(0), ctx.device).to_dict()
    rasr = None
    if args.test_reverse:
        _require(args, "poison_target")
        path = _advsample_path(args, ctx.tag)
        if not path.is_file():
            raise CompatError(f"--test_reverse=1: {path} does not exist; run --option=gen_trigger first")
        samples = np.load(path, allow_pickle=False)
        if samples.ndim != 4 or len(samples) == 0:
            raise CompatError(f"{path}: expected a non-empty N x C x H x W array, got shape {samples.shape}")
        rasr = workflow.rasr(ctx.model.module, torch.from_numpy(samples).float().to(ctx.device), args.poison_target)
        res["rasr"] = rasr
    print("PoisonACC \t RPoisonACC \t CleanACC")
    print(f"{res['asr']:.4f} \t {rasr if rasr is not None else 0:.4f} \t {res['acc']:.4f}")
    line = f"acc: {res['acc']:.4f} ({res['n_clean']} clean test samples), asr: {res['asr']:.4f} " \
           f"({res['n_semantic']} semantic test samples, attack {res['attack']})"
    if rasr is not None:
        line += f", rasr: {rasr:.4f}"
    print(line)
    _emit_json(args, res)
    return 0


def option_export_h5(args: argparse.Namespace) -> int:
    """Write a dataset (read from --data_dir or the standard places) in the study's HDF5 layout."""
    from soda_backdoor.data import load_dataset
    from soda_backdoor.data.datasets import H5_LAYOUTS, write_h5

    if args.data_set is None:
        raise CompatError("--option=export_h5 needs --data_set=PATH.h5 (the file to write)")
    dest = Path(args.data_set)
    if dest.suffix.lower() not in (".h5", ".hdf5"):
        raise CompatError(f"--data_set={dest} must end in .h5 or .hdf5")
    if dest.exists():
        raise CompatError(f"{dest} exists; remove it first (export_h5 never overwrites a dataset)")
    dataset = dataset_name(args.data_name or "FMNIST")
    check_num_class(args.num_class, dataset)
    data = load_dataset(dataset, args.data_dir)
    written = write_h5(data, dest)
    publish(dest)
    group = H5_LAYOUTS[dataset]["group"]
    where = f"group '{group}' with " if group else ""
    print(f"wrote {dest}: {where}{', '.join(f'{k} {shape}' for k, shape in written.items())} (from {data.source})")
    return 0


OPTION_FUNCS = {"causality_analysis": option_causality_analysis, "detect": option_detect,
                "gen_trigger": option_gen_trigger, "remove": option_remove, "test": option_test}


def execute(args: argparse.Namespace) -> int:
    if args.option in UNSUPPORTED_OPTIONS:
        raise CompatError(f"--option={args.option}: {UNSUPPORTED_OPTIONS[args.option]}; valid: {', '.join(OPTIONS)}")
    check_poison_type(args)
    used = set(USED[args.option])
    if args.option == "test" and not args.test_reverse:
        used.discard("data_dir")
    report_ignored(PROG, args, used, REASONS)
    if args.option == "export_h5":
        return option_export_h5(args)
    if args.load_type is not None:
        check_load_type(args.load_type)
    if args.load_type == "model" and not args.trust_pickled_model and args.in_model is not None:
        # Refuse before anything else touches the file.
        unpickle_state_dict(args.in_model, False, PROG)
    return OPTION_FUNCS[args.option](Context(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python semantic_mitigation.py --option=... ...``."""
    return run_main(PROG, build_parser(), execute, argv)


if __name__ == "__main__":
    sys.exit(main())
