"""Shared fixtures: small models trained on real Fashion-MNIST (session-scoped, CI-sized)."""

from __future__ import annotations

from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The default training (8 epochs over the full clean split): under 5 minutes per model on 2
# cores. Shorter training leaves underfit models on which detection is not what users get.


def _require_fmnist() -> None:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """A striped-T-shirt backdoored ``cnn`` and a clean one, trained with the CLI defaults."""
    _require_fmnist()
    from soda_backdoor.cli.main import main

    out = tmp_path_factory.mktemp("real_models")
    paths = {}
    for attack in ("stripet", "none"):
        path = out / f"{attack}.safetensors"
        code = main(["train", "--dataset", "fmnist", "--attack", attack, "--arch", "cnn", "--seed", "0",
                     "--out", str(path), "--quiet",
                     "--json", str(out / f"{attack}.json")])
        assert code == 0
        paths[attack] = path
    return paths
