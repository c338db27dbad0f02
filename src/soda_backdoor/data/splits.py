"""How a dataset is divided once an attack is known (docs/method.md §1, §2.6, §2.7).

- clean train: the train split minus the semantic train samples (clean labels);
- semantic train: the semantic train samples (relabelled to the target when poisoning);
- clean test: the test split minus the semantic test samples (ACC, and per-class analysis data);
- semantic test: the semantic test samples (ASR);
- defender subset: a seeded fraction (5%) of the clean train split, for repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attacks import SemanticAttack, semantic_mask, validate_attack
from .datasets import Dataset


@dataclass(frozen=True)
class Splits:
    """Index tensors into a :class:`Dataset`'s train and test splits."""

    clean_train: Tensor
    semantic_train: Tensor
    clean_test: Tensor
    semantic_test: Tensor
    defender: Tensor


def make_splits(data: Dataset, attack: SemanticAttack | None, seed: int = 0,
                defender_fraction: float = 0.05) -> Splits:
    """Divide ``data`` for ``attack`` (``None``: clean, no semantic samples).

    The defender subset is drawn with ``seed`` from the clean train split: one permutation of
    the whole train split, whose first clean samples are taken. Naming the attack then only
    drops its own samples (and takes the next few), so a model scanned with and without its
    attack's name is re-estimated and repaired on nearly the same samples (a permutation of the
    clean split alone gave an unrelated subset; docs/detection.md).
    """
    n_train, n_test = len(data.y_train), len(data.y_test)
    if attack is not None:
        validate_attack(attack, data)
        sem_tr = semantic_mask(attack.train_indices, n_train)
        sem_te = semantic_mask(attack.test_indices, n_test)
    else:
        sem_tr = torch.zeros(n_train, dtype=torch.bool)
        sem_te = torch.zeros(n_test, dtype=torch.bool)
    clean_train = (~sem_tr).nonzero().flatten()
    gen = torch.Generator().manual_seed(seed + 7919)
    k = max(1, int(defender_fraction * len(clean_train)))
    order = torch.randperm(n_train, generator=gen)
    defender = order[~sem_tr[order]][:k].sort().values
    return Splits(clean_train, sem_tr.nonzero().flatten(), (~sem_te).nonzero().flatten(),
                  sem_te.nonzero().flatten(), defender)


def class_samples(x: Tensor, y: Tensor, cls: int, limit: int) -> Tensor:
    """The first ``limit`` samples of class ``cls`` (deterministic order)."""
    idx = (y == cls).nonzero().flatten()[:limit]
    return x[idx]
