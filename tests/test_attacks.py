"""Semantic attack registry, user attack files, splits, and the CLI's handling of bad attack input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soda_backdoor.cli.main import main
from soda_backdoor.data.attacks import get_attack, list_attacks, load_attack_file, validate_attack
from soda_backdoor.data.datasets import load_dataset
from soda_backdoor.data.splits import make_splits
from soda_backdoor.errors import UserInputError
from helpers import save_cnn, write_fmnist_idx



# ----------------------------------------------------------------------------- helpers



# class 0 in the tiny dataset: train 0, 10, 20, 30, 40; test 7, 17, 27
GOOD = {"dataset": "fmnist", "attack": "mine", "source_class": 0, "target_class": 2,
        "train_indices": [0, 10, 20], "test_indices": [7, 27]}


def write_attack(path: Path, **changes) -> Path:
    entry = {**GOOD, **changes}
    entry = {k: v for k, v in entry.items() if v is not _DROP}
    path.write_text(json.dumps([entry]))
    return path


_DROP = object()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_fmnist_idx(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_cnn(tmp_path_factory.mktemp("model") / "m.safetensors")


# ----------------------------------------------------------------------------- registry

def test_registry_loads() -> None:
    attacks = list_attacks()
    assert attacks
    stripet = get_attack("stripet", "fmnist")
    assert stripet.dataset == "fmnist" and stripet.source == 0 and stripet.target == 2
    assert len(stripet.train_indices) == 93 and len(stripet.test_indices) == 18
    assert stripet.index_based
    assert get_attack("STRIPET", "Fashion-MNIST") == stripet
    assert {(a.dataset, a.name) for a in attacks} >= {("fmnist", "stripet"), ("cifar10", "green")}


def test_registry_indices_fit_standard_sizes() -> None:
    sizes = {"fmnist": (60000, 10000), "cifar10": (50000, 10000)}
    for a in list_attacks():
        if a.dataset in sizes:
            n_tr, n_te = sizes[a.dataset]
            assert all(0 <= i < n_tr for i in a.train_indices), a.name
            assert all(0 <= i < n_te for i in a.test_indices), a.name


@pytest.mark.parametrize("name", ["none", "None", "clean"])
def test_get_attack_none(name: str) -> None:
    assert get_attack(name) is None
    assert get_attack(name, "fmnist") is None
    assert get_attack(None) is None


def test_get_attack_unknown_lists_valid() -> None:
    with pytest.raises(UserInputError, match="stripet"):
        get_attack("nope", "fmnist")


# ----------------------------------------------------------------------------- user attack files

def test_user_file_ok(tmp_path: Path, tiny: Path) -> None:
    p = write_attack(tmp_path / "a.json")
    (atk,) = load_attack_file(p)
    assert (atk.name, atk.source, atk.target, atk.train_indices, atk.test_indices) == ("mine", 0, 2, (0, 10, 20), (7, 27))
    assert get_attack(None, "fmnist", p) == atk
    validate_attack(atk, load_dataset("fmnist", tiny))
    # a single object (not in a list) is accepted too
    p.write_text(json.dumps(GOOD))
    assert load_attack_file(p) == [atk]


@pytest.mark.parametrize("split,indices,bad", [("train", [0, 10, 50], 50), ("test", [7, 999], 999),
                                               ("train", [-1], -1)])
def test_out_of_range_index(tmp_path: Path, tiny: Path, split: str, indices: list[int], bad: int) -> None:
    atk = load_attack_file(write_attack(tmp_path / "a.json", **{f"{split}_indices": indices}))[0]
    with pytest.raises(UserInputError, match=rf"{split} index {bad} is out of range"):
        validate_attack(atk, load_dataset("fmnist", tiny))


@pytest.mark.parametrize("split,indices,bad", [("train", [0, 11], 11), ("test", [7, 8], 8)])
def test_wrong_class_index(tmp_path: Path, tiny: Path, split: str, indices: list[int], bad: int) -> None:
    atk = load_attack_file(write_attack(tmp_path / "a.json", **{f"{split}_indices": indices}))[0]
    with pytest.raises(UserInputError, match=rf"{split} index {bad} has label \d, not the source class 0"):
        validate_attack(atk, load_dataset("fmnist", tiny))


def test_duplicate_index(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="train_indices lists index 10 twice"):
        load_attack_file(write_attack(tmp_path / "a.json", train_indices=[0, 10, 20, 10]))


@pytest.mark.parametrize("field", ["dataset", "attack", "source_class", "target_class", "train_indices",
                                   "test_indices"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    with pytest.raises(UserInputError, match=rf"missing field\(s\) {field};"):
        load_attack_file(write_attack(tmp_path / "a.json", **{field: _DROP}))


@pytest.mark.parametrize("changes,words", [
    ({"source_class": -1}, "source_class"), ({"target_class": "2"}, "target_class"),
    ({"source_class": True}, "source_class"), ({"source_class": 2}, "both 2"),
    ({"train_indices": [0, 1.5]}, "train_indices"), ({"test_indices": [True]}, "test_indices"),
    ({"train_indices": "0,10"}, "train_indices"), ({"dataset": ""}, "dataset"), ({"attack": 3}, "attack"),
])
def test_bad_field_values(tmp_path: Path, changes: dict, words: str) -> None:
    with pytest.raises(UserInputError, match=words):
        load_attack_file(write_attack(tmp_path / "a.json", **changes))


@pytest.mark.parametrize("text,words", [("[{\"dataset\": \"fmnist\",", "not valid JSON"), ("", "not valid JSON"),
                                        ("[]", "non-empty list"), ("42", "non-empty list"),
                                        ("[1]", "entry 0: expected an object")])
def test_bad_json(tmp_path: Path, text: str, words: str) -> None:
    p = tmp_path / "a.json"
    p.write_text(text)
    with pytest.raises(UserInputError, match=words):
        load_attack_file(p)


def test_missing_and_binary_attack_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_attack_file(tmp_path / "nope.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(UserInputError):
        load_attack_file(tmp_path / "b.json")


def test_deeply_nested_json(tmp_path: Path) -> None:
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserInputError):
        load_attack_file(p)


def test_index_free_attack_is_refused(tiny: Path) -> None:
    folder_based = [a for a in list_attacks() if not a.index_based]
    assert folder_based
    with pytest.raises(UserInputError, match="index-based"):
        validate_attack(folder_based[0], load_dataset("fmnist", tiny))


# ----------------------------------------------------------------------------- splits

def test_make_splits(tmp_path: Path) -> None:
    data = load_dataset("fmnist", write_fmnist_idx(tmp_path, n_train=400, n_test=60))
    sem_train = [i for i in range(0, 400, 10)][:25]  # class 0
    sem_test = [7, 17, 37]
    atk = load_attack_file(write_attack(tmp_path / "a.json", train_indices=sem_train[::-1], test_indices=sem_test))[0]
    s = make_splits(data, atk, seed=0)
    assert s.semantic_train.tolist() == sorted(sem_train)
    assert s.semantic_test.tolist() == sem_test
    assert sorted(s.clean_train.tolist() + s.semantic_train.tolist()) == list(range(400))
    assert sorted(s.clean_test.tolist() + s.semantic_test.tolist()) == list(range(60))
    assert not set(s.clean_train.tolist()) & set(sem_train)
    assert not set(s.clean_test.tolist()) & set(sem_test)
    # defender subset: 5% of the clean train split, disjoint from the semantic samples, seeded
    assert len(s.defender) == int(0.05 * len(s.clean_train)) == 18
    assert set(s.defender.tolist()) <= set(s.clean_train.tolist())
    assert not set(s.defender.tolist()) & set(sem_train)
    assert len(set(s.defender.tolist())) == len(s.defender)
    assert torch.equal(make_splits(data, atk, seed=0).defender, s.defender)
    assert not torch.equal(make_splits(data, atk, seed=1).defender, s.defender)

    clean = make_splits(data, None)
    assert len(clean.semantic_train) == 0 and len(clean.semantic_test) == 0
    assert clean.clean_train.tolist() == list(range(400)) and len(clean.defender) == 20
    # naming the attack only drops its samples from the subset drawn without it (and takes the next)
    named, unnamed = set(s.defender.tolist()), set(clean.defender.tolist())
    assert len(named & unnamed) >= len(named) - len(unnamed & set(sem_train))
    assert len(named & unnamed) >= 16


def test_make_splits_validates(tmp_path: Path, tiny: Path) -> None:
    atk = load_attack_file(write_attack(tmp_path / "a.json", train_indices=[0, 1]))[0]
    with pytest.raises(UserInputError, match="train index 1 has label 1"):
        make_splits(load_dataset("fmnist", tiny), atk)


# ----------------------------------------------------------------------------- CLI

def _evaluate(model: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--dataset", "fmnist", "--data-dir", str(data_dir),
            "--device", "cpu", "--quiet", *extra]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("soda evaluate: error:")
    return lines[0]


def test_cli_evaluate_ok(tmp_path: Path, tiny: Path, model_file: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    rc = main(_evaluate(model_file, tiny, "--attack-file", str(write_attack(tmp_path / "a.json")), "--json", str(out)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(out.read_text())
    assert res["attack"] == "mine" and res["n_semantic"] == 2 and res["n_clean"] == 28


@pytest.mark.parametrize("changes,words", [
    ({"train_indices": [0, 10, 50]}, "train index 50 is out of range"),
    ({"test_indices": [7, 8]}, "test index 8 has label"),
    ({"train_indices": [0, 10, 10]}, "lists index 10 twice"),
    ({"source_class": _DROP}, "missing field(s) source_class"),
    ({"dataset": "cifar10"}, "defined on cifar10"),
    ({"target_class": 12}, "target class 12 is out of range"),
])
def test_cli_bad_attack_file(tmp_path: Path, tiny: Path, model_file: Path, capsys, changes: dict,
                             words: str) -> None:
    bad = write_attack(tmp_path / "bad.json", **changes)
    line = _one_line_error(capsys, main(_evaluate(model_file, tiny, "--attack-file", str(bad))))
    assert words in line


def test_cli_bad_json(tmp_path: Path, tiny: Path, model_file: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"dataset": "fmnist",\n "attack": ')
    line = _one_line_error(capsys, main(_evaluate(model_file, tiny, "--attack-file", str(bad))))
    assert "not valid JSON" in line and "line 2" in line


def test_cli_missing_attack_file(tmp_path: Path, tiny: Path, model_file: Path, capsys) -> None:
    line = _one_line_error(capsys, main(_evaluate(model_file, tiny, "--attack-file", str(tmp_path / "no.json"))))
    assert "does not exist" in line


def test_cli_missing_data_dir(tmp_path: Path, model_file: Path, capsys) -> None:
    line = _one_line_error(capsys, main(_evaluate(model_file, tmp_path / "nowhere", "--attack", "none")))
    assert "nowhere" in line and "does not exist" in line


def test_cli_unknown_attack_name(tiny: Path, model_file: Path, capsys) -> None:
    line = _one_line_error(capsys, main(_evaluate(model_file, tiny, "--attack", "nope")))
    assert "unknown attack 'nope'" in line and "stripet" in line


def test_cli_registry_attack_on_tiny_data(tiny: Path, model_file: Path, capsys) -> None:
    # the shipped stripet indices run past the 50-image tiny train split
    line = _one_line_error(capsys, main(_evaluate(model_file, tiny, "--attack", "stripet")))
    assert "out of range" in line
