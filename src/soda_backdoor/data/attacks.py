"""Semantic attack definitions: which natural samples are relabelled, from which class to which.

The registry ships the original study's attacks (``semantic_attacks.json``) and synthetic
Fashion-MNIST attacks chosen by image statistics (``synthetic_attacks.json``, written by
``research/make_synthetic_attacks.py``), both package data. A user's own file of the same schema works the same way. Indices are positions in the dataset's
standard distribution order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import UserInputError
from .datasets import DATASET_ALIASES, Dataset

REQUIRED_FIELDS = ("dataset", "attack", "source_class", "target_class", "train_indices", "test_indices")

SHIPPED_FILES = ("semantic_attacks.json", "synthetic_attacks.json")


@dataclass(frozen=True)
class SemanticAttack:
    """One semantic attack: samples of ``source`` with a feature, relabelled to ``target``."""

    dataset: str
    name: str
    source: int
    target: int
    train_indices: tuple[int, ...]
    test_indices: tuple[int, ...]
    description: str = ""
    index_based: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "attack": self.name, "source_class": self.source,
                "target_class": self.target, "description": self.description,
                "n_train": len(self.train_indices), "n_test": len(self.test_indices)}


def _dataset_key(name: str) -> str:
    key = str(name).lower()
    return DATASET_ALIASES.get(key, key)


def _parse_entry(entry: Any, where: str) -> SemanticAttack:
    if not isinstance(entry, dict):
        raise UserInputError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in entry]
    if missing:
        raise UserInputError(f"{where}: missing field(s) {', '.join(missing)}; required: {', '.join(REQUIRED_FIELDS)}")
    for f in ("dataset", "attack"):
        if not isinstance(entry[f], str) or not entry[f]:
            raise UserInputError(f"{where}: field {f!r} must be a non-empty string")
    for f in ("source_class", "target_class"):
        if not isinstance(entry[f], int) or isinstance(entry[f], bool) or entry[f] < 0:
            raise UserInputError(f"{where}: field {f!r} must be a non-negative integer, got {entry[f]!r}")
    if entry["source_class"] == entry["target_class"]:
        raise UserInputError(f"{where}: source_class and target_class are both {entry['source_class']}")
    lists = {}
    for f in ("train_indices", "test_indices"):
        values = entry[f]
        if values is None and entry["train_indices"] is None and entry["test_indices"] is None:
            lists[f] = ()
            continue
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UserInputError(f"{where}: field {f!r} must be a list of integers")
        seen: set[int] = set()
        for v in values:
            if v in seen:
                raise UserInputError(f"{where}: {f} lists index {v} twice")
            seen.add(v)
        lists[f] = tuple(values)
    return SemanticAttack(
        dataset=_dataset_key(entry["dataset"]), name=entry["attack"], source=entry["source_class"],
        target=entry["target_class"], train_indices=lists["train_indices"],
        test_indices=lists["test_indices"], description=str(entry.get("description", "")),
        index_based=entry["train_indices"] is not None)


def load_attack_file(path: str | Path | None = None) -> list[SemanticAttack]:
    """Parse an attack file (the shipped registry when ``path`` is None)."""
    if path is None:
        return [a for name in SHIPPED_FILES for a in _parse_text(
            resources.files("soda_backdoor.data").joinpath(name).read_text(), name)]
    else:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"attack file {p} does not exist")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"cannot read attack file {p}: {exc}") from exc
        where = str(p)
    return _parse_text(text, where)


def _parse_text(text: str, where: str) -> list[SemanticAttack]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except RecursionError as exc:
        raise UserInputError(f"{where} is not a usable attack file: JSON nested too deeply") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserInputError(f"{where}: expected a non-empty list of attack objects")
    return [_parse_entry(e, f"{where} entry {i}") for i, e in enumerate(data)]


def list_attacks() -> list[SemanticAttack]:
    """The shipped attacks: the original study's and the synthetic Fashion-MNIST ones."""
    return load_attack_file(None)


def get_attack(name: str | None, dataset: str | None = None, attack_file: str | Path | None = None) -> SemanticAttack | None:
    """Pick an attack by name (``none`` means clean) from the registry or a user's file.

    With ``attack_file`` and no name, the file's first entry is used.
    """
    if name is not None and name.lower() in ("none", "clean"):
        return None
    attacks = load_attack_file(attack_file)
    if name is None:
        if attack_file is None:
            return None
        return attacks[0]
    ds = _dataset_key(dataset) if dataset else None
    matches = [a for a in attacks if a.name.lower() == name.lower() and (ds is None or a.dataset == ds)]
    if not matches:
        valid = sorted({a.name for a in attacks if ds is None or a.dataset == ds})
        where = f" for dataset {dataset}" if dataset else ""
        raise UserInputError(f"unknown attack {name!r}{where}; valid: {', '.join(valid) or '(none)'}, none")
    return matches[0]


def validate_attack(attack: SemanticAttack, data: Dataset) -> None:
    """Check that the attack fits the dataset: indices in range and of the source class."""
    if not attack.index_based:
        raise UserInputError(f"attack {attack.name!r} is defined by image folders, not indices; "
                             "only index-based attacks (fmnist, cifar10, gtsrb, mnistm) are supported")
    k = data.num_classes
    for f in ("source", "target"):
        if getattr(attack, f) >= k:
            raise UserInputError(f"attack {attack.name!r}: {f} class {getattr(attack, f)} is out of range 0..{k - 1}")
    for split, indices, labels in (("train", attack.train_indices, data.y_train),
                                   ("test", attack.test_indices, data.y_test)):
        n = len(labels)
        for i in indices:
            if i >= n or i < 0:
                raise UserInputError(f"attack {attack.name!r}: {split} index {i} is out of range 0..{n - 1}")
            if int(labels[i]) != attack.source:
                raise UserInputError(f"attack {attack.name!r}: {split} index {i} has label {int(labels[i])}, "
                                     f"not the source class {attack.source}")


def semantic_mask(indices: tuple[int, ...], n: int) -> Tensor:
    """Boolean mask of length ``n`` that is True at ``indices``."""
    import torch

    mask = torch.zeros(n, dtype=torch.bool)
    if indices:
        mask[torch.tensor(indices, dtype=torch.long)] = True
    return mask
