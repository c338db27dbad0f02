"""Which files an audit covers: model files under folders, or the rows of a manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import UserInputError

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    """A file to audit and what a manifest says about it (empty: the audit's defaults).

    Attributes:
        path: the file.
        arch: architecture of a state_dict without metadata.
        dataset: dataset name.
        data_dir: dataset folder or file.
        attack: attack whose semantic samples are kept out of the clean data.
        attack_file: JSON file of attacks.
    """

    path: str
    arch: str = ""
    dataset: str = ""
    data_dir: str = ""
    attack: str = ""
    attack_file: str = ""


def find_models(paths: Iterable[str | Path]) -> list[ModelFile]:
    """Every model file under ``paths``: a file is taken as given, a folder is searched recursively.

    Raises:
        UserInputError: a path that does not exist.
    """
    out: list[ModelFile] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(ModelFile(str(p)))
        elif p.is_dir():
            out.extend(ModelFile(str(f)) for f in sorted(p.rglob("*"))
                       if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES)
        else:
            raise UserInputError(f"{p} does not exist (give model files or folders that hold them)")
    return out


def read_model_manifest(path: str | Path) -> list[ModelFile]:
    """The models of a JSON-lines manifest (``soda zoo build`` writes one).

    Each line is an object with ``file`` (relative to the manifest's folder, or absolute) and
    optionally ``arch``, ``dataset``, ``data_dir``, ``attack`` and ``attack_file``.

    Raises:
        UserInputError: a missing manifest, a line that is not such an object.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"manifest {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path} line {i} is not JSON ({exc.msg}); each line must be an object "
                                 "with a 'file' key") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise UserInputError(f"{path} line {i} has no 'file'; each line must be an object with a 'file' key")
        if "error" in row:  # a failed build: there is no model
            continue
        file = Path(row["file"])
        file = file if file.is_absolute() else path.parent / file
        out.append(ModelFile(str(file), **{k: str(row.get(k) or "") for k in
                                           ("arch", "dataset", "data_dir", "attack", "attack_file")}))
    return out


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (``""`` when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(HASH_BLOCK):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()
