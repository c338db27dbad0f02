"""Build a zoo: train every model of a spec once, in parallel, resumably (docs/zoo.md).

``DIR/models/<key>.safetensors`` holds each model, ``DIR/manifest.jsonl`` one line per
finished model (appended as each finishes, so a killed build loses only the models in
flight). A rerun trains only the models whose line or file is missing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..executor import run_tasks
from ..utils import environment
from .spec import ZooEntry, ZooSpec, with_twins

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"


@dataclass(frozen=True)
class BuildReport:
    """What a build did."""

    out_dir: str
    planned: int
    skipped: int
    trained: int
    failed: int
    seconds: float
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_jsonl(path: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of a JSON-lines file by their ``key`` (later lines win; a torn line is ignored)."""
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows[row["key"]] = row
    return rows


def read_manifest(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of ``DIR/manifest.jsonl`` by model key."""
    return read_jsonl(Path(out_dir) / MANIFEST)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line and flush it to disk (after a torn last line, on a line of its own)."""
    with open(path, "a+b") as fh:
        torn = False
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        fh.write(("\n" if torn else "").encode() + (json.dumps(row, sort_keys=True) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


@functools.lru_cache(maxsize=4)
def worker_context(dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None, seed: int = 0):
    """The data context, loaded once per worker process and reused for every model."""
    from ..workflow import load_context

    return load_context(dataset, data_dir, attack, attack_file, seed)


def _train_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one entry, save it, and return its outcome for the manifest."""
    from ..models import save_model
    from ..utils import resolve_device
    from ..workflow import train

    entry: ZooEntry = task["entry"]
    ctx = worker_context(entry.dataset, entry.data_dir or None, entry.attack, entry.attack_file or None,
                         entry.train.seed)
    rep = train(ctx, entry.train, resolve_device(task["device"]), entry.arch)
    save_model(task["path"], rep.model.module, rep.model.meta)
    ev = rep.evaluation
    return {"acc": ev.acc, "asr": ev.asr, "n_clean": ev.n_clean, "n_semantic": ev.n_semantic,
            "train_seconds": rep.seconds, "threads": torch.get_num_threads()}


def manifest_row(entry: ZooEntry, file: str, result: dict[str, Any]) -> dict[str, Any]:
    """A manifest line: the full config, the outcome, and where it was measured."""
    from ..data import get_attack

    atk = None if entry.clean else get_attack(entry.attack, entry.dataset, entry.attack_file or None)
    return {"key": entry.key, "file": file, "arch": entry.arch, "attack": entry.attack, "dataset": entry.dataset,
            "seed": entry.train.seed, "source": atk.source if atk else None, "target": atk.target if atk else None,
            "twin": "" if entry.clean else entry.twin().key, "config": entry.config(),
            "attack_file": entry.attack_file, "data_dir": entry.data_dir, **result,
            **environment(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_zoo(spec: ZooSpec, out_dir: str | Path, jobs: int = 1, device: str = "cpu",
              on_model: Callable[[dict[str, Any], int, int], None] | None = None, backend: str = "local",
              ray_address: str | None = None) -> BuildReport:
    """Train every model of ``spec`` (and the clean twins) that ``out_dir`` lacks.

    Args:
        spec: the parsed spec.
        out_dir: the zoo folder (created).
        jobs: trainings at once, one thread each.
        device: ``cpu``, ``cuda`` or ``auto``.
        on_model: called with each finished row (an ``error`` key on failure), done and total.
        backend: ``local`` (a process pool) or ``ray`` (Ray tasks; the model files must land
            on a folder every node shares).
        ray_address: Ray cluster to join (``auto``: this machine's); ``None`` starts a local one.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({"name": spec.name, "path": spec.path, "dataset": spec.dataset,
                                               "keys": [e.key for e in spec.entries]}, indent=1))
    done = read_manifest(out)
    entries = with_twins(spec.entries)
    # Clean models first: every backdoored model's twin exists as early as possible.
    entries.sort(key=lambda e: (not e.clean, e.arch, e.attack, e.train.seed))
    todo = [e for e in entries if not (e.key in done and (out / done[e.key]["file"]).is_file())]
    tasks = [{"entry": e, "path": str(out / "models" / f"{e.key}.safetensors"), "device": device} for e in todo]
    trained, errors = 0, []
    outcomes = run_tasks(_train_task, tasks, jobs, backend=backend, ray_address=ray_address)
    for i, outcome in enumerate(outcomes, 1):
        entry: ZooEntry = outcome.task["entry"]
        if outcome.ok:
            row = manifest_row(entry, f"models/{entry.key}.safetensors", outcome.result)
            append_jsonl(out / MANIFEST, row)
            trained += 1
        else:
            row = {"key": entry.key, "arch": entry.arch, "attack": entry.attack, "config": entry.config(),
                   "error": outcome.error, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_jsonl(out / ERRORS, row)
            errors.append(f"{entry.key} ({entry.arch}, {entry.attack}): {outcome.error}")
        if on_model is not None:
            on_model(row, i, len(tasks))
    return BuildReport(str(out), len(entries), len(entries) - len(todo), trained, len(errors), time.perf_counter() - start,
                       tuple(errors))
