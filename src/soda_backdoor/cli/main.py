"""``soda``: one subcommand per step of the tool, and ``run`` for the whole pipeline.

Every subcommand builds a config, calls one step function, and writes its outputs. Bad input
exits 2 with a one-line message on stderr; success exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..errors import UserInputError

EXAMPLES = """examples:
  soda train --dataset fmnist --attack stripet --arch cnn --seed 0 --out m.safetensors
  soda evaluate --model m.safetensors --dataset fmnist --attack stripet --json eval.json
  soda detect --model m.safetensors --dataset fmnist --json detect.json
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


def _common(p: argparse.ArgumentParser, data: bool = True, model: bool = False) -> None:
    g = p.add_argument_group("common")
    if model:
        g.add_argument("--model", required=True, help="model file (.safetensors, or a .th/.pt state_dict with --arch)")
        g.add_argument("--arch", default=None, help="architecture of a state_dict without metadata")
    if data:
        g.add_argument("--dataset", default="fmnist", help="dataset name: fmnist, cifar10, gtsrb, mnistm, mnist")
        g.add_argument("--data-dir", default=None, help="folder or file with the dataset (default: standard places)")
        g.add_argument("--attack", default=None, help="semantic attack name from the registry, or 'none' "
                       "(default for a given model: the attack in its metadata)")
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
    g.add_argument("--tau-target", type=float, default=None, help="MAD threshold for targets (default 4.5)")
    g.add_argument("--tau-source", type=float, default=None, help="MAD threshold reported for sources (default 2.0)")
    g.add_argument("--source-rule", default=None, choices=["fastest", "one_way", "mean_logit", "asymmetry"],
                   help="how the source class is chosen (default fastest; mean_logit is the study's)")
    g.add_argument("--effects", default=None, help="save the attribution matrices (.npz) here")


def _recon_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reconstruction")
    g.add_argument("--steps", type=int, default=2000, help="max optimisation steps per sample (study --epoch)")
    g.add_argument("--recon-lr", type=float, default=0.1, help="learning rate of the input optimisation")
    g.add_argument("--recon-reg", type=float, default=0.9, help="weight of mean(x^2) (study --reg)")
    g.add_argument("--threshold", type=float, default=0.99, help="stop once the target probability reaches this")
    g.add_argument("--num-keep", type=int, default=100, help="samples to keep (study --num_sample)")
    g.add_argument("--batch-size", type=int, default=128, help="starts optimised at once")


def _repair_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repair")
    g.add_argument("--top", type=float, default=1.0, help="fraction of neurons kept by the mask (1.0: no mask)")
    g.add_argument("--repair-epochs", type=int, default=5, help="fine-tuning epochs over the clean subset")
    g.add_argument("--repair-lr", type=float, default=0.001, help="fine-tuning learning rate")
    g.add_argument("--repair-reg", type=float, default=0.01, help="weight of -CE(reconstructed, target)")
    g.add_argument("--bn-train", action="store_true", help="update batch-norm statistics while fine-tuning "
                   "(default: frozen)")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--arch", default="cnn", help="architecture (see `soda models`)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 12)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 0.05)")
    g.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where lr x0.1 (default 50%%, 75%%)")
    g.add_argument("--ratio", type=float, default=0.3125, help="poisoned fraction of each batch")
    g.add_argument("--batch", type=int, default=64, help="batch size")
    g.add_argument("--source-blend", type=float, default=None,
                   help="blend each poisoned sample with a random clean source-class sample, with a weight "
                        "up to this (0 = off, the study's recipe; default 0.5)")
    g.add_argument("--init", default=None, help="fine-tune this checkpoint instead of training from scratch (semtune)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soda", description="SODA: detect and remove semantic backdoors in image classifiers.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a semantic-backdoored (or clean) model")
    _common(p)
    _train_args(p)
    p.add_argument("--out", required=True, help="output model file (.safetensors)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="clean accuracy and attack success rate")
    _common(p, model=True)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("detect", help="is there a semantic backdoor, and which classes?")
    _common(p, model=True)
    _detect_args(p)
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("reconstruct", help="synthesise source-class inputs the model sends to the target")
    _common(p, model=True)
    p.add_argument("--source", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--png", default=None, help="PNG grid of starts and reconstructions (default: OUT with .png)")
    _recon_args(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("repair", help="remove the backdoor by masked fine-tuning")
    _common(p, model=True)
    p.add_argument("--source", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--samples", required=True, help=".npz from `soda reconstruct`")
    p.add_argument("--out", required=True, help="repaired model file (.safetensors)")
    p.add_argument("--layer", default=None, help="layer of the mask (default: input of the last Linear)")
    _repair_args(p)
    p.set_defaults(func=_cmd_repair)

    p = sub.add_parser("run", help="the whole pipeline: train -> detect -> reconstruct -> repair -> report")
    _common(p)
    _train_args(p)
    _detect_args(p)
    _recon_args(p)
    _repair_args(p)
    p.add_argument("--model", default=None, help="audit this model instead of training one")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/default)")
    p.add_argument("--force", action="store_true", help="redo every step even if its results are current")
    p.set_defaults(func=_cmd_run)

    from .zoo import add_zoo_parser

    add_zoo_parser(sub, _Parser, _common, _detect_args)
    from .audit import add_audit_parser

    add_audit_parser(sub, _Parser, _common, _detect_args, _recon_args, _repair_args)

    p = sub.add_parser("report", help="re-render DIR/report.html from a run folder")
    p.add_argument("dir", help="run folder written by `soda run`")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("layers", help="list the layer names of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--arch", default=None)
    p.add_argument("--dataset", default=None)
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("attacks", help="list the shipped semantic attacks")
    p.set_defaults(func=_cmd_attacks)
    return parser


# ----------------------------------------------------------------------------- helpers

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

    if args.num_samples < 1:
        raise UserInputError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.chunk_size < 1:
        raise UserInputError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    base = DetectionConfig()
    return DetectionConfig(tau_target=base.tau_target if args.tau_target is None else args.tau_target,
                           tau_source=base.tau_source if args.tau_source is None else args.tau_source,
                           source_rule=args.source_rule or base.source_rule,
                           attribution=AttributionConfig(num_samples=args.num_samples, chunk_size=args.chunk_size))


def _recon_config(args):
    from ..reconstruction import ReconstructionConfig

    for name in ("steps", "num_keep", "batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.threshold <= 1:
        raise UserInputError(f"--threshold must be in (0, 1], got {args.threshold}")
    return ReconstructionConfig(steps=args.steps, lr=args.recon_lr, reg=args.recon_reg, threshold=args.threshold,
                                num_keep=args.num_keep, batch_size=args.batch_size)


def _repair_config(args):
    from ..repair import RepairConfig

    if not 0 < args.top <= 1:
        raise UserInputError(f"--top must be in (0, 1], got {args.top}")
    if args.repair_epochs < 1:
        raise UserInputError("--repair-epochs must be at least 1")
    return RepairConfig(top=args.top, epochs=args.repair_epochs, lr=args.repair_lr, reg=args.repair_reg,
                        bn_train=args.bn_train, seed=args.seed)


def _train_config(args):
    from ..training import TrainConfig
    from ..training.train import default_milestones

    base = TrainConfig()
    epochs = base.epochs if args.epochs is None else args.epochs
    if epochs < 1:
        raise UserInputError(f"--epochs must be at least 1, got {epochs}")
    if not 0 <= args.ratio < 1:
        raise UserInputError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.batch < 2:
        raise UserInputError("--batch must be at least 2")
    blend = base.source_blend if args.source_blend is None else args.source_blend
    if not 0 <= blend < 1:
        raise UserInputError(f"--source-blend must be in [0, 1), got {blend}")
    milestones = tuple(args.milestones) if args.milestones is not None else (
        base.milestones if args.epochs is None else default_milestones(epochs))
    return TrainConfig(epochs=epochs, lr=base.lr if args.lr is None else args.lr, milestones=milestones,
                       ratio=args.ratio, batch_size=args.batch, source_blend=blend, seed=args.seed)


def format_detection(res: dict) -> str:
    """A readable table of the detection result."""
    names = res.get("class_names") or []
    label = lambda i: f"{i} ({names[i]})" if i < len(names) else str(i)  # noqa: E731
    tt = res["target_test"]
    folded = f", folded {res['folded']}" if res.get("folded") else ""
    lines = [f"layer {res['layer']} ({res['attribution_method']}{folded}), target threshold {tt['threshold']:g}",
             f"{'class':<18}{'target score':>13}{'anomaly':>10}"]
    for k, (s, a) in enumerate(zip(tt["scores"], tt["anomaly_index"])):
        mark = "  <- target" if k in tt["flagged"] else ""
        lines.append(f"{label(k):<18}{s:>13.4f}{a:>10.2f}{mark}")
    for src in res["sources"]:
        lines.append(f"source scores for target {label(src['target'])} (rule {src['rule']}):")
        order = sorted(range(len(src["scores"])), key=lambda c: -src["scores"][c])
        for c in order[:4]:
            if c == src["target"]:
                continue
            lines.append(f"  {label(c):<16} score {src['scores'][c]:8.3f}  forward {src['forward'][c]:7.3f}  "
                         f"reverse {src['reverse'][c]:7.3f}  mean target logit {src['mean_logit'][c]:7.3f}")
    if res["backdoor"]:
        pairs = ", ".join(f"{label(p['source'])} -> {label(p['target'])}" for p in res["pairs"])
        lines.append(f"VERDICT: semantic backdoor detected: {pairs}")
    else:
        lines.append(f"VERDICT: no semantic backdoor detected (no class's anomaly index exceeds {tt['threshold']:g}; "
                     f"max {max(a for a in tt['anomaly_index'] if a == a):.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands

def _cmd_train(args) -> int:
    from .steps import run_train

    if not args.out.endswith(".safetensors"):
        raise UserInputError(f"--out must end in .safetensors, got {args.out}")
    res = run_train(args.dataset, args.data_dir, args.attack or "none" if args.attack_file is None else args.attack,
                    args.attack_file, args.arch, args.out, _train_config(args), _device(args), args.init,
                    progress=not args.quiet)
    _emit(args, res, f"trained {res['arch']} on {res['dataset']} (attack {res['attack']}) in {res['seconds']:.0f}s: "
                     f"acc {res['acc']:.4f}, asr {res['asr']:.4f} -> {res['model']}")
    return 0


def _cmd_evaluate(args) -> int:
    from .steps import run_evaluate

    res = run_evaluate(args.model, args.dataset, args.data_dir, args.attack, args.attack_file, _device(args), args.arch)
    _emit(args, res, f"acc {res['acc']:.4f} on {res['n_clean']} clean test samples, asr {res['asr']:.4f} on "
                     f"{res['n_semantic']} semantic samples (attack {res['attack']})")
    return 0


def _cmd_detect(args) -> int:
    from .steps import run_detect

    res = run_detect(args.model, args.dataset, args.data_dir, args.attack, args.attack_file, _detection_config(args),
                     args.layer, _device(args), args.seed, args.arch, args.effects, progress=not args.quiet)
    _emit(args, res, format_detection(res))
    return 0


def _cmd_reconstruct(args) -> int:
    from .steps import run_reconstruct

    png = args.png if args.png is not None else str(args.out).removesuffix(".npz") + ".png"
    res = run_reconstruct(args.model, args.dataset, args.data_dir, args.attack, args.attack_file, args.source,
                          args.target, _recon_config(args), args.out, _device(args), args.seed, args.arch, png,
                          progress=not args.quiet)
    _emit(args, res, f"kept {res['kept']} of {res['tried']} tried in {res['seconds']:.1f}s "
                     f"(mean {res['mean_steps']:.0f} steps) -> {res['samples']}, {res['png']}")
    return 0


def _cmd_repair(args) -> int:
    from .steps import run_repair

    if not args.out.endswith(".safetensors"):
        raise UserInputError(f"--out must end in .safetensors, got {args.out}")
    res = run_repair(args.model, args.dataset, args.data_dir, args.attack, args.attack_file, args.source, args.target,
                     args.samples, _repair_config(args), args.out, _device(args), args.layer, arch=args.arch,
                     progress=not args.quiet)
    _emit(args, res, f"{'':<8}{'before':>8}{'after':>8}\n{'ACC':<8}{res['acc_before']:>8.4f}{res['acc_after']:>8.4f}\n"
                     f"{'ASR':<8}{res['asr_before']:>8.4f}{res['asr_after']:>8.4f}\n"
                     f"{'R-ASR':<8}{res['rasr_before']:>8.4f}{res['rasr_after']:>8.4f}\n"
                     f"repaired in {res['seconds']:.1f}s -> {res['model']}")
    return 0


def _cmd_run(args) -> int:
    from .pipeline import run_pipeline

    return run_pipeline(args)


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
    try:
        return int(args.func(args) or 0)
    except UserInputError as exc:
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"soda {args.command}: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("soda: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
