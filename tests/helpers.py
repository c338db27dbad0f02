"""Small data writers shared by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch


def idx_bytes(arr: np.ndarray) -> bytes:
    """``arr`` encoded as an idx file of unsigned bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_fmnist_idx(folder: Path, n_train: int = 50, n_test: int = 30, test_classes: int = 10) -> Path:
    """A tiny Fashion-MNIST in idx format. Train label of i is i % 10, test label (i + 3) % test_classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % test_classes,
    }
    for stem, arr in files.items():
        (folder / stem).write_bytes(idx_bytes(arr))
    return folder


def save_tiny_cnn(path: Path) -> Path:
    """An untrained, seeded ``cnn`` for 1x28x28 inputs saved with its metadata."""
    from soda_backdoor.models import ModelMeta, create_model, save_model

    torch.manual_seed(0)
    save_model(path, create_model("cnn", 10, 1, 28),
               ModelMeta(arch="cnn", num_classes=10, in_channels=1, input_size=28, mean=(0.0,), std=(1.0,),
                         dataset="fmnist"))
    return path
