"""Dataset loaders on tiny files written here, the restricted CIFAR unpickler, and augmentations."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import Evil, fmnist_idx_arrays, idx_bytes, tagged_images, write_idx_files
from soda_backdoor.data.augment import augment, random_blend, random_crop, random_hflip
from soda_backdoor.data.datasets import denormalize, get_dataset_spec, load_dataset, normalize, read_idx
from soda_backdoor.errors import UserInputError


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- helpers

def write_fmnist_idx(folder: Path, n_train: int = 50, n_test: int = 30, gz: bool = False) -> dict[str, np.ndarray]:
    """A tiny tagged Fashion-MNIST in idx format; returns the arrays written."""
    arrays = fmnist_idx_arrays(n_train, n_test, tagged=True)
    write_idx_files(folder, arrays, gz)
    return arrays


def check_fmnist(ds, arrays: dict[str, np.ndarray]) -> None:
    assert ds.x_train.dtype == torch.uint8 and ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert tuple(ds.x_train.shape) == (50, 1, 28, 28)
    assert tuple(ds.x_test.shape) == (30, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


# ----------------------------------------------------------------------------- Fashion-MNIST idx

@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_fmnist_idx_folder(tmp_path: Path, gz: bool) -> None:
    arrays = write_fmnist_idx(tmp_path / "fm", gz=gz)
    ds = load_dataset("fmnist", tmp_path / "fm")
    check_fmnist(ds, arrays)
    assert ds.num_classes == 10


def test_fmnist_torchvision_layout(tmp_path: Path) -> None:
    arrays = write_fmnist_idx(tmp_path / "root" / "FashionMNIST" / "raw", gz=True)
    ds = load_dataset("fashion-mnist", str(tmp_path / "root"))
    check_fmnist(ds, arrays)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_dataset("fmnist", tmp_path / "nope")


def test_empty_folder_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="train-images-idx3-ubyte"):
        load_dataset("fmnist", tmp_path)


def test_truncated_idx(tmp_path: Path) -> None:
    write_fmnist_idx(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(UserInputError, match="truncated"):
        load_dataset("fmnist", tmp_path)
    p.write_bytes(p.read_bytes()[:9])  # inside the header
    with pytest.raises(UserInputError, match="truncated"):
        load_dataset("fmnist", tmp_path)


def test_bad_magic(tmp_path: Path) -> None:
    write_fmnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(UserInputError, match="magic"):
        load_dataset("fmnist", tmp_path)


@pytest.mark.parametrize("corrupt", ["flipped", "cut", "header_only"])
def test_corrupt_gzip(tmp_path: Path, corrupt: str) -> None:
    write_fmnist_idx(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    good = p.read_bytes()
    if corrupt == "flipped":
        bad = good[:10] + bytes(b ^ 0xFF for b in good[10:40]) + good[40:]
    elif corrupt == "cut":
        bad = good[: len(good) // 2]
    else:
        bad = good[:12]
    p.write_bytes(bad)
    with pytest.raises(UserInputError, match="gzip|truncated|magic"):
        load_dataset("fmnist", tmp_path)


@pytest.mark.parametrize("stem,content", [
    # 4 dims of 2**16 multiply to 2**64, which wraps to 0 in int64 arithmetic
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x04" + struct.pack(">IIII", *[2**16] * 4)),
    ("train-labels-idx1-ubyte", b"\x00\x00\x08\x00"),         # 0-dim, empty
    ("train-labels-idx1-ubyte", b"\x00\x00\x08\x00\x07"),     # 0-dim scalar
    ("t10k-labels-idx1-ubyte", idx_bytes(np.zeros((30, 2), np.uint8))),  # 2-dim labels
], ids=["wrapping_dims", "ndim0_empty", "ndim0_scalar", "labels_2d"])
def test_idx_odd_headers(tmp_path: Path, stem: str, content: bytes) -> None:
    write_fmnist_idx(tmp_path)
    (tmp_path / stem).write_bytes(content)
    with pytest.raises(UserInputError):
        load_dataset("fmnist", tmp_path)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    write_fmnist_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(49, np.uint8)))
    with pytest.raises(UserInputError, match="disagree"):
        load_dataset("fmnist", tmp_path)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_fmnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(30, 12, np.uint8)))
    with pytest.raises(UserInputError, match="labels"):
        load_dataset("fmnist", tmp_path)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = tagged_images(7, (3, 5))
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    assert get_dataset_spec("CIFAR-10").name == "cifar10"


# ----------------------------------------------------------------------------- CIFAR-10 python batches

def write_cifar(folder: Path, per_batch: int = 6, n_test: int = 5, protocol: int = 2) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = tagged_images(per_batch, (3072,), seed=b)
        x[:, 2] = b  # batch number, to check batch order
        y = [(b + i) % 10 for i in range(per_batch)]
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps({b"data": x, b"labels": y}, protocol=protocol))
        xs.append(x)
        ys.extend(y)
    xt = tagged_images(n_test, (3072,), seed=9)
    yt = [i % 10 for i in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": xt, b"labels": yt}, protocol=protocol))
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("nested", [True, False], ids=["parent", "batches"])
def test_cifar_batches(tmp_path: Path, protocol: int, nested: bool) -> None:
    xtr, ytr, xte, yte = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset("cifar10", tmp_path if nested else tmp_path / "cifar-10-batches-py")
    assert tuple(ds.x_train.shape) == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert tuple(ds.x_test.shape) == (5, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train.reshape(30, -1).numpy(), xtr)
    np.testing.assert_array_equal(ds.x_test.reshape(5, -1).numpy(), xte)
    np.testing.assert_array_equal(ds.y_train.numpy(), ytr)
    np.testing.assert_array_equal(ds.y_test.numpy(), yte)
    # batch 1 first, batch 5 last; channel-major layout (first 1024 values are red)
    assert ds.x_train[0, 0, 0, 2] == 1 and ds.x_train[-1, 0, 0, 2] == 5


def test_cifar_missing_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(UserInputError, match="data_batch_4"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("where", ["top", "inside"])
def test_cifar_unpickler_refuses_code(tmp_path: Path, where: str) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "PWNED"
    evil = Evil(f"touch {marker}")
    payload = evil if where == "top" else {b"data": evil, b"labels": [0]}
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        (tmp_path / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(UserInputError, match="data_batch_3"):
            load_dataset("cifar10", tmp_path)
        assert not marker.exists()


@pytest.mark.parametrize("payload", [[1, 2, 3], {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
                                     {b"labels": [0]}, {b"data": "text", b"labels": [0]}],
                         ids=["list", "shape", "nodata", "str"])
def test_cifar_wrong_content(tmp_path: Path, payload) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserInputError):
        load_dataset("cifar10", tmp_path)


def test_cifar_garbage_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(UserInputError):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------- HDF5 layouts

def test_h5_gtsrb_onehot(tmp_path: Path) -> None:
    ntr, nte = 86, 43
    xtr, xte = tagged_images(ntr, (32, 32, 3), 3), tagged_images(nte, (32, 32, 3), 4)
    ytr, yte = np.arange(ntr) % 43, (np.arange(nte) * 7) % 43
    p = tmp_path / "gtsrb.h5"
    with h5py.File(p, "w") as fh:
        fh["X_train"], fh["X_test"] = xtr, xte
        fh["Y_train"] = np.eye(43, dtype=np.float32)[ytr]
        fh["Y_test"] = np.eye(43, dtype=np.float32)[yte]
    for where in (p, tmp_path):  # the file, or a folder holding gtsrb.h5
        ds = load_dataset("gtsrb", where)
        assert ds.num_classes == 43
        assert tuple(ds.x_train.shape) == (ntr, 3, 32, 32) and ds.x_train.dtype == torch.uint8
        assert tuple(ds.x_test.shape) == (nte, 3, 32, 32)
        np.testing.assert_array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), xtr)
        np.testing.assert_array_equal(ds.x_test.permute(0, 2, 3, 1).numpy(), xte)
        np.testing.assert_array_equal(ds.y_train.numpy(), ytr)
        np.testing.assert_array_equal(ds.y_test.numpy(), yte)


def test_h5_cifar_integer_labels_nchw_float(tmp_path: Path) -> None:
    xtr = tagged_images(12, (3, 32, 32), 5)
    p = tmp_path / "cifar_dataset.h5"
    with h5py.File(p, "w") as fh:
        fh["X_train"] = xtr.astype(np.float32) / 255.0
        fh["X_test"] = xtr[:4]
        fh["Y_train"] = (np.arange(12) % 10)[:, None]
        fh["Y_test"] = (np.arange(4) % 10)[:, None]
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.x_train.numpy(), xtr)
    np.testing.assert_array_equal(ds.x_test.numpy(), xtr[:4])
    np.testing.assert_array_equal(ds.y_train.numpy(), np.arange(12) % 10)


def test_h5_fmnist_group_hwc(tmp_path: Path) -> None:
    xtr, xte = tagged_images(50, (28, 28, 1), 6), tagged_images(30, (28, 28, 1), 7)
    p = tmp_path / "fmnist.h5"
    with h5py.File(p, "w") as fh:
        g = fh.create_group("data")
        g["x_train"], g["x_test"] = xtr, xte
        g["y_train"], g["y_test"] = np.arange(50) % 10, np.arange(30) % 10
    ds = load_dataset("fmnist", p)
    assert tuple(ds.x_train.shape) == (50, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), xtr[..., 0])
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), xte[..., 0])
    np.testing.assert_array_equal(ds.y_test.numpy(), np.arange(30) % 10)


def test_h5_mnistm_resized_to_32(tmp_path: Path) -> None:
    # constant images survive resizing exactly, so the value still tells the index
    ntr, nte = 20, 10
    xtr = np.broadcast_to(np.arange(ntr, dtype=np.uint8)[:, None, None, None] * 10, (ntr, 28, 28, 3)).copy()
    xte = np.broadcast_to(np.arange(nte, dtype=np.uint8)[:, None, None, None] * 20, (nte, 28, 28, 3)).copy()
    p = tmp_path / "mnistm.h5"
    with h5py.File(p, "w") as fh:
        g = fh.create_group("data")
        g["x_train"], g["x_test"] = xtr, xte
        g["y_train"], g["y_test"] = np.arange(ntr) % 10, (np.arange(nte) + 1) % 10
    ds = load_dataset("mnist-m", tmp_path)
    assert tuple(ds.x_train.shape) == (ntr, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert tuple(ds.x_test.shape) == (nte, 3, 32, 32)
    expect_tr = torch.arange(ntr, dtype=torch.uint8).view(-1, 1, 1, 1).expand(ntr, 3, 32, 32) * 10
    expect_te = torch.arange(nte, dtype=torch.uint8).view(-1, 1, 1, 1).expand(nte, 3, 32, 32) * 20
    assert torch.equal(ds.x_train, expect_tr)
    assert torch.equal(ds.x_test, expect_te)
    np.testing.assert_array_equal(ds.y_test.numpy(), (np.arange(nte) + 1) % 10)


def test_h5_unknown_layout(tmp_path: Path) -> None:
    p = tmp_path / "odd.h5"
    with h5py.File(p, "w") as fh:
        fh["images"] = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(UserInputError, match="unknown HDF5 layout"):
        load_dataset("fmnist", p)


def test_h5_not_hdf5(tmp_path: Path) -> None:
    p = tmp_path / "junk.h5"
    p.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(UserInputError):
        load_dataset("gtsrb", p)


def test_h5_wrong_channels(tmp_path: Path) -> None:
    p = tmp_path / "gtsrb.h5"
    with h5py.File(p, "w") as fh:
        fh["X_train"] = fh["X_test"] = np.zeros((4, 32, 32), np.uint8)
        fh["Y_train"] = fh["Y_test"] = np.zeros(4, np.int64)
    with pytest.raises(UserInputError, match="channel"):
        load_dataset("gtsrb", p)


def test_h5_label_count_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "fmnist.h5"
    with h5py.File(p, "w") as fh:
        g = fh.create_group("data")
        g["x_train"], g["x_test"] = np.zeros((10, 28, 28), np.uint8), np.zeros((4, 28, 28), np.uint8)
        g["y_train"], g["y_test"] = np.zeros(7, np.int64), np.zeros(4, np.int64)
    with pytest.raises(UserInputError, match="label"):
        load_dataset("fmnist", p)


# ----------------------------------------------------------------------------- npz

def test_npz_generic(tmp_path: Path) -> None:
    xtr, xte = tagged_images(50, (28, 28), 8), tagged_images(30, (28, 28), 9)
    p = tmp_path / "fm.npz"
    np.savez(p, x_train=xtr, y_train=np.arange(50) % 10, x_test=xte, y_test=np.arange(30) % 10)
    ds = load_dataset("fmnist", p)
    assert tuple(ds.x_train.shape) == (50, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), xtr)
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), xte)
    np.testing.assert_array_equal(ds.y_train.numpy(), np.arange(50) % 10)


def test_npz_missing_array(tmp_path: Path) -> None:
    p = tmp_path / "fm.npz"
    np.savez(p, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2))
    with pytest.raises(UserInputError, match="x_test"):
        load_dataset("fmnist", p)


def test_npz_single_npy_and_bad_zip(tmp_path: Path) -> None:
    p = tmp_path / "fm.npz"
    np.save(tmp_path / "a.npy", np.zeros(3))
    p.write_bytes((tmp_path / "a.npy").read_bytes())
    with pytest.raises(UserInputError):
        load_dataset("fmnist", p)
    p.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(UserInputError):
        load_dataset("fmnist", p)


def test_unsupported_file_type(tmp_path: Path) -> None:
    p = tmp_path / "data.csv"
    p.write_text("1,2,3\n")
    with pytest.raises(UserInputError, match="unsupported file type"):
        load_dataset("fmnist", p)


# ----------------------------------------------------------------------------- augmentations

def _batch(n: int = 6, c: int = 3, s: int = 12) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0))


def test_augment_deterministic_and_shape() -> None:
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(3), pad=2, hflip=True, degrees=10.0, brightness=0.2)
    b = augment(x, torch.Generator().manual_seed(3), pad=2, hflip=True, degrees=10.0, brightness=0.2)
    c = augment(x, torch.Generator().manual_seed(4), pad=2, hflip=True, degrees=10.0, brightness=0.2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_blend_mixes_within_the_weight_range() -> None:
    x, pool = torch.ones(64, 1, 4, 4), torch.zeros(5, 1, 4, 4)
    out = random_blend(x, pool, 0.5, torch.Generator().manual_seed(0))
    weights = 1 - out[:, 0, 0, 0]  # the share of the pool image
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # one weight per image
    assert weights.min() >= 0 and weights.max() <= 0.5 and weights.std() > 0.05
    assert torch.equal(out, random_blend(x, pool, 0.5, torch.Generator().manual_seed(0)))
    assert torch.equal(random_blend(x, pool, 0.0, torch.Generator()), x)
    assert torch.equal(random_blend(x, pool[:0], 0.5, torch.Generator()), x)


def test_random_crop_pad_zero_is_identity() -> None:
    x = _batch()
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=0, hflip=False), x)


def test_random_crop_keeps_content() -> None:
    x = _batch(4, 1, 8)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # every output pixel is either padding (0) or an input pixel of the same image
    for i in range(4):
        vals = set(x[i].flatten().tolist()) | {0.0}
        assert set(out[i].flatten().tolist()) <= vals


def test_hflip_p1_equals_flip() -> None:
    x = _batch()
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=0.0), x)


@pytest.mark.parametrize("name", ["fmnist", "cifar10"])
def test_normalize_denormalize_roundtrip(name: str) -> None:
    spec = get_dataset_spec(name)
    x = torch.randint(0, 256, (5, spec.in_channels, 8, 8), dtype=torch.uint8)
    z = normalize(x, spec.mean, spec.std)
    assert z.dtype == torch.float32 and z.shape == x.shape
    back = denormalize(z, spec.mean, spec.std)
    torch.testing.assert_close(back, x.float() / 255.0, atol=1e-5, rtol=0)
    xf = x.float() / 255.0
    torch.testing.assert_close(normalize(xf, spec.mean, spec.std), z)
