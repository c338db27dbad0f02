"""Unit tests of the training loop on a tiny dataset the test writes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from soda_backdoor.data.attacks import SemanticAttack
from soda_backdoor.data.datasets import load_dataset
from soda_backdoor.data.splits import make_splits
from soda_backdoor.models.cnn import SmallCNN
from soda_backdoor.training import TrainConfig, train_model
from helpers import write_fmnist_idx



def _train(folder: Path, config: TrainConfig) -> dict[str, torch.Tensor]:
    data = load_dataset("fmnist", folder)
    # class 0 of the tiny dataset is every 10th sample
    attack = SemanticAttack("fmnist", "mine", 0, 2, (0, 10, 20, 30), (7, 17))
    torch.manual_seed(0)
    model = SmallCNN(10, 1, 8)
    train_model(model, data, make_splits(data, attack, config.seed), attack, config, (0.0,), (1.0,),
                progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_source_blend_is_seeded_and_changes_only_poisoned_training(tmp_path: Path) -> None:
    folder = write_fmnist_idx(tmp_path, n_train=200, n_test=40)
    base = TrainConfig(epochs=1, milestones=(), batch_size=16, seed=0, source_blend=0.0)
    blended = replace(base, source_blend=0.5)
    a, b, plain = _train(folder, blended), _train(folder, blended), _train(folder, base)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a if a[k].is_floating_point())


def test_source_blend_is_a_no_op_for_clean_training(tmp_path: Path) -> None:
    folder = write_fmnist_idx(tmp_path, n_train=200, n_test=40)
    data = load_dataset("fmnist", folder)
    splits = make_splits(data, None)
    states = []
    for blend in (0.0, 0.5):
        torch.manual_seed(0)
        model = SmallCNN(10, 1, 8)
        train_model(model, data, splits, None, TrainConfig(epochs=1, milestones=(), batch_size=16, ratio=0.0,
                                                           source_blend=blend), (0.0,), (1.0,), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
