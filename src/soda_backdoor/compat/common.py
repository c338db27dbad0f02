"""What the two study front ends share: flag handling, attack and model resolution, errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

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
                   poison_target: int | None):
    """The attack the steps should use (a ``SemanticAttack``, or ``None`` for clean data).

    ``--t_attack`` picks an attack by name from the shipped registry (or from ``--attack_file``);
    ``clean``/``none`` or no attack means clean data. When ``--poison_target`` differs from the
    attack's target (the study labels the semantic samples with ``--poison_target``), a copy of
    the attack with that target is used instead.
    """
    from soda_backdoor.data import get_attack

    if attack_file is None and is_clean(t_attack):
        return None
    name = None if t_attack is None else t_attack
    if name is not None and name.lower() in ("clean", "none"):
        name = None
    atk = get_attack(name, dataset, attack_file)
    if atk is None:
        return None
    if atk.dataset != dataset:
        raise CompatError(f"attack {atk.name!r} is defined on {atk.dataset}, not {dataset}")
    if poison_target is None or poison_target == atk.target:
        return atk
    note(prog, f"attack {atk.name!r}: target class set to {poison_target} by --poison_target "
               f"(the attack file says {atk.target})")
    return dataclasses.replace(atk, target=poison_target)


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


def unpickle_state_dict(path: str, trusted: bool, prog: str):
    """``--load_type=model``: the weights of a whole pickled module. Refused unless ``--trust-pickled-model``.

    With the flag, the file is unpickled (this runs code stored in it) and its ``state_dict``
    is returned; nothing is written.
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
    return {k.removeprefix("module."): v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_load_type(load_type: str) -> None:
    if load_type not in ("state_dict", "model"):
        raise CompatError(f"unknown --load_type={load_type}; valid: state_dict, model")


def open_study_model(path: str, load_type: str, trusted: bool, data, device, arch: str, prog: str):
    """The model to work on: a ``state_dict`` file loaded safely, or a trusted pickled module's weights."""
    from soda_backdoor.models import model_from_state_dict
    from soda_backdoor.workflow import check_model_fits, open_model

    check_load_type(load_type)
    if load_type == "state_dict":
        return open_model(path, data, device, arch)
    state = unpickle_state_dict(path, trusted, prog)
    spec = data.spec
    loaded = model_from_state_dict(state, arch, spec.num_classes, spec.in_channels, spec.image_size, spec.mean,
                                   spec.std, spec.name, device, where=str(path))
    check_model_fits(loaded, data, device, str(path))
    return loaded


def write_state_dict(module, dest: str | Path) -> Path:
    """Save ``module``'s weights to ``dest`` as a plain ``state_dict`` (the study's ``.th`` files)."""
    import torch

    from soda_backdoor.utils import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # the key order of a safetensors file (wider dtypes first, then by name), as before
    state = dict(sorted(state.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
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


def run_main(prog: str, parser: argparse.ArgumentParser, execute: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None) -> int:
    """Parse, run, and turn user errors into one line on stderr with exit status 2."""
    args = parser.parse_args(argv)
    from soda_backdoor.errors import UserInputError

    try:
        return int(execute(args) or 0)
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


