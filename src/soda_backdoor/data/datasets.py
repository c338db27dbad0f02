"""Datasets as in-memory tensors, read from their standard distributions.

Every loader returns a :class:`Dataset` with uint8 images in ``N x C x H x W`` and int64
labels. Normalisation is not applied here: :func:`normalize` maps uint8 images to the model's
input space with the dataset's mean and std (the study's preprocessing, docs/study_compat.md).

Supported sources (``data_dir`` may be a folder or a file):

- Fashion-MNIST / MNIST: the idx files (optionally ``.gz``), in the folder itself or in a
  torchvision-style ``FashionMNIST/raw/`` below it.
- CIFAR-10: the python batches folder ``cifar-10-batches-py`` (read with a restricted
  unpickler that only rebuilds numpy arrays).
- The study's HDF5 layouts: ``X_train/Y_train/X_test/Y_test`` (CIFAR-10, GTSRB; one-hot or
  integer labels) or a group ``data`` with ``x_train/y_train/x_test/y_test`` (FMNIST, MNIST-M).
- A generic ``.npz`` with ``x_train/y_train/x_test/y_test``.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserInputError

logger = logging.getLogger(__name__)

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetSpec:
    """What a model trained on this dataset expects.

    Attributes:
        name: registry name (``fmnist``, ``cifar10``, ...).
        num_classes: number of classes.
        in_channels: image channels.
        image_size: square input side in pixels.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by after subtracting the mean.
        class_names: human-readable names (may be empty).
        default_dirs: folders searched when no ``--data-dir`` is given.
        pad: padding of the random crop used for augmentation.
        hflip: whether horizontal flips are a valid augmentation.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    default_dirs: tuple[str, ...] = ()
    pad: int = 4
    hflip: bool = True


DATASETS: dict[str, DatasetSpec] = {
    "fmnist": DatasetSpec("fmnist", 10, 1, 28, (0.0,), (1.0,), FMNIST_CLASSES,
                          ("/usr/share/datasets/fashion-mnist", "data/fmnist", "data/FMNIST")),
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.0,), (1.0,), tuple(str(i) for i in range(10)),
                         ("/usr/share/datasets/mnist", "data/mnist"), hflip=False),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           CIFAR10_CLASSES, ("data/CIFAR10", "data/cifar10", "data")),
    "gtsrb": DatasetSpec("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (),
                         ("data/GTSRB", "data/gtsrb"), hflip=False),
    "mnistm": DatasetSpec("mnistm", 10, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), tuple(str(i) for i in range(10)),
                          ("data/mnist_m", "data/mnistm"), hflip=False),
}

DATASET_ALIASES = {"fashion-mnist": "fmnist", "fashionmnist": "fmnist", "cifar": "cifar10",
                   "cifar-10": "cifar10", "mnist_m": "mnistm", "mnist-m": "mnistm"}


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up a dataset by name (case-insensitive, a few aliases accepted)."""
    key = name.lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserInputError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


@dataclass(frozen=True)
class Dataset:
    """A dataset held in memory.

    Shape:
        x_train: ``(N, C, H, W)`` uint8; y_train: ``(N,)`` int64; likewise for the test split.
    """

    spec: DatasetSpec
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Map uint8 (or [0,1] float) images to the model's normalised input space.

    Shape:
        x: ``(N, C, H, W)``; returns float32 of the same shape.
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] for viewing."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


# ----------------------------------------------------------------------------- readers

def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserInputError(f"corrupt gzip file {path}: {exc}") from exc
    return data


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST/Fashion-MNIST format), gzipped or not."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserInputError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserInputError(f"{path} is truncated (idx header incomplete)")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = math.prod(dims)  # exact: np.prod would wrap around for huge headers
    if len(data) - header != expected:
        raise UserInputError(f"{path} is truncated or corrupt: header promises {expected} bytes, "
                             f"file holds {len(data) - header}")
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    except ValueError as exc:  # e.g. a zero dimension beside dimensions too large for numpy's index type
        raise UserInputError(f"{path} is corrupt: its header's shape {dims} cannot be read ({exc})") from exc


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz",
                 folder / "FashionMNIST" / "raw" / stem, folder / "FashionMNIST" / "raw" / f"{stem}.gz",
                 folder / "MNIST" / "raw" / stem, folder / "MNIST" / "raw" / f"{stem}.gz",
                 folder / "raw" / stem, folder / "raw" / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def load_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four standard idx files of (Fashion-)MNIST from ``folder``."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find_idx(folder, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise UserInputError(f"{folder} lacks the idx file(s) {', '.join(missing)} "
                             f"(looked in the folder and in FashionMNIST/raw/)")
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    if (xtr.ndim != 3 or xte.ndim != 3 or ytr.ndim != 1 or yte.ndim != 1
            or len(xtr) != len(ytr) or len(xte) != len(yte)):
        raise UserInputError(f"idx files in {folder} disagree: images {xtr.shape}/{xte.shape}, "
                             f"labels {ytr.shape}/{yte.shape}")
    return xtr[:, None], ytr, xte[:, None], yte


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else (no code runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any failure of the restricted unpickler means a bad file
        raise UserInputError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise UserInputError(f"{path} is not a CIFAR-10 python batch (no dict inside)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise UserInputError(f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    try:
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise UserInputError(f"{path}: 'data' or 'labels' is not numeric: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UserInputError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_batches(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10's python batches (``data_batch_1..5`` and ``test_batch``), in order."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserInputError(f"{folder} lacks CIFAR-10 batch file(s) {', '.join(missing)}")
    parts = [_read_cifar_batch(folder / n) for n in names]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return xtr, ytr, parts[5][0], parts[5][1]


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
            or y.dtype == np.bool_):
        raise UserInputError(f"{path}: labels have dtype {y.dtype}, expected integers or one-hot rows")
    if y.ndim == 2 and y.shape[1] > 1:
        return y.argmax(axis=1).astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and not (np.abs(y.astype(np.float64)) < 2**31).all():
        raise UserInputError(f"{path}: labels contain NaN, Inf or values far out of range")
    return y.reshape(-1).astype(np.int64)


def _images_nchw(x: np.ndarray, channels: int, path: Path) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UserInputError(f"{path}: images have shape {x.shape}, expected (N, H, W[, C])")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise UserInputError(f"{path}: images have dtype {x.dtype}, expected integers or floats")
    if 0 in x.shape[1:]:
        raise UserInputError(f"{path}: images have shape {x.shape}, which holds no pixels")
    if x.shape[1] != channels and x.shape[-1] in (1, 3, 4) and x.shape[-1] <= x.shape[1]:
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise UserInputError(f"{path}: images contain NaN or Inf")
        if np.issubdtype(x.dtype, np.floating) and x.size and float(np.max(x)) <= 1.0 + 1e-6:
            x = x * 255.0
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


# The study's HDF5 layouts (docs/study_compat.md): which keys, how images and labels are stored.
H5_LAYOUTS = {
    "fmnist": {"group": "data", "keys": ("x_train", "y_train", "x_test", "y_test"), "labels": "int"},
    "mnist": {"group": "data", "keys": ("x_train", "y_train", "x_test", "y_test"), "labels": "int"},
    "mnistm": {"group": "data", "keys": ("x_train", "y_train", "x_test", "y_test"), "labels": "int"},
    "cifar10": {"group": None, "keys": ("X_train", "Y_train", "X_test", "Y_test"), "labels": "column"},
    "gtsrb": {"group": None, "keys": ("X_train", "Y_train", "X_test", "Y_test"), "labels": "onehot"},
}


def load_h5(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read one of the study's HDF5 layouts (see module docstring)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if all(k in fh for k in ("X_train", "Y_train", "X_test", "Y_test")):
                items = [fh[k] for k in ("X_train", "Y_train", "X_test", "Y_test")]
            elif ("data" in fh and isinstance(fh["data"], h5py.Group)
                  and all(k in fh["data"] for k in ("x_train", "y_train", "x_test", "y_test"))):
                g = fh["data"]
                items = [g[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            elif all(k in fh for k in ("x_train", "y_train", "x_test", "y_test")):
                items = [fh[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            else:
                raise UserInputError(f"{path}: unknown HDF5 layout (top-level keys {sorted(fh.keys())}); "
                                     "expected X_train/Y_train/X_test/Y_test or group 'data' with "
                                     "x_train/y_train/x_test/y_test")
            for item in items:
                if not isinstance(item, h5py.Dataset):
                    raise UserInputError(f"{path}: {item.name} is a group, expected an array")
            arrays = [item[()] for item in items]
    except OSError as exc:
        raise UserInputError(f"cannot read HDF5 file {path}: {exc}") from exc
    xtr, ytr, xte, yte = arrays
    return (_images_nchw(xtr, channels, path), _labels(ytr, path),
            _images_nchw(xte, channels, path), _labels(yte, path))



def write_h5(data: Dataset, dest: str | Path) -> dict[str, tuple[int, ...]]:
    """Write ``data`` in the study's HDF5 layout for its dataset (:data:`H5_LAYOUTS`), atomically.

    Returns:
        The shape of each array written, by key.
    """
    import h5py

    from ..utils import atomic_path

    layout = H5_LAYOUTS[data.spec.name]
    arrays = []
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        x = x.numpy()
        x = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)  # N,H,W (grey) or N,H,W,C (colour)
        y = y.numpy().astype(np.int64)
        if layout["labels"] == "column":
            y = y[:, None]
        elif layout["labels"] == "onehot":
            y = np.eye(data.num_classes, dtype=np.uint8)[y]
        else:
            y = y.astype(np.uint8)
        arrays += [np.ascontiguousarray(x, dtype=np.uint8), y]
    with atomic_path(Path(dest), suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as fh:
            root = fh.create_group(layout["group"]) if layout["group"] else fh
            for key, arr in zip(layout["keys"], arrays):
                root.create_dataset(key, data=arr, compression="gzip", compression_opts=4)
    return {k: a.shape for k, a in zip(layout["keys"], arrays)}


def load_npz(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read a generic ``.npz`` with ``x_train/y_train/x_test/y_test``."""
    try:
        with open(path, "rb") as fh:  # our own handle: np.load leaks its own when the zip is bad
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserInputError(f"{path} holds a single array, not an npz archive "
                                     "with x_train, y_train, x_test, y_test")
            with z:
                missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
                if missing:
                    raise UserInputError(f"{path} lacks array(s) {', '.join(missing)}; "
                                         "expected x_train, y_train, x_test, y_test")
                xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except UserInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserInputError(f"cannot read npz file {path}: {exc}") from exc
    return (_images_nchw(xtr, channels, path), _labels(ytr, path),
            _images_nchw(xte, channels, path), _labels(yte, path))


def _read_source(spec: DatasetSpec, path: Path):
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".h5", ".hdf5"):
            return load_h5(path, spec.in_channels)
        if suffix == ".npz":
            return load_npz(path, spec.in_channels)
        raise UserInputError(f"{path}: unsupported file type {suffix!r}; valid: .h5, .hdf5, .npz or a folder")
    if _find_idx(path, "train-images-idx3-ubyte"):
        return load_idx_folder(path)
    if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py").is_dir():
        return load_cifar_batches(path)
    for name in (f"{spec.name}.h5", "fmnist.h5", "cifar_dataset.h5", "gtsrb.h5", "mnistm.h5", f"{spec.name}.npz"):
        if (path / name).is_file():
            return _read_source(spec, path / name)
    if spec.in_channels == 1:
        return load_idx_folder(path)  # raises with the list of idx files it wanted
    raise UserInputError(f"{path} holds no dataset files for {spec.name} (idx files, CIFAR-10 batches, "
                         f"{spec.name}.h5 or .npz)")


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    t = torch.from_numpy(x).float()
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name from ``data_dir`` (a folder or file) or its default folders.

    Raises:
        UserInputError: when no files are found, they are corrupt, or their shapes or labels
            do not fit the dataset.
    """
    spec = get_dataset_spec(name)
    if data_dir is None:
        candidates = [Path(d) for d in spec.default_dirs if Path(d).exists()]
        if not candidates:
            hint = " (apt-get install dataset-fashion-mnist)" if spec.name == "fmnist" else ""
            raise UserInputError(f"no data directory for {spec.name}: none of {', '.join(spec.default_dirs)} "
                                 f"exists; pass --data-dir{hint}")
        path = candidates[0]
    else:
        path = Path(data_dir)
        if not path.exists():
            raise UserInputError(f"data directory {path} does not exist")
    xtr, ytr, xte, yte = _read_source(spec, path)
    xtr, xte = _resize(xtr, spec.image_size), _resize(xte, spec.image_size)
    for x in (xtr, xte):
        if x.shape[1] != spec.in_channels:
            raise UserInputError(f"{path}: images have {x.shape[1]} channel(s), {spec.name} needs {spec.in_channels}")
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if len(x) != len(y):
            raise UserInputError(f"{path}: {split} split has {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise UserInputError(f"{path}: {split} labels span {y.min()}..{y.max()}, "
                                 f"{spec.name} has classes 0..{spec.num_classes - 1}")
    logger.info("loaded %s from %s: %d train, %d test", spec.name, path, len(ytr), len(yte))
    return Dataset(spec, torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64)),
                   torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64)), source=str(path))
