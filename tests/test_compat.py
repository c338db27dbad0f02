"""The study-compatible scripts ``train_backdoor_sem.py`` and ``semantic_mitigation.py``.

End to end on a tiny Fashion-MNIST-layout HDF5 file the test writes: the study's four steps
as subprocesses (resnet18, ``--ana_layer 6``), the same with the small CNN in-process, study
named state_dicts, the refusal of pickled models, flag handling and the HDF5 export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
TRAIN = str(ROOT / "train_backdoor_sem.py")
MITIGATE = str(ROOT / "semantic_mitigation.py")

from helpers import Evil  # noqa: E402
from soda_backdoor.analysis import parse_layer  # noqa: E402
from soda_backdoor.compat import mitigation as semantic_mitigation  # noqa: E402
from soda_backdoor.compat import train as train_backdoor_sem  # noqa: E402
from soda_backdoor.data import load_dataset  # noqa: E402
from soda_backdoor.models import create_model, get_model_spec, list_models  # noqa: E402

DETECTION_LINE = re.compile(r"^(\[Detection\] potential source class: \d+, target class: \d+|"
                            r"No semantic backdoor detected!)$", re.M)
# One thread: the machine is shared, and oversubscribed OpenMP threads make torch 10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels cycling 0..9; class c is a bright band at rows 2c+4..2c+6 over faint noise."""
    y = np.arange(n) % 10
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for c in range(10):
        x[y == c, 2 * c + 4:2 * c + 7, 3:25] = 255
    return x, y.astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with data/FMNIST/fmnist.h5 (study layout, 60 train / 40 test) and attack.json."""
    root = tmp_path_factory.mktemp("compat")
    rng = np.random.default_rng(0)
    (root / "data" / "FMNIST").mkdir(parents=True)
    xtr, ytr = _images(60, rng)
    xte, yte = _images(40, rng)
    with h5py.File(root / "data" / "FMNIST" / "fmnist.h5", "w") as fh:
        g = fh.create_group("data")
        g["x_train"], g["y_train"], g["x_test"], g["y_test"] = xtr, ytr, xte, yte
    attack = [{"dataset": "FMNIST", "attack": "tiny", "description": "test attack", "source_class": 0,
               "target_class": 2, "train_indices": [0, 10], "test_indices": [0, 10]}]
    (root / "attack.json").write_text(json.dumps(attack))
    return root


def _workdir(tiny: Path, tmp_path: Path) -> Path:
    """A fresh working folder with its own copy of the tiny data and attack file."""
    shutil.copytree(tiny / "data", tmp_path / "data")
    shutil.copy(tiny / "attack.json", tmp_path / "attack.json")
    return tmp_path


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, script, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def _state_dict(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    return state


DATA = ["--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST", "--num_class=10", "--attack_file=attack.json",
        "--t_attack=tiny", "--output_dir=./save", "--data_dir=./data/FMNIST", "--poison_type=semantic"]


@pytest.mark.slow  # about 80 s on 2 cores; test_four_steps_cnn_in_process covers the same steps fast
def test_four_steps_resnet18_subprocess(tiny: Path, tmp_path: Path) -> None:
    cwd = _workdir(tiny, tmp_path)
    arch = ["--arch=resnet18", "--batch_size=20"]
    model = "--in_model=./save/model_semtrain_resnet18_FMNIST_tiny_last.th"

    # Step 1: train a semantic-backdoored model.
    r = _run(TRAIN, ["--option=semtrain", "--epoch=2", "--lr=0.05", "--ratio=0.3", "--schedule", "5", "--resume=0",
                     "--checkpoint=na", "--poison_target=2", *arch, *DATA], cwd)
    assert r.returncode == 0, r.stderr
    trained = cwd / "save" / "model_semtrain_resnet18_FMNIST_tiny_last.th"
    assert _state_dict(trained)["linear.weight"].shape == (10, 512)
    assert "ignoring --data_dir" in r.stderr and "ignoring --poison_type" in r.stderr

    # Step 2: causality analysis, then detection.
    r = _run(MITIGATE, ["--option=causality_analysis", "--reanalyze=1", "--plot=0", "--ana_layer", "6",
                        "--num_sample=4", model, *arch, *DATA], cwd)
    assert r.returncode == 0, r.stderr
    with np.load(cwd / "save" / "causality_resnet18_FMNIST_tiny.npz") as z:
        assert z["matrices"].shape == (10, 512, 10)
        assert str(z["layer"]) == "linear:input"
    r = _run(MITIGATE, ["--option=detect", "--confidence=3", "--confidence2=2", "--ana_layer", "6",
                        "--num_sample=4", model, *arch, *DATA], cwd)
    assert r.returncode == 0, r.stderr
    assert DETECTION_LINE.search(r.stdout), r.stdout

    # Step 3: reconstruct infected samples.
    r = _run(MITIGATE, ["--option=gen_trigger", "--lr=0.1", "--potential_source=0", "--poison_target=2", "--reg=0.9",
                        "--epoch=20", "--num_sample=4", model, *arch, *DATA], cwd)
    assert r.returncode == 0, r.stderr
    adv = np.load(cwd / "data" / "FMNIST" / "advsample_tiny.npy", allow_pickle=False)
    assert adv.dtype == np.float32 and adv.ndim == 4 and adv.shape[1:] == (1, 28, 28) and len(adv) >= 2

    # Step 4: remove the backdoor.
    r = _run(MITIGATE, ["--option=remove", "--lr=0.01", "--reg=0.0005", "--epoch=1", "--top=0.5", "--ana_layer", "6",
                        "--potential_source=0", "--poison_target=2", "--num_sample=4", "--confidence=3", model,
                        "--arch=resnet18", "--batch_size=24", *DATA], cwd)
    assert r.returncode == 0, r.stderr
    assert "ignoring --confidence=3.0" in r.stderr
    for word in ("PoisonACC", "RPoisonACC", "CleanACC", "before", "after"):
        assert word in r.stdout
    repaired = _state_dict(cwd / "save" / "model_finetune_tiny_last.th")
    assert set(repaired) == set(_state_dict(trained))
    assert "RPoisonACC" in (cwd / "save" / "output.log").read_text()


def test_four_steps_cnn_in_process(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(_workdir(tiny, tmp_path))
    arch = ["--arch=cnn", "--batch_size=20"]
    model = "--in_model=./save/model_semtrain_cnn_FMNIST_tiny_last.th"
    assert train_backdoor_sem.main(["--option=semtrain", "--epoch=3", "--lr=0.05", "--ratio=0.3", *arch, *DATA]) == 0
    assert semantic_mitigation.main(["--option=causality_analysis", "--ana_layer", "1", "--num_sample=4", model,
                                     *arch, *DATA]) == 0
    capsys.readouterr()
    assert semantic_mitigation.main(["--option=detect", "--ana_layer", "1", "--num_sample=4", "--json=det.json",
                                     model, *arch, *DATA]) == 0
    assert DETECTION_LINE.search(capsys.readouterr().out)
    assert json.loads(Path("det.json").read_text())["layer"] == "fc:input"
    assert semantic_mitigation.main(["--option=gen_trigger", "--potential_source=0", "--poison_target=2",
                                     "--epoch=30", "--num_sample=4", model, *arch, *DATA]) == 0
    assert semantic_mitigation.main(["--option=remove", "--potential_source=0", "--poison_target=2", "--epoch=1",
                                     "--top=0.5", "--ana_layer", "1", "--num_sample=4", model, "--arch=cnn",
                                     "--batch_size=24", *DATA]) == 0
    assert _state_dict(Path("save/model_finetune_tiny_last.th"))["fc.weight"].shape == (10, 128)
    capsys.readouterr()
    assert semantic_mitigation.main(["--option=test", "--test_reverse=1", "--poison_target=2",
                                     "--in_model=./save/model_finetune_tiny_last.th", *arch, *DATA]) == 0
    out = capsys.readouterr().out
    assert re.search(r"acc: [01]\.\d{4} .*asr: [01]\.\d{4} .*rasr: [01]\.\d{4}", out), out

    # base: a clean model under the study's name.
    assert train_backdoor_sem.main(["--option=base", "--epoch=1", "--t_attack=clean", "--arch=cnn",
                                    "--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST"]) == 0
    assert _state_dict(Path("save/model_clean_cnn_FMNIST_last.th"))


def test_study_named_state_dict_loads(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(_workdir(tiny, tmp_path))
    Path("save").mkdir()
    torch.manual_seed(0)
    path = Path("save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th")
    torch.save(create_model("MobileNetV2", 10, 1, 28).state_dict(), path)
    common = [f"--in_model={path}", "--arch=MobileNetV2", "--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST",
              "--attack_file=attack.json", "--t_attack=tiny"]
    assert semantic_mitigation.main(["--option=test", *common]) == 0
    assert "acc: " in capsys.readouterr().out
    assert semantic_mitigation.main(["--option=detect", "--ana_layer", "4", "--num_sample=2", *common]) == 0
    assert DETECTION_LINE.search(capsys.readouterr().out)


@pytest.mark.parametrize("load_type", ["model", "state_dict"])
def test_malicious_pickle_does_not_run(tiny: Path, tmp_path: Path, load_type: str) -> None:
    cwd = _workdir(tiny, tmp_path)
    torch.save(Evil("touch MARKER"), cwd / "evil.th")
    r = _run(MITIGATE, ["--option=detect", f"--load_type={load_type}", "--in_model=evil.th", "--arch=cnn",
                        "--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST"], cwd)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert not (cwd / "MARKER").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "state_dict" in r.stderr


def test_trusted_pickled_model_is_converted(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(_workdir(tiny, tmp_path))
    torch.save(create_model("cnn", 10, 1, 28), "whole.th")
    args = ["--option=test", "--load_type=model", "--in_model=whole.th", "--arch=cnn",
            "--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST"]
    assert semantic_mitigation.main(args) == 2
    assert "trust-pickled-model" in capsys.readouterr().err
    assert semantic_mitigation.main([*args, "--trust-pickled-model"]) == 0
    assert "acc: " in capsys.readouterr().out


def test_flags(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(_workdir(tiny, tmp_path))
    with pytest.raises(SystemExit) as exc:
        semantic_mitigation.main(["--option=detect", "--no_such_flag=1", "--in_model=x.th"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_backdoor_sem.main(["--option=semtrain", "--bogus"])
    assert exc.value.code == 2
    capsys.readouterr()

    Path("save").mkdir()
    torch.save(create_model("MobileNetV2", 10, 1, 28).state_dict(), "save/m.th")
    base = ["--in_model=save/m.th", "--arch=MobileNetV2", "--data_set=./data/FMNIST/fmnist.h5", "--data_name=FMNIST"]
    assert semantic_mitigation.main(["--option=detect", "--ana_layer", "6", *base]) == 2
    err = capsys.readouterr().err
    assert "--ana_layer 6" in err and "valid: 4 (linear:input)" in err and len(err.strip().splitlines()) == 1
    assert semantic_mitigation.main(["--option=test", "--data_name=asl", *base[:2]]) == 2
    assert "valid: CIFAR10, FMNIST, GTSRB, mnistm" in capsys.readouterr().err
    assert semantic_mitigation.main(["--option=test", "--num_class=43", *base]) == 2
    assert "10 classes" in capsys.readouterr().err
    assert semantic_mitigation.main(["--option=gen_trigger", *base]) == 2
    assert "--potential_source" in capsys.readouterr().err
    assert semantic_mitigation.main(["--option=influence", *base]) == 2
    capsys.readouterr()
    assert semantic_mitigation.main(["--option=test", "--reanalyze=1", "--plot=0", "--potential_target=3", *base]) == 0
    err = capsys.readouterr().err
    for flag in ("--reanalyze", "--plot", "--potential_target"):
        assert f"ignoring {flag}=" in err


def test_export_h5_roundtrip(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tiny / "data" / "FMNIST" / "fmnist.h5"
    dest = tmp_path / "out" / "fmnist.h5"
    args = ["--option=export_h5", "--data_name=FMNIST", f"--data_dir={src}", f"--data_set={dest}"]
    assert semantic_mitigation.main(args) == 0
    with h5py.File(dest, "r") as fh:
        assert sorted(fh["data"].keys()) == ["x_test", "x_train", "y_test", "y_train"]
        assert fh["data/x_train"].shape == (60, 28, 28) and fh["data/x_train"].dtype == np.uint8
    a, b = load_dataset("fmnist", src), load_dataset("fmnist", dest)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert semantic_mitigation.main(args) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_study_ana_layers_resolve() -> None:
    expected = {"resnet18": {6, 5, 3, 1}, "resnet50": {6, 5, 3, 1}, "MobileNetV2": {4}, "vgg11_bn": {1},
                "densenet": {9}, "MobileNet": {3}, "shufflenetv2": {6}, "cnn": {1}}
    assert expected.keys() <= set(list_models())
    for name in list_models():
        spec = get_model_spec(name)
        if name in expected:
            assert {k for k, _ in spec.study_ana_layers} == expected[name]
        if name in ("cnn", "vgg11_bn", "resnet18"):
            model = create_model(name, 10, 3, 32)
            for _, layer in spec.study_ana_layers:
                parse_layer(model, layer)
    assert dict(get_model_spec("resnet18").study_ana_layers)[6] == "linear:input"
