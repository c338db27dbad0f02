"""``soda``: one subcommand per step of the tool, and ``run`` for the whole pipeline.

Every subcommand builds a config, calls one step function, and writes its outputs. Bad input
exits 2 with a one-line message on stderr; success exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import replace
from typing import Sequence

from ..errors import UserInputError, build_config

# soda_backdoor.artifacts.DEFAULT_CALIBRATION (not imported: it pulls in torch before argparse runs)
DEFAULT_CALIBRATION = "default"
CALIBRATION_HELP = ("'default' (the shipped calibration: cnn and lenet on fmnist, the default detector settings), "
                    "a file from `soda zoo calibrate`, or 'none'")
# soda_backdoor.repair.repair.PRECISIONS (the same reason)
REPAIR_PRECISIONS = ("auto", "float32", "bfloat16")

EXAMPLES = """examples:
  soda train --dataset fmnist --attack stripet --arch cnn --seed 0 --out m.safetensors
  soda evaluate --model m.safetensors --dataset fmnist --attack stripet --json eval.json
  soda detect --model m.safetensors --dataset fmnist --json detect.json
  soda detect --model m.safetensors --dataset fmnist --calibration calib.json   # with P(backdoor)
  soda reconstruct --model m.safetensors --dataset fmnist --source 0 --target 2 --out x.npz --json rec.json
  soda repair --model m.safetensors --dataset fmnist --source 0 --target 2 --samples x.npz \\
      --attack stripet --out repaired.safetensors --json repair.json
  soda run                      # the whole pipeline on real Fashion-MNIST into runs/default
  soda zoo build zoo/dev.toml --out zoos/dev --jobs 2 && soda zoo score zoos/dev
  soda audit zoos/dev/models --dataset fmnist --out audits/dev --jobs 2
"""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class _Deprecated(argparse.Action):
    """Store like the option it aliases; an old spelling prints a one-line warning."""

    def __init__(self, option_strings, dest, deprecated=(), **kwargs):
        self.deprecated = tuple(deprecated)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            sys.stderr.write(f"{parser.prog}: warning: {option_string} is deprecated; use {self.option_strings[0]}\n")
        setattr(namespace, self.dest, values)


def _option(g, new: str, old: str, prefer_new: bool, **kwargs) -> None:
    """``--new`` and ``--old`` for one setting; in ``soda run`` the old spelling is deprecated."""
    names = [new, old] if prefer_new else [old, new]
    if prefer_new:
        kwargs["help"] = f"{kwargs['help']} (old spelling {old}, deprecated)"
    g.add_argument(*names, dest=old.lstrip("-").replace("-", "_"), action=_Deprecated, metavar="N",
                   deprecated=(old,) if prefer_new else (), **kwargs)


def _common(p: argparse.ArgumentParser, data: bool = True, model: bool = False) -> None:
    g = p.add_argument_group("common")
    if model:
        g.add_argument("--model", required=True, help="model file (.safetensors, or a .th/.pt state_dict with --arch)")
        g.add_argument("--arch", default=None, help="architecture of a state_dict without metadata")
    if data:
        g.add_argument("--dataset", default="fmnist", help="dataset name: fmnist, cifar10, gtsrb, mnistm, mnist")
        g.add_argument("--data-dir", default=None, help="folder or file with the dataset (default: standard places)")
        g.add_argument("--attack", default=None, help="semantic attack name from the registry, or 'none' "
                       "(default for a given model: the attack in its metadata; only evaluation and repair "
                       "need it)")
        g.add_argument("--attack-file", default=None, help="JSON file of attacks (schema of semantic_attacks.json)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--json", default=None, help="write the result as JSON here")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _detect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection")
    g.add_argument("--layer", default=None, help="analysis layer: a module name, or NAME:input "
                   "(default: the input of the last Linear layer)")
    g.add_argument("--num-samples", type=int, default=256, help="clean samples per class (default 256)")
    g.add_argument("--chunk-size", type=int, default=1024, help="rows per forward pass of the rest of the network")
    g.add_argument("--tau-target", type=float, default=None, help="MAD threshold for targets of the weight profile (default 4.5; "
                   "the verdict with --evidence weights)")
    g.add_argument("--tau-source", type=float, default=None, help="MAD threshold reported for sources (default 2.0)")
    g.add_argument("--source-rule", default=None, help="with --evidence weights, how the source class is "
                   "chosen: fastest (default), one_way, mean_logit (the study's) or asymmetry; docs/method.md section 2.3")
    g.add_argument("--effects", default=None, help="save the attribution matrices (.npz) here")
    g.add_argument("--evidence", default=None, choices=["errors", "weights"],
                   help="what the verdict rests on: errors (default: confident errors on the test split against "
                        "a reference of clean models) or weights (the weight profile and a source rule, as the "
                        "study); see docs/detection.md")
    g.add_argument("--tau-errors", type=float, default=None,
                   help="confident-error evidence (-log10 p) above which a pair is flagged (default 2.99, "
                        "chosen for the nbpair null; 2.45 was the poisson null's)")
    g.add_argument("--errors-null", default=None, choices=["nbpair", "poisson"],
                   help="null of a pair's confident-error count: nbpair (default: negative binomial with the "
                        "pair's spread over the reference models) or poisson; docs/detection.md")
    g.add_argument("--reference", default=None, help="a reference of clean models from `soda zoo reference`: "
                   "their confident errors and variation rates (default: the shipped one, cnn and lenet on fmnist)")
    g.add_argument("--variation-tau", type=float, default=None,
                   help="also flag a target that natural variations of another class reach this much more often "
                        "than in any clean reference model (default 0.23, chosen on the dev zoo; 0: off, the "
                        "confident errors alone); docs/detection.md")
    g.add_argument("--min-errors", type=int, default=None,
                   help="confident errors a pair needs to be flagged (default 3: two can be chance on a pair "
                        "the reference almost never confuses; below it the evidence is capped at the threshold; "
                        "1: no minimum); docs/detection.md")
    g.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="count the confident errors with the model's batch-norm statistics re-estimated on the "
                        "defender's clean data (default: yes; no effect without batch norm); docs/detection.md")


def _recon_args(p: argparse.ArgumentParser, prefixed: bool = False) -> None:
    g = p.add_argument_group("reconstruction")
    _option(g, "--recon-steps", "--steps", prefixed, type=int, default=2000,
            help="max optimisation steps per sample (study --epoch)")
    g.add_argument("--recon-lr", type=float, default=0.1, help="learning rate of the input optimisation")
    g.add_argument("--recon-reg", type=float, default=0.9, help="weight of mean(x^2) (study --reg)")
    _option(g, "--recon-threshold", "--threshold", prefixed, type=float, default=0.99,
            help="stop once the target probability reaches this")
    g.add_argument("--num-keep", type=int, default=100, help="samples to keep (study --num_sample)")
    _option(g, "--recon-batch", "--batch-size", prefixed, type=int, default=128, help="starts optimised at once")
    g.add_argument("--all-starts", action="store_true", help="run every start to the end of its budget, as the "
                   "study does (default: stop the slow ones once enough have reached the threshold)")
    g.add_argument("--recon-max-tries", type=int, default=None, help="try at most this many source samples, "
                   "even if fewer than --num-keep reached the target (default: all of them); bounds the cost on a "
                   "weak backdoor, where most starts use the whole step budget")


def _repair_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repair")
    g.add_argument("--top", type=float, default=1.0, help="fraction of neurons kept by a mask (default 1.0: no "
                   "mask, every neuron is fine-tuned)")
    g.add_argument("--repair-epochs", type=int, default=10, help="fine-tuning epochs over the clean subset "
                   "(default 10)")
    g.add_argument("--repair-lr", type=float, default=0.001, help="fine-tuning learning rate")
    g.add_argument("--repair-reg", type=float, default=0.01, help="weight of -CE(reconstructed, target)")
    g.add_argument("--bn-train", action="store_true", help="update batch-norm statistics while fine-tuning "
                   "(default: frozen)")
    g.add_argument("--tune-from", default="auto", metavar="LAYER", help="fine-tune only the layers after this "
                   "module (see `soda layers`); auto (default): the cut nearest the output that leaves half of "
                   "the weights to tune; all: every layer")
    g.add_argument("--variations", type=int, default=10, help="varied copies (intensity, zoom, aspect, shift, "
                   "blur) of each clean source sample tried; those sent to the target are repaired with the "
                   "reconstructed samples (default 10; 0: off; docs/repair.md)")
    g.add_argument("--feature-samples", type=int, default=0, metavar="N", help="also move up to N clean source "
                   "samples to the target at the tuning cut (feature space) and repair them with the reconstructed "
                   "ones: 100 removed 10 of 14 dev-zoo backdoors against 8, 14 of 16 on the test zoo either way, "
                   "at about 0.1 point more accuracy lost (default 0: off; docs/repair.md)")
    g.add_argument("--feature-guard", type=_points, default=1.5, metavar="POINTS", help="keep the repair with "
                   "feature samples only if it costs at most POINTS of clean accuracy on half of the held-out test "
                   "split, else repair without them (default 1.5; none: keep it whatever it costs)")
    g.add_argument("--repair-precision", choices=REPAIR_PRECISIONS, default="auto", help="precision of the tuning's "
                   "forward passes: bfloat16 is faster on CPUs with AVX512-BF16 or AMX and on recent GPUs, slower "
                   "elsewhere; auto takes it only there; weights and measurements stay float32 (default auto; "
                   "docs/repair.md)")


def _train_args(p: argparse.ArgumentParser, prefixed: bool = False) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--arch", default="cnn", help="architecture (see `soda models`)")
    _option(g, "--train-epochs", "--epochs", prefixed, type=int, default=None, help="epochs (default 12)")
    _option(g, "--train-lr", "--lr", prefixed, type=float, default=None, help="learning rate (default 0.05)")
    g.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where lr x0.1 (default 50%%, 75%%)")
    g.add_argument("--ratio", type=float, default=0.3125, help="poisoned fraction of each batch")
    _option(g, "--train-batch", "--batch", prefixed, type=int, default=64, help="batch size")
    g.add_argument("--source-blend", type=float, default=None,
                   help="blend each poisoned sample with a random clean source-class sample, with a weight "
                        "up to this (0 = off, the study's recipe; default 0.5)")
    g.add_argument("--init", default=None, help="fine-tune this checkpoint instead of training from scratch (semtune)")


# ----------------------------------------------------------------------------- subcommands
# Each subcommand registers itself in one function: flags, then set_defaults(func=...).

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a semantic-backdoored (or clean) model")
    _common(p)
    _train_args(p)
    p.add_argument("--out", required=True, help="output model file (.safetensors)")
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="clean accuracy and attack success rate")
    _common(p, model=True)
    p.set_defaults(func=_cmd_evaluate)


def _calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help=f"P(backdoor) and P(class is the target) beside the verdict: {CALIBRATION_HELP}")


def _add_detect(sub) -> None:
    p = sub.add_parser("detect", help="is there a semantic backdoor, and which classes?")
    _common(p, model=True)
    _detect_args(p)
    _calibration_arg(p)
    p.set_defaults(func=_cmd_detect)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="synthesise source-class inputs the model sends to the target")
    _common(p, model=True)
    p.add_argument("--source", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--png", default=None, help="PNG grid of starts and reconstructions (default: OUT with .png)")
    _recon_args(p)
    p.set_defaults(func=_cmd_reconstruct)


def _add_repair(sub) -> None:
    p = sub.add_parser("repair", help="remove the backdoor by fine-tuning on reconstructed samples",
                       description="Fine-tune the model on a clean defender subset plus reconstructed samples "
                                   "and the natural variations of clean source samples that the model sends to "
                                   "the target (--variations), pushed away from the target. By default every neuron is tuned (no mask); "
                                   "--top < 1 tunes only that fraction of the neurons at --layer. --method picks a "
                                   "baseline defense instead, on the same clean budget (docs/baselines.md).")
    _common(p, model=True)
    p.add_argument("--method", default="soda", choices=["soda", "finetune", "fineprune", "nad", "anp"],
                   help="soda (default: needs --source, --target, --samples), or a baseline on the same clean "
                        "budget: finetune, fineprune (Liu et al. 2018), nad (Li et al. 2021), anp (Wu and Wang "
                        "2021); see docs/baselines.md")
    p.add_argument("--source", type=int, default=None)
    p.add_argument("--target", type=int, default=None)
    p.add_argument("--samples", default=None, help=".npz from `soda reconstruct`")
    p.add_argument("--out", required=True, help="repaired model file (.safetensors)")
    p.add_argument("--layer", default=None, help="layer of the mask (default: input of the last Linear)")
    _repair_args(p)
    p.set_defaults(func=_cmd_repair)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: train -> detect -> reconstruct -> repair -> report")
    _common(p)
    _train_args(p, prefixed=True)
    _detect_args(p)
    _recon_args(p, prefixed=True)
    _repair_args(p)
    p.add_argument("--model", default=None, help="audit this model instead of training one")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/default)")
    p.add_argument("--force", action="store_true", help="redo every step even if its results are current")
    _calibration_arg(p)
    p.set_defaults(func=_cmd_run)



def _add_zoo(sub) -> None:
    from .zoo import add_zoo_parser

    add_zoo_parser(sub, _Parser, _common, _detect_args)


def _add_audit(sub) -> None:
    from .audit import add_audit_parser

    add_audit_parser(sub, _Parser, _common, _detect_args, _recon_args, _repair_args)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="re-render DIR/report.html from a run folder")
    p.add_argument("dir", help="run folder written by `soda run`")
    p.set_defaults(func=_cmd_report)


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="list the layer names of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--arch", default=None)
    p.add_argument("--dataset", default=None)
    p.set_defaults(func=_cmd_layers)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=_cmd_models)


def _add_attacks(sub) -> None:
    p = sub.add_parser("attacks", help="list the shipped semantic attacks")
    p.set_defaults(func=_cmd_attacks)


SUBCOMMANDS = (_add_train, _add_evaluate, _add_detect, _add_reconstruct, _add_repair, _add_run, _add_zoo, _add_audit,
               _add_report,
               _add_layers, _add_models, _add_attacks)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soda", description="SODA: detect and remove semantic backdoors in image classifiers.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# ----------------------------------------------------------------------------- flags -> configs

def _device(args):
    from ..utils import resolve_device

    return resolve_device(args.device)


def _emit(args, result: dict, summary: str) -> None:
    from ..utils import write_json

    if getattr(args, "json", None):
        write_json(args.json, result)
    print(summary)


def _detection_config(args):
    from ..analysis import AttributionConfig
    from ..detection import DetectionConfig
    from ..detection.errors import ErrorConfig

    base = DetectionConfig()
    attribution = build_config(AttributionConfig, {"num_samples": "--num-samples", "chunk_size": "--chunk-size"},
                         num_samples=args.num_samples, chunk_size=args.chunk_size)
    errors = build_config(ErrorConfig, {"tau": "--tau-errors", "null": "--errors-null",
                                        "variation_tau": "--variation-tau", "min_errors": "--min-errors"},
                          tau=base.errors.tau if args.tau_errors is None else args.tau_errors,
                          null=args.errors_null or base.errors.null,
                          variation_tau=(base.errors.variation_tau if getattr(args, "variation_tau", None) is None
                                         else args.variation_tau),
                          recalibrate_bn=(base.errors.recalibrate_bn if getattr(args, "recalibrate_bn", None) is None
                                          else args.recalibrate_bn),
                          min_errors=(base.errors.min_errors if getattr(args, "min_errors", None) is None
                                      else args.min_errors))
    return build_config(DetectionConfig, {"tau_target": "--tau-target", "tau_source": "--tau-source",
                                    "source_rule": "--source-rule", "evidence": "--evidence"},
                  tau_target=base.tau_target if args.tau_target is None else args.tau_target,
                  tau_source=base.tau_source if args.tau_source is None else args.tau_source,
                  source_rule=args.source_rule or base.source_rule, attribution=attribution,
                  evidence=args.evidence or base.evidence, errors=errors)


def _reference(args):
    """The ``--reference`` file, loaded (``None``: the shipped reference)."""
    from ..detection.errors import ErrorReference

    return ErrorReference.load(args.reference) if getattr(args, "reference", None) else None


def _recon_config(args):
    from ..reconstruction import ReconstructionConfig

    run = args.command == "run"
    flags = {"steps": "--recon-steps" if run else "--steps", "lr": "--recon-lr", "reg": "--recon-reg",
             "threshold": "--recon-threshold" if run else "--threshold", "num_keep": "--num-keep",
             "batch_size": "--recon-batch" if run else "--batch-size", "max_tries": "--recon-max-tries"}
    return build_config(ReconstructionConfig, flags, steps=args.steps, lr=args.recon_lr, reg=args.recon_reg,
                  threshold=args.threshold, num_keep=args.num_keep, batch_size=args.batch_size,
                  stop_when_kept=not args.all_starts, max_tries=args.recon_max_tries)


def _points(text: str) -> float | None:
    """``--feature-guard``: points of accuracy, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected points of accuracy or none, got {text!r}") from None


def _repair_config(args):
    from ..repair import RepairConfig

    flags = {"top": "--top", "epochs": "--repair-epochs", "lr": "--repair-lr", "reg": "--repair-reg",
             "variations": "--variations", "feature_samples": "--feature-samples", "feature_guard": "--feature-guard",
             "precision": "--repair-precision"}
    return build_config(RepairConfig, flags, top=args.top, epochs=args.repair_epochs, lr=args.repair_lr,
                  reg=args.repair_reg, bn_train=args.bn_train, seed=args.seed, variations=args.variations,
                  feature_samples=args.feature_samples, feature_guard=args.feature_guard,
                  precision=args.repair_precision,
                  tune_from=None if args.tune_from == "all" else args.tune_from)


def _train_config(args):
    from ..training import TrainConfig
    from ..training.train import default_milestones

    run = args.command == "run"
    flags = {"epochs": "--train-epochs" if run else "--epochs", "lr": "--train-lr" if run else "--lr",
             "milestones": "--milestones", "ratio": "--ratio", "batch_size": "--train-batch" if run else "--batch",
             "source_blend": "--source-blend"}
    base = TrainConfig()
    epochs = base.epochs if args.epochs is None else args.epochs
    milestones = tuple(args.milestones) if args.milestones is not None else (
        base.milestones if args.epochs is None else default_milestones(epochs))
    return build_config(TrainConfig, flags, epochs=epochs, lr=base.lr if args.lr is None else args.lr,
                  milestones=milestones, ratio=args.ratio, batch_size=args.batch,
                  source_blend=base.source_blend if args.source_blend is None else args.source_blend, seed=args.seed)


def _model_and_context(args, required: bool, seed: int = 0):
    """Load the model named by ``--model`` and the data context for ``--dataset`` / ``--attack``."""
    from ..data import load_dataset
    from ..workflow import DataContext, open_model, resolve_attack

    device = _device(args)
    data = load_dataset(args.dataset, args.data_dir)
    loaded = open_model(args.model, data, device, args.arch)
    attack = resolve_attack(data, args.attack, args.attack_file, loaded.meta, required)
    return loaded, DataContext.build(data, attack, seed), device


# ----------------------------------------------------------------------------- commands

def _cmd_train(args) -> int:
    from ..models import get_model_spec, save_model
    from ..workflow import load_context, open_model, train

    if not args.out.endswith(".safetensors"):
        raise UserInputError(f"--out must end in .safetensors, got {args.out}")
    config = _train_config(args)
    get_model_spec(args.arch)
    attack = args.attack or "none" if args.attack_file is None else args.attack
    ctx = load_context(args.dataset, args.data_dir, attack, args.attack_file, config.seed)
    device = _device(args)
    init = open_model(args.init, ctx.data, device, args.arch) if args.init else None
    rep = train(ctx, config, device, args.arch, init, args.init or "", progress=not args.quiet)
    save_model(args.out, rep.model.module, rep.model.meta)
    res = replace(rep, model_path=str(args.out)).to_dict()
    _emit(args, res, f"trained {res['arch']} on {res['dataset']} (attack {res['attack']}) in {res['seconds']:.0f}s: "
                     f"acc {res['acc']:.4f}, asr {res['asr']:.4f} -> {res['model']}")
    return 0


def _cmd_evaluate(args) -> int:
    from ..workflow import evaluate

    loaded, ctx, device = _model_and_context(args, required=True)
    res = evaluate(loaded, ctx, device).to_dict()
    _emit(args, res, f"acc {res['acc']:.4f} on {res['n_clean']} clean test samples, asr {res['asr']:.4f} on "
                     f"{res['n_semantic']} semantic samples (attack {res['attack']})")
    return 0


def _cmd_detect(args) -> int:
    from ..artifacts import save_effects
    from ..reporting.text import format_detection
    from ..workflow import detect

    config = _detection_config(args)
    from ..artifacts import resolve_calibration

    calibration = resolve_calibration(args.calibration)
    loaded, ctx, device = _model_and_context(args, required=False)
    rep = detect(loaded, ctx, config, args.layer, device, args.seed, progress=not args.quiet,
                 calibration=calibration, reference=_reference(args))
    if args.effects:
        save_effects(args.effects, rep.effects)
    res = replace(rep, model_path=str(args.model)).to_dict()
    _emit(args, res, format_detection(res))
    return 0


def _cmd_reconstruct(args) -> int:
    from ..artifacts import save_reconstruction
    from ..workflow import reconstruct

    config = _recon_config(args)
    png = args.png if args.png is not None else str(args.out).removesuffix(".npz") + ".png"
    loaded, ctx, device = _model_and_context(args, required=False, seed=args.seed)
    rep = reconstruct(loaded, ctx, args.source, args.target, config, device, args.seed, progress=not args.quiet)
    save_reconstruction(args.out, rep.reconstruction, rep.fingerprint)
    if png:
        from ..reporting.plots import plot_reconstructions

        plot_reconstructions(rep.reconstruction, loaded.meta.mean, loaded.meta.std, png, ctx.data.spec.class_names)
    res = replace(rep, samples_path=str(args.out), png_path=png or "").to_dict()
    _emit(args, res, f"kept {res['kept']} of {res['tried']} tried in {res['seconds']:.1f}s "
                     f"(mean {res['mean_steps']:.0f} steps) -> {res['samples']}, {res['png']}")
    return 0


def _cmd_repair(args) -> int:
    from ..artifacts import load_samples
    from ..models import save_model
    from ..reporting.text import format_repair
    from ..workflow import repair

    if not args.out.endswith(".safetensors"):
        raise UserInputError(f"--out must end in .safetensors, got {args.out}")
    if args.method != "soda":
        return _repair_baseline(args)
    missing = [f"--{n}" for n in ("source", "target", "samples") if getattr(args, n) is None]
    if missing:
        raise UserInputError(f"--method soda needs {', '.join(missing)} (from `soda detect` and `soda reconstruct`)")
    config = _repair_config(args)
    loaded, ctx, device = _model_and_context(args, required=True, seed=config.seed)
    rep = repair(loaded, ctx, args.source, args.target, load_samples(args.samples), config, args.layer, device, progress=not args.quiet)
    save_model(args.out, rep.model.module, rep.model.meta)
    res = replace(rep, model_path=str(args.out)).to_dict()
    _emit(args, res, f"{format_repair(res)}\nrepaired in {res['seconds']:.1f}s -> {res['model']}")
    return 0


def _repair_baseline(args) -> int:
    from ..models import save_model
    from ..repair import BaselineRepairConfig
    from ..workflow import repair_baseline

    config = BaselineRepairConfig(seed=args.seed)
    loaded, ctx, device = _model_and_context(args, required=True, seed=args.seed)
    rep = repair_baseline(loaded, ctx, args.method, config, args.layer, device, progress=not args.quiet)
    save_model(args.out, rep.model.module, rep.model.meta)
    res = replace(rep, model_path=str(args.out)).to_dict()
    _emit(args, res, f"{'':<8}{'before':>8}{'after':>8}\n{'ACC':<8}{res['acc_before']:>8.4f}{res['acc_after']:>8.4f}\n"
                     f"{'ASR':<8}{res['asr_before']:>8.4f}{res['asr_after']:>8.4f}\n"
                     f"repaired by {args.method} in {res['seconds']:.1f}s -> {res['model']}")
    return 0


def _cmd_run(args) -> int:
    from ..reporting.text import format_detection
    from ..workflow import PipelineConfig, run_pipeline
    from ..workflow.pipeline import DEFAULT_DIR

    config = PipelineConfig(out_dir=args.out_dir or DEFAULT_DIR, dataset=args.dataset, data_dir=args.data_dir,
                            attack=args.attack, attack_file=args.attack_file, seed=args.seed, arch=args.arch,
                            model=args.model, init=args.init, layer=args.layer, num_samples=args.num_samples,
                            train=_train_config(args), detect=_detection_config(args),
                            reconstruct=_recon_config(args), repair=_repair_config(args), device=args.device,
                            force=args.force, progress=not args.quiet, calibration=args.calibration,
                            reference=args.reference)

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def log_epoch(rec: dict) -> None:
        print(f"  epoch {rec['epoch']}: loss {rec['loss']:.4f}, train acc {rec['train_acc']:.4f}",
              file=sys.stderr, flush=True)

    def show(step: str, result: dict) -> None:
        if step == "detect":
            print(format_detection(result), file=sys.stderr)

    report = run_pipeline(config, say, log_epoch, show)
    print(f"\n{report.verdict}")
    rep = report.repair
    if rep is not None:
        print(f"repair: acc {rep['acc_before']:.4f} -> {rep['acc_after']:.4f}, asr {rep['asr_before']:.4f} -> "
              f"{rep['asr_after']:.4f}, r-asr {rep['rasr_before']:.4f} -> {rep['rasr_after']:.4f}")
    for r in report.steps:
        print(f"  {r.step:<18}{r.seconds:>8.1f}s{'  (cached)' if r.cached else ''}")
    print(f"report: {report.report_path}")
    return 0


def _cmd_report(args) -> int:
    from ..reporting.report import render_report

    path = render_report(args.dir)
    print(f"report: {path}")
    return 0


def _cmd_layers(args) -> int:
    from ..analysis import default_layer
    from ..models import load_model
    from ..data import get_dataset_spec

    spec = get_dataset_spec(args.dataset) if args.dataset else None
    loaded = load_model(args.model, arch=args.arch, num_classes=spec.num_classes if spec else None,
                        in_channels=spec.in_channels if spec else None, input_size=spec.image_size if spec else None)
    print(f"default: {default_layer(loaded.module)}")
    for name, m in loaded.module.named_modules():
        if name:
            print(f"{name:<40}{type(m).__name__}")
    return 0


def _cmd_models(args) -> int:
    from ..models import get_model_spec, list_models

    for name in list_models():
        print(f"{name:<14}{get_model_spec(name).description}")
    return 0


def _cmd_attacks(args) -> int:
    from ..data import list_attacks

    for a in list_attacks():
        where = f"{len(a.train_indices)} train / {len(a.test_indices)} test" if a.index_based else "image folders"
        print(f"{a.dataset:<9}{a.name:<18}{a.source:>4} -> {a.target:<4}{where:<22}{a.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soda`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    before = warnings.formatwarning
    # a warning the user can act on is one line, like the errors
    warnings.formatwarning = lambda message, *_a, **_k: f"soda {args.command}: warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except UserInputError as exc:
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"soda {args.command}: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("soda: interrupted\n")
        return 130
    finally:
        warnings.formatwarning = before


if __name__ == "__main__":
    sys.exit(main())
