"""Issue 6, "safe and robust by default": hostile model files, clear errors, atomic writes, determinism.

Everything runs on a tiny generated Fashion-MNIST (idx files) and untrained ``cnn`` models.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import soda_backdoor
from soda_backdoor.cli.main import main
from soda_backdoor.artifacts import model_fingerprint
from soda_backdoor.errors import UserInputError
from soda_backdoor.models import ModelMeta, create_model, load_model, save_model
from soda_backdoor.utils import write_atomic
from helpers import Evil, save_cnn, write_fmnist_idx



# ----------------------------------------------------------------------------- helpers



def one_line_error(capsys, rc: int, command: str, progress_ok: bool = False) -> str:
    """Assert exit 2 and exactly one stderr line, ``soda COMMAND: error: ...``; return it.

    ``progress_ok``: ``soda run`` announces each step on stderr ("[evaluate] running ...") before
    the step fails; those lines are allowed, the error itself must still be one line.
    """
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if progress_ok:
        lines = [ln for ln in lines if not (ln.startswith("[") and ln.endswith("running ..."))]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"soda {command}: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_fmnist_idx(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> Path:
    return save_cnn(tmp_path_factory.mktemp("ma") / "a.safetensors", seed=0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> Path:
    return save_cnn(tmp_path_factory.mktemp("mb") / "b.safetensors", seed=1)


@pytest.fixture(scope="module")
def model_fit(tmp_path_factory, tiny: Path) -> Path:
    """A cnn briefly fitted to the tiny train split: unlike an untrained one, its output depends on the
    input enough for a 100-step reconstruction to reach the target."""
    from soda_backdoor.data import load_dataset, normalize

    data = load_dataset("fmnist", tiny)
    x, y = normalize(data.x_train, (0.0,), (1.0,)), data.y_train
    torch.manual_seed(0)
    module = create_model("cnn", 10, 1, 28)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("mfit") / "fit.safetensors"
    save_model(path, module, ModelMeta(arch="cnn", num_classes=10, in_channels=1, input_size=28, mean=(0.0,),
                                       std=(1.0,), dataset="fmnist"))
    return path


def _data(tiny: Path) -> list[str]:
    return ["--dataset", "fmnist", "--data-dir", str(tiny), "--device", "cpu", "--quiet"]


# ----------------------------------------------------------------------------- 1. malicious pickles

@pytest.fixture(params=["torch_save", "plain_pickle", "in_state_dict"])
def evil(request, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.th"
    if request.param == "torch_save":
        torch.save(Evil(f"touch {marker}"), path)
    elif request.param == "plain_pickle":
        with open(path, "wb") as fh:
            pickle.dump(Evil(f"touch {marker}"), fh)
    else:  # a state_dict-looking dict with the payload inside
        torch.save({"conv1.weight": torch.zeros(1), "extra": Evil(f"touch {marker}")}, path)
    return path, marker


def _commands(model: Path, tiny: Path, tmp: Path) -> dict[str, list[str]]:
    m = ["--model", str(model), "--arch", "cnn"]
    return {
        "evaluate": ["evaluate", *m, *_data(tiny)],
        "detect": ["detect", *m, *_data(tiny), "--num-samples", "4"],
        "reconstruct": ["reconstruct", *m, *_data(tiny), "--source", "0", "--target", "2",
                        "--out", str(tmp / "x.npz")],
        "repair": ["repair", *m, *_data(tiny), "--source", "0", "--target", "2", "--samples", str(tmp / "any.npz"),
                   "--out", str(tmp / "r.safetensors")],
        "run": ["run", *m, *_data(tiny), "--out-dir", str(tmp / "run"), "--num-samples", "4"],
        "layers": ["layers", *m, "--dataset", "fmnist"],
    }


@pytest.mark.parametrize("command", ["evaluate", "detect", "reconstruct", "repair", "run", "layers"])
def test_malicious_pickle_is_refused_by_every_command(command: str, evil, tiny: Path, tmp_path: Path,
                                                      capsys) -> None:
    path, marker = evil
    (tmp_path / "any.npz").write_bytes(b"not used")
    with warnings.catch_warnings(record=True) as caught:  # a warning would be a second line on stderr
        warnings.simplefilter("always")
        rc = main(_commands(path, tiny, tmp_path)[command])
    line = one_line_error(capsys, rc, command, progress_ok=command == "run")
    assert not [str(w.message) for w in caught]
    assert "refused" in line and "could run code" in line and str(path) in line
    assert not marker.exists()
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "r.safetensors").exists()


def test_malicious_pickle_real_process(evil, tmp_path: Path) -> None:
    """The same through a real ``python -m soda_backdoor``: stderr is exactly one line."""
    path, marker = evil
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "soda_backdoor", "layers", "--model", str(path), "--arch", "cnn",
                        "--dataset", "fmnist"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("soda layers: error: refused")
    assert not marker.exists()


def test_malicious_pickle_load_model_raises(evil) -> None:
    path, marker = evil
    with pytest.raises(UserInputError, match="refused"):
        soda_backdoor.load_model(path, arch="cnn", num_classes=10, in_channels=1)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. clear errors

def test_missing_data_dir(tmp_path: Path, model_a: Path, capsys) -> None:
    rc = main(["evaluate", "--model", str(model_a), *_data(tmp_path / "nowhere")])
    line = one_line_error(capsys, rc, "evaluate")
    assert "nowhere" in line and "does not exist" in line


def test_corrupt_idx_file(tmp_path: Path, tiny: Path, model_a: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    f = bad / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    line = one_line_error(capsys, main(["evaluate", "--model", str(model_a), *_data(bad)]), "evaluate")
    assert "t10k-images-idx3-ubyte" in line and "truncated or corrupt" in line
    f.write_bytes(b"\x13\x37garbage")
    line = one_line_error(capsys, main(["evaluate", "--model", str(model_a), *_data(bad)]), "evaluate")
    assert "bad magic number" in line


def test_class_count_mismatch(tmp_path: Path, tiny: Path, capsys) -> None:
    m7 = save_cnn(tmp_path / "m7.safetensors", num_classes=7)
    line = one_line_error(capsys, main(["evaluate", "--model", str(m7), *_data(tiny)]), "evaluate")
    assert "has 7 classes" in line and "10" in line


def test_channel_mismatch(tmp_path: Path, tiny: Path, capsys) -> None:
    m3 = save_cnn(tmp_path / "m3.safetensors", in_channels=3)
    line = one_line_error(capsys, main(["detect", "--model", str(m3), *_data(tiny), "--num-samples", "4"]), "detect")
    assert "3-channel input" in line and "fmnist" in line


def test_unknown_layer_lists_valid_names(tiny: Path, model_a: Path, capsys) -> None:
    rc = main(["detect", "--model", str(model_a), *_data(tiny), "--num-samples", "4", "--layer", "nonexistent"])
    line = one_line_error(capsys, rc, "detect")
    assert "no layer named 'nonexistent'" in line and "valid names include" in line
    names = [n for n, _ in load_model(model_a).module.named_modules() if n]
    assert any(n in line for n in names)


def test_empty_class_in_analysis_data(tmp_path: Path, model_a: Path, capsys) -> None:
    data = write_fmnist_idx(tmp_path / "no9", test_classes=9)  # test labels 0..8 only
    rc = main(["detect", "--model", str(model_a), *_data(data), "--num-samples", "4"])
    line = one_line_error(capsys, rc, "detect")
    assert "class 9 has no clean samples" in line


def test_nan_weights(tmp_path: Path, tiny: Path, capsys) -> None:
    bad = save_cnn(tmp_path / "nan.safetensors", nan=True)
    line = one_line_error(capsys, main(["evaluate", "--model", str(bad), *_data(tiny)]), "evaluate")
    assert "NaN or Inf" in line
    with pytest.raises(UserInputError, match="NaN or Inf"):
        load_model(bad)


def _write_samples(path: Path, samples: np.ndarray, source: int, target: int, fingerprint: str) -> Path:
    np.savez_compressed(path, samples=samples.astype(np.float32), starts=samples.astype(np.float32),
                        start_indices=np.arange(len(samples)), source=np.array(source), target=np.array(target),
                        target_prob=np.ones(len(samples), np.float32), steps=np.ones(len(samples), np.int64),
                        tried=np.array(len(samples)), model_fingerprint=np.array(fingerprint))
    return path


def _repair(model: Path, tiny: Path, samples: Path, tmp: Path, source: int = 0, target: int = 2) -> list[str]:
    return ["repair", "--model", str(model), *_data(tiny), "--source", str(source), "--target", str(target),
            "--samples", str(samples), "--out", str(tmp / "rep.safetensors"), "--repair-epochs", "1"]


def test_samples_for_another_pair(tmp_path: Path, tiny: Path, model_a: Path, capsys) -> None:
    fp = model_fingerprint(load_model(model_a).module)
    s = _write_samples(tmp_path / "s.npz", np.zeros((4, 1, 28, 28)), 0, 2, fp)
    line = one_line_error(capsys, main(_repair(model_a, tiny, s, tmp_path, source=1, target=2)), "repair")
    assert "source 0 -> target 2, not 1 -> 2" in line
    line = one_line_error(capsys, main(_repair(model_a, tiny, s, tmp_path, source=0, target=3)), "repair")
    assert "not 0 -> 3" in line
    assert not (tmp_path / "rep.safetensors").exists()


def test_samples_from_another_model(tmp_path: Path, tiny: Path, model_fit: Path, model_a: Path, capsys) -> None:
    s = tmp_path / "x.npz"
    rc = main(["reconstruct", "--model", str(model_fit), *_data(tiny), "--source", "0", "--target", "2",
               "--out", str(s), "--steps", "100", "--num-keep", "4", "--png", ""])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    with np.load(s) as z:
        assert len(z["samples"]) >= 2  # a usable samples file, only for another model
    line = one_line_error(capsys, main(_repair(model_a, tiny, s, tmp_path)), "repair")
    assert "reconstructed from another model" in line
    assert not (tmp_path / "rep.safetensors").exists()


def test_samples_with_nan(tmp_path: Path, tiny: Path, model_a: Path, capsys) -> None:
    fp = model_fingerprint(load_model(model_a).module)
    x = np.zeros((4, 1, 28, 28))
    x[1, 0, 3, 3] = np.nan
    s = _write_samples(tmp_path / "s.npz", x, 0, 2, fp)
    line = one_line_error(capsys, main(_repair(model_a, tiny, s, tmp_path)), "repair")
    assert "NaN or Inf" in line
    assert not (tmp_path / "rep.safetensors").exists()


# ----------------------------------------------------------------------------- 3. atomic writes

def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old content")

    def writer(p: Path) -> None:
        p.write_bytes(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(target, writer)
    assert target.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]

    write_atomic(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_save_model_failure_keeps_old_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    path = save_cnn(tmp_path / "m.safetensors", seed=0)
    before = path.read_bytes()
    old = load_model(path).module.state_dict()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="no space left"):
        save_model(path, create_model("cnn", 10, 1, 28),
                   ModelMeta(arch="cnn", num_classes=10, in_channels=1, input_size=28, mean=(0.0,), std=(1.0,)))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    again = load_model(path).module.state_dict()
    assert all(torch.equal(old[k], again[k]) for k in old)


# ----------------------------------------------------------------------------- 4. determinism

def test_reconstruct_is_deterministic(tmp_path: Path, tiny: Path, model_fit: Path, capsys) -> None:
    arrays = []
    for i in range(2):
        out = tmp_path / f"x{i}.npz"
        rc = main(["reconstruct", "--model", str(model_fit), *_data(tiny), "--source", "0", "--target", "2",
                   "--out", str(out), "--steps", "100", "--num-keep", "5", "--seed", "3", "--png", ""])
        assert rc == 0, capsys.readouterr().err
        with np.load(out) as z:
            arrays.append({k: z[k] for k in z.files})
    a, b = arrays
    assert a["samples"].shape[1:] == (1, 28, 28)
    assert len(a["samples"]) > 0  # something was really optimised, not two empty arrays
    assert not np.array_equal(a["samples"], a["starts"])
    assert a["samples"].tobytes() == b["samples"].tobytes()
    for k in ("starts", "start_indices", "steps", "target_prob", "tried", "model_fingerprint"):
        assert a[k].tobytes() == b[k].tobytes(), k


def test_detect_is_deterministic(tmp_path: Path, tiny: Path, model_fit: Path, capsys) -> None:
    results = []
    for i in range(2):
        out = tmp_path / f"d{i}.json"
        rc = main(["detect", "--model", str(model_fit), *_data(tiny), "--num-samples", "4", "--seed", "1",
                   "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        res = json.loads(out.read_text())
        assert "seconds" in res and "analysis_seconds" in res
        results.append({k: v for k, v in res.items() if k not in ("seconds", "analysis_seconds")})
    # compared as text: NaN entries (if any) are equal there but not as floats
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)
