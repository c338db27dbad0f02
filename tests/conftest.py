"""Shared fixtures: small models trained on real Fashion-MNIST (session-scoped, CI-sized)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# In-process torch runs on this many threads (the CI machine is small and shared; oversubscribed
# OpenMP threads make torch many times slower). Subprocesses get OMP_NUM_THREADS the same way.
TEST_THREADS = int(os.environ.get("SODA_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Every test runs with ``TEST_THREADS`` torch threads; the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)

# The default training (12 epochs over the full clean split): about 8 minutes per model on one
# core. Shorter training leaves underfit models on which detection is not what users get.
_TRAINED = ("stripet", "none")
_trainings: dict[str, tuple[subprocess.Popen, Path]] = {}


def _require_fmnist() -> None:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def _start_trainings(out: Path) -> None:
    """Start the two default trainings in the background, one CPU thread each, at a lower
    priority, so the tests that do not need them run meanwhile at full speed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for attack in _TRAINED:
        path = out / f"{attack}.safetensors"
        cmd = ["nice", "-n", "10", sys.executable, "-m", "soda_backdoor", "train", "--dataset", "fmnist",
               "--attack", attack, "--arch", "cnn", "--seed", "0", "--out", str(path), "--quiet",
               "--json", str(out / f"{attack}.json")]
        if shutil.which("nice") is None:
            cmd = cmd[3:]
        with open(out / f"{attack}.log", "w") as log:  # a file, not a pipe nobody reads for minutes
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _trainings[attack] = (proc, path)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the fast tier trains nothing
def pytest_collection_modifyitems(session, config, items) -> None:
    """The tests that use ``real_models`` run last, and its trainings start now: the rest of
    the suite (about 5 minutes on one core) runs beside them instead of after them."""
    uses = [item for item in items if "real_models" in getattr(item, "fixturenames", ())]
    if not uses or config.option.collectonly:
        return
    items[:] = [item for item in items if "real_models" not in getattr(item, "fixturenames", ())] + uses
    if (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        _start_trainings(Path(tempfile.mkdtemp(prefix="soda_real_models_")))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Trainings still running (a run stopped early) are ended; their folder is removed."""
    for proc, path in _trainings.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for folder in {path.parent for _, path in _trainings.values()}:
        shutil.rmtree(folder, ignore_errors=True)
    _trainings.clear()


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """A striped-T-shirt backdoored ``cnn`` and a clean one, trained with the CLI defaults.

    The two trainings run at once, one CPU thread each (this small network gains nothing from
    a second thread, so two single-thread runs take about the time of one), started when the
    tests were collected (:func:`pytest_collection_modifyitems`).
    """
    _require_fmnist()
    if not _trainings:  # collected without the hook's start (e.g. run from another conftest)
        _start_trainings(Path(tempfile.mkdtemp(prefix="soda_real_models_")))
    for attack, (proc, path) in _trainings.items():
        if proc.wait() != 0:
            log = path.with_suffix(".log").read_text()
            pytest.fail(f"training the {attack} model failed:\n{log[-2000:]}")
    return {attack: path for attack, (_, path) in _trainings.items()}
