"""Small data, model and payload writers shared by the tests."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch


def idx_bytes(arr: np.ndarray) -> bytes:
    """``arr`` encoded as an idx file of unsigned bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def tagged_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first two pixels encode their index (so order can be checked)."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return x


def fmnist_idx_arrays(n_train: int = 50, n_test: int = 30, test_classes: int = 10,
                      tagged: bool = False) -> dict[str, np.ndarray]:
    """The four arrays of a tiny Fashion-MNIST: train label of i is i % 10, test label (i + 3) % test_classes.

    ``tagged``: images carry their index in the first two pixels; otherwise plain noise.
    """
    if tagged:
        x_train, x_test = tagged_images(n_train, (28, 28), seed=1), tagged_images(n_test, (28, 28), seed=2)
    else:
        rng = np.random.default_rng(0)
        x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
        x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    return {"train-images-idx3-ubyte": x_train,
            "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
            "t10k-images-idx3-ubyte": x_test,
            "t10k-labels-idx1-ubyte": ((np.arange(n_test) + 3) % test_classes).astype(np.uint8)}


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    """Write each array as ``folder/STEM`` (or ``STEM.gz``) in idx format."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder


def write_fmnist_idx(folder: Path, n_train: int = 50, n_test: int = 30, test_classes: int = 10,
                     gz: bool = False, tagged: bool = False) -> Path:
    """A tiny Fashion-MNIST in idx format (see :func:`fmnist_idx_arrays`); returns the folder."""
    return write_idx_files(folder, fmnist_idx_arrays(n_train, n_test, test_classes, tagged), gz)


def save_cnn(path: Path, seed: int = 0, num_classes: int = 10, in_channels: int = 1, nan: bool = False,
             attack: str = "none") -> Path:
    """An untrained, seeded ``cnn`` for 28x28 inputs saved with its metadata (``nan``: one NaN weight)."""
    from soda_backdoor.models import ModelMeta, create_model, save_model

    torch.manual_seed(seed)
    module = create_model("cnn", num_classes, in_channels, 28)
    if nan:
        with torch.no_grad():
            next(module.parameters()).view(-1)[0] = float("nan")
    save_model(path, module, ModelMeta(arch="cnn", num_classes=num_classes, in_channels=in_channels, input_size=28,
                                       mean=(0.0,) * in_channels, std=(1.0,) * in_channels, dataset="fmnist",
                                       attack=attack))
    return path


class Evil:
    """A pickle payload: unpickling it runs ``command`` in a shell."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
