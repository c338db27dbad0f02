"""Property tests: whatever a user hands us, the answer is data or a UserInputError, never a crash."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from soda_backdoor.cli.main import main
from soda_backdoor.data.attacks import REQUIRED_FIELDS, load_attack_file, validate_attack
from soda_backdoor.data.datasets import load_dataset
from soda_backdoor.errors import UserInputError
from helpers import idx_bytes, save_cnn, write_fmnist_idx


FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- helpers



@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_fmnist_idx(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def tiny_data(tiny: Path):
    return load_dataset("fmnist", tiny)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_cnn(tmp_path_factory.mktemp("model") / "m.safetensors")


def _fresh_dir(base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# ----------------------------------------------------------------------------- strategies

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 60)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
            | st.sampled_from(["fmnist", "FMNIST", "cifar10", "none", ""]))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(REQUIRED_FIELDS + ("description",)) | st.text(max_size=5), inner, max_size=6),
    max_leaves=20)

_index_lists = st.none() | st.lists(st.integers(-5, 60) | st.booleans() | st.floats(-2, 60), max_size=6) | json_values
near_valid_entry = st.fixed_dictionaries(
    {"dataset": st.sampled_from(["fmnist", "Fashion-MNIST", "cifar10", "", 3]),
     "attack": st.sampled_from(["a", "", None]) | st.text(max_size=3),
     "source_class": st.integers(-2, 12) | json_values,
     "target_class": st.integers(-2, 12) | json_values,
     "train_indices": _index_lists,
     "test_indices": _index_lists},
    optional={"description": json_values}).flatmap(
    lambda d: st.sets(st.sampled_from(sorted(d)), max_size=2).map(
        lambda drop: {k: v for k, v in d.items() if k not in drop}))
attack_documents = json_values | near_valid_entry | st.lists(near_valid_entry, min_size=1, max_size=3)


def _encode_json(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


raw_attack_bytes = (st.binary(max_size=200) | st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass"))
                    | attack_documents.map(_encode_json)
                    | attack_documents.map(_encode_json).flatmap(
                        lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda k: b[:k])))


# ----------------------------------------------------------------------------- attack files

@FUZZ
@given(doc=attack_documents)
def test_attack_file_json_values(work: Path, tiny_data, doc) -> None:
    p = work / "attack.json"
    p.write_bytes(_encode_json(doc))
    try:
        attacks = load_attack_file(p)
    except UserInputError:
        return
    assert attacks
    for atk in attacks:  # a parsed attack either fits the data or is refused cleanly
        try:
            validate_attack(atk, tiny_data)
        except UserInputError:
            pass


@FUZZ
@given(content=raw_attack_bytes)
@example(content=b"[" * 50_000)
@example(content=b'{"dataset": "fmnist", "attack": "x", "source_class": 0, "target_class": 2, '
                 b'"train_indices": [1e400], "test_indices": []}')
def test_attack_file_bytes(work: Path, content: bytes) -> None:
    p = work / "attack_raw.json"
    p.write_bytes(content)
    try:
        load_attack_file(p)
    except UserInputError:
        pass


# ----------------------------------------------------------------------------- dataset files

def _idx_mutations() -> st.SearchStrategy[bytes]:
    """Bytes near a valid idx file: good magic, odd dims, short or long payloads, or noise."""
    good_magic = st.builds(
        lambda ndim, dims, payload: bytes([0, 0, 8, ndim]) + b"".join(struct.pack(">I", d) for d in dims) + payload,
        st.integers(0, 5), st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 40), max_size=5),
        st.binary(max_size=300))
    consistent = st.builds(
        lambda shape, fill: idx_bytes(np.full(shape, fill, np.uint8)),
        st.lists(st.integers(0, 30), min_size=0, max_size=4).map(tuple), st.integers(0, 255))
    return st.binary(max_size=300) | good_magic | consistent


@FUZZ
@given(stem=st.sampled_from(IDX_STEMS), content=_idx_mutations(), gz=st.sampled_from(["plain", "gz", "gz_raw"]))
# found by this test: a zero dimension beside ones too large for numpy (0 bytes promised, 0 held)
@example(stem=IDX_STEMS[0], content=b"\x00\x00\x08\x04\x00\x00\x00\x00\x00\x00\x01\x00\x02\x00\x00\x00@\x00\x00\x00",
         gz="plain")
def test_idx_bytes(work: Path, stem: str, content: bytes, gz: str) -> None:
    folder = write_fmnist_idx(_fresh_dir(work, "idx"))
    (folder / stem).unlink()
    if gz == "plain":
        (folder / stem).write_bytes(content)
    elif gz == "gz":
        (folder / f"{stem}.gz").write_bytes(gzip.compress(content))
    else:  # a .gz file that is not gzip, or a damaged one
        (folder / f"{stem}.gz").write_bytes(gzip.compress(content)[: 10 + len(content) % 20] + content[:30])
    try:
        ds = load_dataset("fmnist", folder)
    except UserInputError:
        return
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (1, 28, 28)
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)


_dtypes = st.sampled_from([np.uint8, np.int16, np.int64, np.uint64, np.float16, np.float32, np.float64,
                           np.bool_, np.complex64, "U3", "S2"])
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
_images = _dtypes.flatmap(lambda dt: st.sampled_from([(3, 28, 28), (2, 28, 28, 1), (2, 1, 28, 28), (2, 5, 7),
                                                      (0, 28, 28), (0, 4, 4), (3, 0, 0), (2, 4, 4, 3)]).flatmap(
    lambda shape: hnp.arrays(dt, shape)))
_labels = (_arrays | hnp.arrays(np.int64, st.integers(0, 4), elements=st.integers(-2, 12))
           | hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(1, 10))))


@st.composite
def _split_arrays(draw) -> dict[str, np.ndarray]:
    return {"x_train": draw(_images | _arrays), "y_train": draw(_labels),
            "x_test": draw(_images | _arrays), "y_test": draw(_labels)}


@FUZZ
@given(content=st.binary(max_size=400) | st.sampled_from([b"PK\x03\x04", b"\x93NUMPY", b"\x89HDF\r\n\x1a\n"])
       .flatmap(lambda head: st.binary(max_size=300).map(lambda tail: head + tail)),
       suffix=st.sampled_from([".npz", ".h5", ".hdf5"]))
def test_container_bytes(work: Path, content: bytes, suffix: str) -> None:
    p = work / f"data{suffix}"
    p.write_bytes(content)
    with pytest.raises(UserInputError):  # garbage this short never holds a dataset
        load_dataset("fmnist", p)


@FUZZ
@given(arrays=_split_arrays(), drop=st.sampled_from([None, "x_train", "y_test"]))
@example(arrays={"x_train": np.zeros((0, 28, 28), np.uint8), "y_train": np.zeros(0, np.int64),
                 "x_test": np.zeros((0, 0, 0), np.uint8), "y_test": np.zeros(0, np.int64)}, drop=None)
@example(arrays={"x_train": np.zeros((3, 0, 0), np.uint8), "y_train": np.zeros(3, np.int64),
                 "x_test": np.zeros((2, 28, 28, 1), np.float32), "y_test": np.array([np.nan, 1e30])}, drop=None)
def test_npz_arrays(work: Path, arrays: dict[str, np.ndarray], drop) -> None:
    p = work / "arrays.npz"
    if drop:
        arrays = {k: v for k, v in arrays.items() if k != drop}
    with open(p, "wb") as fh:
        np.savez(fh, **arrays)
    try:
        ds = load_dataset("fmnist", p)
    except UserInputError:
        return
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (1, 28, 28)
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)


@FUZZ
@given(arrays=_split_arrays(), layout=st.sampled_from(["upper", "group", "flat", "scalar_group"]))
def test_h5_arrays(work: Path, arrays: dict[str, np.ndarray], layout: str) -> None:
    p = work / "arrays.h5"
    # h5py stores no "U" arrays: encode them. Lone surrogates are data too, hence surrogatepass.
    arrays = {k: np.char.encode(v, "utf-8", "surrogatepass") if v.dtype.kind == "U" else v
              for k, v in arrays.items()}
    with h5py.File(p, "w") as fh:
        if layout == "upper":
            for k, v in arrays.items():
                fh[k[0].upper() + k[1:]] = v
        elif layout == "group":
            g = fh.create_group("data")
            for k, v in arrays.items():
                g[k] = v
        elif layout == "flat":
            for k, v in arrays.items():
                fh[k] = v
        else:  # one of the keys is a group, not a dataset
            g = fh.create_group("data")
            for k, v in arrays.items():
                g[k] = v
            del g["y_train"]
            g.create_group("y_train")
    try:
        ds = load_dataset("fmnist", p)
    except UserInputError:
        return
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (1, 28, 28)
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)


# ----------------------------------------------------------------------------- the CLI

@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=raw_attack_bytes)
@example(content=b"[" * 50_000)
@example(content=b"\xff\xfe\x00\x80")
def test_cli_garbage_attack_file(work: Path, tiny: Path, model_file: Path, capsys, content: bytes) -> None:
    p = work / "cli_attack.json"
    p.write_bytes(content)
    capsys.readouterr()
    rc = main(["evaluate", "--model", str(model_file), "--dataset", "fmnist", "--data-dir", str(tiny),
               "--attack-file", str(p), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc in (0, 2), err
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("soda evaluate: error:"), err
