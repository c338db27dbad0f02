"""Study-compatible training front end: ``python train_backdoor_sem.py --option=semtrain ...``.

Accepts the command lines of the original SODA study (sunbing7/SODA) and runs them through
:func:`soda_backdoor.workflow.train`. The trained weights are written where the study writes
them, as a plain ``state_dict`` (``torch.save`` of a dict of tensors):

- ``--option=semtrain|semtune``: ``<output_dir>/model_semtrain_<arch>_<data_name>_<t_attack>_last.th``
- ``--option=base``: ``<output_dir>/model_clean_<arch>_<data_name>_last.th``

Flags the study documents but that have no meaning here are accepted and reported as
ignored on stderr; unknown flags are an error (exit 2). See docs/study_compat.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import (COMMON_REASONS, COMMON_USED, CompatError, CompatParser, add_common_args, arch_spec,
                     check_num_class, check_poison_type, dataset_name, is_clean, note, open_study_model,
                     progress_enabled, report_ignored, resolve_attack, run_main, write_state_dict)

PROG_TRAIN = "train_backdoor_sem.py"


# ----------------------------------------------------------------------------- training

TRAIN_OPTIONS = ("base", "semtrain", "semtune")
UNSUPPORTED_TRAIN_OPTIONS = {"adaptive": "the study's adaptive attack is not implemented here"}

TRAIN_USED = {
    "base": COMMON_USED | {"batch_size", "epoch", "lr", "schedule", "resume", "checkpoint"},
    "semtrain": COMMON_USED | {"batch_size", "epoch", "lr", "schedule", "resume", "checkpoint", "ratio",
                               "poison_target"},
}
TRAIN_USED["semtune"] = TRAIN_USED["semtrain"]

TRAIN_REASONS = {
    **COMMON_REASONS,
    "pretrained": "models are trained from scratch; there are no pretrained weights",
    "widen_factor": "no WideResNet here",
    "model_path": "not used",
    "ratio": "--option=base trains on clean data only",
    "poison_target": "--option=base trains on clean data only",
    "reg": "only the study's adaptive attack uses it",
    "ana_layer": "only the study's adaptive attack uses it",
}


def build_train_parser() -> argparse.ArgumentParser:
    p = CompatParser(prog=PROG_TRAIN, description="Train a semantic-backdoored (or clean) model, with the SODA "
                     "study's flags; a thin front-end over soda_backdoor.workflow.train.",
                     epilog="example:\n  python train_backdoor_sem.py --option=semtrain --lr=0.1 --arch=MobileNetV2 "
                            "--ratio=0.3125 --resume=0 --epoch=100 --schedule 50 100 --checkpoint=na --batch_size=64 "
                            "--poison_type=semantic --poison_target=2 --output_dir=./save --t_attack=stripet "
                            "--data_dir=./data/FMNIST --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST "
                            "--num_class=10",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", default="base", choices=[*TRAIN_OPTIONS, *UNSUPPORTED_TRAIN_OPTIONS],
                   help="base (clean), semtrain (semantic backdoor from scratch), semtune (the same loop, usually "
                        "from --checkpoint with --resume=1)")
    add_common_args(p)
    g = p.add_argument_group("training flags of the study")
    g.add_argument("--schedule", type=int, nargs="+", default=None, help="epochs where the lr is multiplied by 0.1 "
                   "(study default 100 150)")
    g.add_argument("--ratio", type=float, default=None, help="poisoned fraction of each batch (default 0.3125)")
    g.add_argument("--checkpoint", default=None, help="weights to start from when --resume=1 (state_dict)")
    g.add_argument("--load_type", default=None, choices=["state_dict", "model"],
                   help="how --checkpoint is stored (default state_dict; model needs --trust-pickled-model)")
    g.add_argument("--pretrained", type=int, default=None, help="ignored")
    g.add_argument("--widen_factor", type=int, default=None, help="ignored")
    g.add_argument("--model_path", default=None, help="ignored")
    g.add_argument("--reg", type=float, default=None, help="ignored (adaptive attack only)")
    g.add_argument("--ana_layer", nargs="+", default=None, help="ignored (adaptive attack only)")
    return p


def train_model_name(option: str, arch: str, data_name: str, t_attack: str) -> str:
    """The study's file name of a trained model."""
    if option == "base":
        return f"model_clean_{arch}_{data_name}_last.th"
    return f"model_semtrain_{arch}_{data_name}_{t_attack}_last.th"


def execute_train(args: argparse.Namespace) -> int:
    from soda_backdoor.data import load_dataset
    from soda_backdoor.errors import build_config
    from soda_backdoor.training import TrainConfig
    from soda_backdoor.utils import resolve_device
    from soda_backdoor.workflow import DataContext, train

    prog = PROG_TRAIN
    if args.option in UNSUPPORTED_TRAIN_OPTIONS:
        raise CompatError(f"--option={args.option}: {UNSUPPORTED_TRAIN_OPTIONS[args.option]}; "
                          f"valid: {', '.join(TRAIN_OPTIONS)}")
    check_poison_type(args)
    used = set(TRAIN_USED[args.option])
    if args.load_type is not None:
        used.add("load_type")
    resume = bool(args.resume)
    if not resume and args.checkpoint not in (None, "na"):
        note(prog, f"ignoring --checkpoint={args.checkpoint} (--resume is not 1)")
        used.add("checkpoint")
    if args.checkpoint == "na":
        used.add("checkpoint")
    report_ignored(prog, args, used, TRAIN_REASONS)

    arch = args.arch or "resnet18"
    arch_spec(arch)
    data_name = args.data_name or "CIFAR10"
    dataset = dataset_name(data_name)
    check_num_class(args.num_class, dataset)
    epochs = 200 if args.epoch is None else args.epoch
    batch = 128 if args.batch_size is None else args.batch_size
    ratio = 0.3125 if args.ratio is None else args.ratio
    lr = 0.1 if args.lr is None else args.lr
    milestones = tuple(args.schedule) if args.schedule is not None else (100, 150)

    if args.option == "base":
        # Clean training; the semantic samples of --t_attack (if any) are left out, as in the study.
        atk = resolve_attack(prog, args.t_attack, dataset, args.attack_file, None)
        ratio = 0.0
    else:
        if args.t_attack is None and args.attack_file is None:
            raise CompatError(f"--option={args.option} needs --t_attack (an attack name, e.g. stripet for FMNIST; "
                              "list them with `soda attacks`) or --attack_file")
        if args.t_attack is not None and is_clean(args.t_attack):
            raise CompatError(f"--option={args.option} plants a semantic backdoor: --t_attack={args.t_attack} names "
                              "none; use --option=base for a clean model")
        atk = resolve_attack(prog, args.t_attack, dataset, args.attack_file, args.poison_target)
    attack = atk.name if atk is not None else "none"

    if resume and args.checkpoint in (None, "na"):
        raise CompatError("--resume=1 needs --checkpoint=PATH (a state_dict of the same architecture)")

    seed = 0 if args.seed is None else args.seed
    # The study augments only the poisoned samples and does not blend them.
    flags = {"epochs": "--epoch", "lr": "--lr", "milestones": "--schedule", "batch_size": "--batch_size",
             "ratio": "--ratio"}
    config = build_config(TrainConfig, flags, epochs=epochs, lr=lr, milestones=milestones, batch_size=batch,
                          ratio=ratio, seed=seed, augment_clean=False, source_blend=0.0)
    device = resolve_device(args.device or "auto")
    ctx = DataContext.build(load_dataset(dataset, args.data_set), atk, seed)
    init = None
    if resume:
        init = open_study_model(args.checkpoint, args.load_type or "state_dict", bool(args.trust_pickled_model),
                                ctx.data, device, arch, prog)
    out_dir = Path(args.output_dir or "./save")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_attack = args.t_attack if args.t_attack is not None else (atk.name if atk is not None else "clean")
    dest = out_dir / train_model_name(args.option, arch, data_name, t_attack)

    print(f"{prog}: --option={args.option}: {arch} on {dataset} (attack {attack}), {epochs} epoch(s), lr {lr}, "
          f"schedule {list(milestones)}, batch {batch}, ratio {ratio}, device {device}")
    print("Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonTrainACC")

    def on_epoch(record: dict) -> None:
        values = [record.get(k, float("nan")) for k in ("lr", "seconds", "loss", "train_acc", "poison_train_asr")]
        print(f"{record.get('epoch', '?')} \t {values[0]:.4f} \t {values[1]:.1f} \t {values[2]:.4f} \t "
              f"{values[3]:.4f} \t {values[4]:.4f}", flush=True)

    rep = train(ctx, config, device, arch, init, args.checkpoint if init is not None else "",
                progress=progress_enabled(args), on_epoch=on_epoch)
    write_state_dict(rep.model.module, dest)
    ev = rep.evaluation
    print(f"CleanACC {ev.acc:.4f} on {ev.n_clean} clean test samples, PoisonACC (ASR) {ev.asr:.4f} on "
          f"{ev.n_semantic} semantic test samples, {rep.seconds:.1f}s")
    print(f"saved {dest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python train_backdoor_sem.py --option=... ...``."""
    return run_main(PROG_TRAIN, build_train_parser(), execute_train, argv)


if __name__ == "__main__":
    sys.exit(main())
