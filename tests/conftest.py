"""Shared fixtures: small models trained on real Fashion-MNIST (session-scoped, CI-sized)."""

from __future__ import annotations

import os
import subprocess
import sys
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

# The default training (12 epochs over the full clean split): about 6 minutes per model on one
# core. Shorter training leaves underfit models on which detection is not what users get.


def _require_fmnist() -> None:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """A striped-T-shirt backdoored ``cnn`` and a clean one, trained with the CLI defaults.

    The two trainings run at once, one CPU thread each: this small network gains nothing from
    a second thread, so two single-thread runs take about the time of one.
    """
    _require_fmnist()
    out = tmp_path_factory.mktemp("real_models")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs, paths = {}, {}
    for attack in ("stripet", "none"):
        path = out / f"{attack}.safetensors"
        cmd = [sys.executable, "-m", "soda_backdoor", "train", "--dataset", "fmnist", "--attack", attack,
               "--arch", "cnn", "--seed", "0", "--out", str(path), "--quiet", "--json", str(out / f"{attack}.json")]
        procs[attack] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        paths[attack] = path
    for attack, proc in procs.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"training the {attack} model failed:\n{log[-2000:]}"
    return paths
