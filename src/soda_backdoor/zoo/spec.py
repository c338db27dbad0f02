"""Zoo specs: which models a zoo holds, as a cross of architectures, attacks, seeds and recipes.

A spec is a TOML file (read with the standard library's ``tomllib``)::

    name = "dev"
    dataset = "fmnist"            # any dataset `soda train` takes
    # data_dir = "..."            # optional, relative to the spec file
    # attack_file = "..."         # optional attacks of the schema of semantic_attacks.json

    [[group]]                     # each group is crossed; the zoo is the union of the groups
    arch = ["cnn", "lenet"]
    attack = ["none", "stripet"]  # "none" trains a clean model
    seed = [0, 1]
    epochs = [6, 12]              # any TrainConfig field; a list is crossed, a scalar is fixed
    lr = 0.05
    milestones = [[3, 5]]         # a list of lists is crossed; omitted: 50% and 75% of epochs

Each model is identified by a hash of its full configuration (:attr:`ZooEntry.key`), so a
model is trained once whatever group or spec names it. A clean model's configuration drops
the poisoning settings (``ratio`` and ``source_blend`` are 0), so every backdoored model has
one *clean twin*: the same architecture, seed and recipe without the attack. The builder adds
missing twins, since a backdoored model is judged against its twin (docs/zoo.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..training import TrainConfig
from ..training.train import default_milestones

AXES = ("arch", "attack", "seed")
RECIPE_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")
POISON_FIELDS = ("ratio", "source_blend")


@dataclass(frozen=True)
class ZooEntry:
    """One model of a zoo: what to train, and how.

    Attributes:
        arch: registered architecture name.
        attack: attack name (``none``: clean).
        dataset: dataset name.
        train: the full training configuration (its ``seed`` is the model's seed).
        attack_file: the attack file (absolute path, or ``""`` for the shipped registry).
        data_dir: the dataset folder (``""``: the standard place).
    """

    arch: str
    attack: str
    dataset: str
    train: TrainConfig
    attack_file: str = ""
    data_dir: str = ""

    @property
    def clean(self) -> bool:
        return self.attack == "none"

    def config(self) -> dict[str, Any]:
        """The configuration that defines the model (what its key hashes)."""
        return {"arch": self.arch, "attack": self.attack, "dataset": self.dataset, "train": asdict(self.train),
                "attack_file": _file_digest(self.attack_file)}

    @property
    def key(self) -> str:
        text = json.dumps(self.config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def twin(self) -> "ZooEntry":
        """The clean model with the same architecture, seed and recipe."""
        return canonical(replace(self, attack="none", attack_file=""))


@dataclass(frozen=True)
class ZooSpec:
    """A parsed zoo spec."""

    name: str
    dataset: str
    entries: tuple[ZooEntry, ...]
    path: str = ""


def canonical(entry: ZooEntry) -> ZooEntry:
    """Drop settings that do not change a model (poisoning settings of a clean model)."""
    if entry.clean:
        return replace(entry, attack_file="", train=replace(entry.train, ratio=0.0, source_blend=0.0))
    return entry


def _file_digest(path: str) -> str:
    if not path:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _values(group: dict[str, Any], name: str, where: str) -> list[Any]:
    value = group[name]
    if name == "milestones":
        if not isinstance(value, list) or not value or not all(isinstance(v, (int, list)) for v in value):
            raise UserInputError(f"{where}: milestones must be a list of epochs or a list of such lists")
        return [tuple(v) for v in value] if isinstance(value[0], list) else [tuple(value)]
    return list(value) if isinstance(value, list) else [value]


def expand_group(group: dict[str, Any], dataset: str, attack_file: str, data_dir: str, where: str) -> list[ZooEntry]:
    """Every entry of one ``[[group]]`` table."""
    unknown = sorted(set(group) - set(AXES) - set(RECIPE_FIELDS))
    if unknown:
        raise UserInputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(AXES + RECIPE_FIELDS)}")
    for axis in AXES:
        if axis not in group:
            raise UserInputError(f"{where}: missing {axis!r} (a value or a list)")
    names = [n for n in (*AXES, *RECIPE_FIELDS) if n in group]
    out = []
    for combo in itertools.product(*(_values(group, n, where) for n in names)):
        values = dict(zip(names, combo))
        arch, attack, seed = str(values.pop("arch")), str(values.pop("attack")).lower(), values.pop("seed")
        if "milestones" not in values and "epochs" in values:
            values["milestones"] = default_milestones(int(values["epochs"]))
        try:
            train = TrainConfig(seed=int(seed), **values)
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{where}: {exc}") from exc
        attack = "none" if attack in ("none", "clean") else attack
        out.append(canonical(ZooEntry(arch, attack, dataset, train, attack_file if attack != "none" else "",
                                      data_dir)))
    return out


def load_zoo_spec(path: str | Path) -> ZooSpec:
    """Parse and check a zoo spec (architectures and attacks must exist)."""
    from ..data import get_attack
    from ..models import get_model_spec

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"zoo spec {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{p} is not a valid TOML zoo spec: {exc}") from exc
    groups = doc.get("group")
    if not isinstance(groups, list) or not groups:
        raise UserInputError(f"{p}: no [[group]] tables; a spec needs at least one")
    dataset = str(doc.get("dataset", "fmnist"))
    resolve = lambda key: str((p.parent / doc[key]).resolve()) if doc.get(key) else ""  # noqa: E731
    attack_file, data_dir = resolve("attack_file"), resolve("data_dir")
    entries: dict[str, ZooEntry] = {}
    for i, group in enumerate(groups):
        for e in expand_group(group, dataset, attack_file, data_dir, f"{p} group {i + 1}"):
            entries.setdefault(e.key, e)
    for e in entries.values():
        get_model_spec(e.arch)
        if not e.clean:
            get_attack(e.attack, dataset, e.attack_file or None)
    return ZooSpec(str(doc.get("name", p.stem)), dataset, tuple(entries.values()), str(p))


def with_twins(entries: tuple[ZooEntry, ...] | list[ZooEntry]) -> list[ZooEntry]:
    """The entries plus the clean twin of every backdoored entry (each model once)."""
    out: dict[str, ZooEntry] = {e.key: e for e in entries}
    for e in entries:
        if not e.clean:
            out.setdefault(e.twin().key, e.twin())
    return list(out.values())
