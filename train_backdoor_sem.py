#!/usr/bin/env python
"""Study-compatible front-end: ``python train_backdoor_sem.py --option=semtrain ...``.

Accepts the command lines of the original SODA study (sunbing7/SODA) and runs them through
:func:`soda_backdoor.cli.steps.run_train`. The trained weights are written where the study
writes them, as a plain ``state_dict`` (``torch.save`` of a dict of tensors):

- ``--option=semtrain|semtune``: ``<output_dir>/model_semtrain_<arch>_<data_name>_<t_attack>_last.th``
- ``--option=base``: ``<output_dir>/model_clean_<arch>_<data_name>_last.th``

Flags the study documents but that have no meaning here are accepted and reported as
ignored on stderr; unknown flags are an error (exit 2). See docs/study_compat.md.

This file also holds the helpers shared with ``semantic_mitigation.py`` (flag mapping,
attack resolution, safe model files); neither script re-implements an algorithm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

PROG_TRAIN = "train_backdoor_sem.py"

# The study's --data_name values (and our own names) -> our dataset names.
STUDY_DATA_NAMES = {"cifar10": "cifar10", "fmnist": "fmnist", "gtsrb": "gtsrb", "mnistm": "mnistm",
                    "mnist_m": "mnistm", "mnist": "mnist"}
# Study datasets stored as image folders; our loaders read tensors only.
FOLDER_DATASETS = ("asl", "caltech", "tinyimagenet")


# ----------------------------------------------------------------------------- shared helpers

class CompatParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class CompatError(Exception):
    """A problem with the command line that the front-end itself detects (exit 2)."""


def note(prog: str, message: str) -> None:
    """A one-line remark on stderr."""
    sys.stderr.write(f"{prog}: note: {message}\n")


def report_ignored(prog: str, args: argparse.Namespace, used: set[str], reasons: dict[str, str]) -> list[str]:
    """Report, on stderr, every flag given on the command line that this option does not use."""
    ignored = []
    for dest, value in sorted(vars(args).items()):
        if value is None or dest in used or dest.startswith("_"):
            continue
        flag = "--" + dest
        reason = reasons.get(dest, f"not used by --option={args.option}")
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        note(prog, f"ignoring {flag}={shown} ({reason})")
        ignored.append(dest)
    return ignored


def dataset_name(data_name: str) -> str:
    """Map the study's ``--data_name`` (CIFAR10, FMNIST, GTSRB, mnistm) to our dataset name."""
    key = data_name.lower()
    if key in FOLDER_DATASETS:
        raise CompatError(f"--data_name={data_name}: the study's image-folder datasets ({', '.join(FOLDER_DATASETS)}) "
                          "are not supported; valid: CIFAR10, FMNIST, GTSRB, mnistm")
    if key not in STUDY_DATA_NAMES:
        raise CompatError(f"unknown --data_name={data_name}; valid: CIFAR10, FMNIST, GTSRB, mnistm")
    return STUDY_DATA_NAMES[key]


def check_num_class(num_class: int | None, dataset: str) -> None:
    """``--num_class`` must agree with the dataset (the number of classes comes from the data)."""
    from soda_backdoor.data import get_dataset_spec

    spec = get_dataset_spec(dataset)
    if num_class is not None and num_class != spec.num_classes:
        raise CompatError(f"--num_class={num_class} does not match {spec.name}, which has {spec.num_classes} classes")


def is_clean(t_attack: str | None) -> bool:
    return t_attack is None or t_attack.lower() in ("clean", "none")


def resolve_attack(prog: str, t_attack: str | None, dataset: str, attack_file: str | None,
                   poison_target: int | None, workdir: Path) -> tuple[str | None, str | None, Any]:
    """The attack the steps should use: ``(attack name, attack file, SemanticAttack | None)``.

    ``--t_attack`` picks an attack by name from the shipped registry (or from ``--attack_file``);
    ``clean``/``none`` or no attack means clean data. When ``--poison_target`` differs from the
    attack's target (the study labels the semantic samples with ``--poison_target``), a copy of
    the attack with that target is written to ``workdir`` and used instead.
    """
    from soda_backdoor.data import get_attack

    if attack_file is None and is_clean(t_attack):
        return "none", None, None
    name = None if t_attack is None else t_attack
    if name is not None and name.lower() in ("clean", "none"):
        name = None
    atk = get_attack(name, dataset, attack_file)
    if atk is None:
        return "none", None, None
    if atk.dataset != dataset:
        raise CompatError(f"attack {atk.name!r} is defined on {atk.dataset}, not {dataset}")
    if poison_target is None or poison_target == atk.target:
        return atk.name, attack_file, atk
    entry = {"dataset": atk.dataset, "attack": atk.name, "description": atk.description,
             "source_class": atk.source, "target_class": poison_target,
             "train_indices": list(atk.train_indices), "test_indices": list(atk.test_indices)}
    path = workdir / f"attack_{atk.name}_target{poison_target}.json"
    path.write_text(json.dumps([entry]))
    note(prog, f"attack {atk.name!r}: target class set to {poison_target} by --poison_target "
               f"(the attack file says {atk.target})")
    return atk.name, str(path), get_attack(atk.name, dataset, str(path))


def arch_spec(arch: str):
    """The registry entry of ``--arch`` (the study's spelling is accepted)."""
    from soda_backdoor.models import get_model_spec

    return get_model_spec(arch)


def study_layer(arch: str, ana_layer: Sequence[str] | None, prog: str) -> str | None:
    """Map the study's ``--ana_layer`` number to our layer name (``ModelSpec.study_ana_layers``).

    A value that is not a number is taken as a layer name (``NAME`` or ``NAME:input``).
    ``None`` means the default layer: the input of the last Linear layer.
    """
    if not ana_layer:
        return None
    if len(ana_layer) > 1:
        note(prog, f"--ana_layer: using the first value {ana_layer[0]}, ignoring {' '.join(ana_layer[1:])}")
    value = str(ana_layer[0])
    spec = arch_spec(arch)
    if not value.lstrip("-").isdigit():
        return value
    table = dict(spec.study_ana_layers)
    number = int(value)
    if number not in table:
        valid = ", ".join(f"{k} ({v})" for k, v in spec.study_ana_layers) or "(none)"
        raise CompatError(f"--ana_layer {number} is not defined for --arch={arch}; valid: {valid}, "
                          "or a layer name such as linear:input")
    return table[number]


def pickled_model_to_state_dict(path: str, workdir: Path, trusted: bool, prog: str) -> str:
    """``--load_type=model``: a whole pickled module. Refused unless ``--trust-pickled-model``.

    With the flag, the file is unpickled (this runs code stored in it) and its ``state_dict``
    is written to ``workdir``; the returned path is that plain weights file.
    """
    if not trusted:
        raise CompatError(f"refused --load_type=model for {path}: unpickling a whole model runs code stored in the "
                          "file; convert it once in a trusted environment with "
                          "torch.save(torch.load(PATH, weights_only=False).state_dict(), 'model.th') and pass that "
                          "file with --load_type=state_dict (or add --trust-pickled-model if you trust this file)")
    import torch

    if not Path(path).is_file():
        raise CompatError(f"model file {path} does not exist")
    note(prog, f"--trust-pickled-model: unpickling {path} with weights_only=False (this runs code from the file)")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj, dict):
        state = obj
    else:
        raise CompatError(f"{path} holds a {type(obj).__name__}, neither a torch module nor a state_dict")
    state = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    out = workdir / (Path(path).stem + ".state_dict.th")
    torch.save(state, out)
    return str(out)


def prepare_model_file(path: str, load_type: str, trusted: bool, workdir: Path, prog: str) -> str:
    """The path the steps should load: ``state_dict`` files as they are, pickled modules converted."""
    if load_type == "state_dict":
        return path
    if load_type == "model":
        return pickled_model_to_state_dict(path, workdir, trusted, prog)
    raise CompatError(f"unknown --load_type={load_type}; valid: state_dict, model")


def write_state_dict(model_file: str | Path, dest: str | Path) -> Path:
    """Copy the weights of a model file written by the steps to ``dest`` as a plain ``state_dict``."""
    import torch
    from safetensors.torch import load_file

    from soda_backdoor.utils import atomic_path

    state = load_file(str(model_file))
    dest = Path(dest)
    with atomic_path(dest, suffix=".th") as tmp:
        torch.save(state, str(tmp))
    return publish(dest)


def publish(path: str | Path) -> Path:
    """Give a file written through a private temporary file the usual permissions (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def run_main(prog: str, parser: argparse.ArgumentParser, execute: Callable[[argparse.Namespace, Path], int],
             argv: Sequence[str] | None) -> int:
    """Parse, run, and turn user errors into one line on stderr with exit status 2."""
    args = parser.parse_args(argv)
    from soda_backdoor.errors import UserInputError

    try:
        with tempfile.TemporaryDirectory(prefix="soda_compat_") as tmp:
            return int(execute(args, Path(tmp)) or 0)
    except (CompatError, UserInputError) as exc:
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"{prog}: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags both study scripts have, plus ours (``--seed``, ``--device``, ``--attack_file``...)."""
    g = p.add_argument_group("study flags shared by both scripts")
    g.add_argument("--arch", default=None, help="architecture (study default resnet18); see `soda models`")
    g.add_argument("--batch_size", type=int, default=None, help="batch size")
    g.add_argument("--epoch", type=int, default=None, help="epochs (training, remove) or optimisation steps (gen_trigger)")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--data_set", default=None, help="dataset file, e.g. ./data/FMNIST/fmnist.h5 (the study's HDF5 "
                   "layouts, idx folders, CIFAR-10 batches); default: the standard places")
    g.add_argument("--data_dir", default=None, help="folder of the reconstructed samples advsample_<t_attack>.npy")
    g.add_argument("--output_dir", default=None, help="where models and analysis files go (default ./save)")
    g.add_argument("--poison_type", default=None, help="ignored: every attack here is semantic")
    g.add_argument("--poison_target", type=int, default=None, help="target class of the attack")
    g.add_argument("--t_attack", default=None, help="semantic attack name (stripet, green, ...), or clean")
    g.add_argument("--data_name", default=None, help="CIFAR10, FMNIST, GTSRB or mnistm (study default CIFAR10)")
    g.add_argument("--num_class", type=int, default=None, help="checked against the dataset")
    g.add_argument("--resume", type=int, default=None, help="training: 1 = start from --checkpoint")
    g.add_argument("--save_every", type=int, default=None, help="ignored")
    x = p.add_argument_group("extensions")
    x.add_argument("--attack_file", "--attack-file", dest="attack_file", default=None,
                   help="JSON file of attacks (schema of semantic_attacks.json); --t_attack picks an entry "
                        "(default: the first)")
    x.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    x.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    x.add_argument("--trust-pickled-model", "--trust_pickled_model", dest="trust_pickled_model",
                   action="store_true", default=None,
                   help="allow --load_type=model: unpickle a whole model (runs code stored in the file)")
    x.add_argument("--quiet", action="store_true", default=None, help="no progress bars")


COMMON_USED = {"option", "arch", "data_set", "data_name", "num_class", "attack_file", "seed", "device",
               "quiet", "output_dir", "t_attack", "trust_pickled_model"}

COMMON_REASONS = {
    "poison_type": "every attack here is semantic",
    "save_every": "no intermediate checkpoints are written",
    "data_dir": "training reads --data_set only",
}


def progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def check_poison_type(args: argparse.Namespace) -> None:
    if args.poison_type is not None and args.poison_type != "semantic":
        raise CompatError(f"--poison_type={args.poison_type} is not supported; only semantic backdoors "
                          "(--poison_type=semantic)")


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
                     "study's flags; a thin front-end over soda_backdoor.cli.steps.run_train.",
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


def execute_train(args: argparse.Namespace, workdir: Path) -> int:
    from soda_backdoor.cli.steps import run_train
    from soda_backdoor.training import TrainConfig
    from soda_backdoor.utils import resolve_device

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
    if epochs < 1:
        raise CompatError(f"--epoch must be at least 1, got {epochs}")
    batch = 128 if args.batch_size is None else args.batch_size
    if batch < 2:
        raise CompatError(f"--batch_size must be at least 2, got {batch}")
    ratio = 0.3125 if args.ratio is None else args.ratio
    if not 0 <= ratio < 1:
        raise CompatError(f"--ratio must be in [0, 1), got {ratio}")
    lr = 0.1 if args.lr is None else args.lr
    if lr <= 0:
        raise CompatError(f"--lr must be positive, got {lr}")
    milestones = tuple(args.schedule) if args.schedule is not None else (100, 150)

    if args.option == "base":
        # Clean training; the semantic samples of --t_attack (if any) are left out, as in the study.
        attack, attack_file, atk = resolve_attack(prog, args.t_attack, dataset, args.attack_file, None, workdir)
        ratio = 0.0
    else:
        if args.t_attack is None and args.attack_file is None:
            raise CompatError(f"--option={args.option} needs --t_attack (an attack name, e.g. stripet for FMNIST; "
                              "list them with `soda attacks`) or --attack_file")
        if args.t_attack is not None and is_clean(args.t_attack):
            raise CompatError(f"--option={args.option} plants a semantic backdoor: --t_attack={args.t_attack} names "
                              "none; use --option=base for a clean model")
        attack, attack_file, atk = resolve_attack(prog, args.t_attack, dataset, args.attack_file,
                                                  args.poison_target, workdir)

    init = None
    if resume:
        if args.checkpoint in (None, "na"):
            raise CompatError("--resume=1 needs --checkpoint=PATH (a state_dict of the same architecture)")
        init = prepare_model_file(args.checkpoint, args.load_type or "state_dict", bool(args.trust_pickled_model),
                                  workdir, prog)

    seed = 0 if args.seed is None else args.seed
    # The study augments only the poisoned samples and does not blend them.
    config = TrainConfig(epochs=epochs, lr=lr, milestones=milestones, batch_size=batch, ratio=ratio, seed=seed,
                         augment_clean=False, source_blend=0.0)
    device = resolve_device(args.device or "auto")
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

    tmp_model = workdir / "model.safetensors"
    res = run_train(dataset, args.data_set, attack, attack_file, arch, str(tmp_model), config, device, init=init,
                    progress=progress_enabled(args), on_epoch=on_epoch)
    write_state_dict(tmp_model, dest)
    print(f"CleanACC {res['acc']:.4f} on {res['n_clean']} clean test samples, PoisonACC (ASR) {res['asr']:.4f} on "
          f"{res['n_semantic']} semantic test samples, {res['seconds']:.1f}s")
    print(f"saved {dest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python train_backdoor_sem.py --option=... ...``."""
    return run_main(PROG_TRAIN, build_train_parser(), execute_train, argv)


if __name__ == "__main__":
    sys.exit(main())
