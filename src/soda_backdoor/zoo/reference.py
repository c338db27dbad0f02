"""A detection reference from the clean models of built zoos (``soda zoo reference``).

The confident-error evidence (:mod:`soda_backdoor.detection.errors`) compares a model's
confident errors with those of clean models of the same architecture and dataset, and the
variation evidence (:mod:`soda_backdoor.detection.variations`) its variation rates with the
largest of theirs: the defender's own reference models. This measures both for every clean
model of one or more zoos (backdoored models are left out): the counts pooled per
architecture, the variation rates' maximum over every model (docs/detection.md).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..detection.calibration import canonical_arch
from ..detection.errors import DEFAULT_THRESHOLD, ErrorConfig, ErrorCounts, ErrorReference, build_reference
from ..detection.errors import check_threshold
from ..detection.variations import build_variation_reference
from ..errors import UserInputError
from ..executor import run_tasks
from ..utils import source_commit
from .build import read_manifest
from .score import MIN_ACC

VARIATION_COPIES = ErrorConfig.variation_copies
VARIATION_ANCHOR = ErrorConfig.variation_anchor


def _count_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: the confident errors of one clean model on its dataset's whole test split."""
    from ..utils import resolve_device
    from ..workflow import open_model
    from ..workflow.steps import count_confident_errors, defender_variation_rates
    from .build import worker_context

    start = time.perf_counter()
    device = resolve_device(task["device"])
    ctx = worker_context(task["dataset"], task["data_dir"] or None, None, None)
    loaded = open_model(task["path"], ctx.data, device)
    c = count_confident_errors(loaded, ctx, task["threshold"], task["recalibrate_bn"], device)
    rate = None
    if task["copies"] > 0:

        rate = defender_variation_rates(loaded, ctx, task["copies"], task["anchor"], device).tolist()
    return {"counts": c.counts, "totals": c.totals, "rate": rate, "seconds": time.perf_counter() - start}


def build_zoo_reference(zoo_dirs: list[str | Path], threshold: float = DEFAULT_THRESHOLD, jobs: int = 1,
                        device: str = "cpu",
                        on_model: Callable[[dict[str, Any], int, int], None] | None = None,
                        variation_copies: int = VARIATION_COPIES,
                        variation_anchor: float = VARIATION_ANCHOR,
                        recalibrate_bn: bool = ErrorConfig.recalibrate_bn) -> ErrorReference:
    """Count the confident errors of every clean model of ``zoo_dirs`` and pool them per
    architecture; measure their variation rates and keep each pair's largest.

    Args:
        zoo_dirs: folders written by ``soda zoo build`` (one dataset).
        threshold: the confidence from which an error counts.
        jobs: models at once, one thread each.
        device: ``cpu``, ``cuda`` or ``auto``.
        on_model: called with each finished row, done and total.
        variation_copies: varied copies of each anchored defender sample (0: no variation
            rates; the detection then compares with the shipped ones, on their dataset only).
        variation_anchor: softmax of its own class a sample needs to be varied.
        recalibrate_bn: count each model's errors with its batch-norm statistics re-estimated
            on the defender's clean data, as the detection does (``ErrorConfig.recalibrate_bn``).
    """
    check_threshold(threshold)
    if variation_copies < 0 or not 0.0 <= variation_anchor < 1.0:
        raise UserInputError(f"variation copies must be >= 0 and the anchor in [0, 1), got {variation_copies} "
                             f"and {variation_anchor}")
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for d in zoo_dirs:
        root = Path(d)
        manifest = read_manifest(root)
        if not manifest:
            raise UserInputError(f"{root} holds no built zoo ({root / 'manifest.jsonl'} is missing or empty)")
        # a clean model whose training failed (it answers one class) is no evidence of what clean
        # models do: left out, as `soda zoo score` leaves it out
        clean = [{**r, "path": str(root / r["file"]), "zoo": root.name} for r in manifest.values()
                 if r["attack"] == "none"]
        rows += [r for r in clean if r.get("acc", 1.0) >= MIN_ACC]
        failed += [f"{root.name}/{r['key']}" for r in clean if r.get("acc", 1.0) < MIN_ACC]
    if not rows:
        raise UserInputError(f"the zoos hold no clean model whose training worked (accuracy >= {MIN_ACC}); "
                             "a reference is made of clean models")
    datasets = sorted({r["dataset"] for r in rows})
    if len(datasets) > 1:
        raise UserInputError(f"the zoos' clean models are on several datasets ({', '.join(datasets)}); "
                             "build one reference per dataset")
    tasks = [{"key": r["key"], "path": r["path"], "dataset": r["dataset"], "data_dir": r.get("data_dir", ""),
              "threshold": threshold, "device": device, "arch": r["arch"], "zoo": r["zoo"],
              "copies": variation_copies, "anchor": variation_anchor, "recalibrate_bn": recalibrate_bn}
             for r in rows]
    done = []
    for i, outcome in enumerate(run_tasks(_count_task, tasks, jobs), 1):
        if not outcome.ok:
            raise UserInputError(f"could not count the errors of {outcome.task['path']}: {outcome.error}")
        done.append((outcome.task, outcome.result))
        if on_model is not None:
            on_model({"key": outcome.task["key"], **outcome.result}, i, len(tasks))
    done.sort(key=lambda d: (d[0]["zoo"], d[0]["key"]))
    provenance = {"zoos": sorted({r["zoo"] for r in rows}), "num_models": len(rows),
                  "models_hash": hashlib.sha256(json.dumps([t["key"] for t, _ in done]).encode()).hexdigest()[:16],
                  "commit": source_commit(), "torch": torch.__version__, "machine": platform.machine(),
                  "recalibrate_bn": recalibrate_bn,
                  "left_out_failed_training": failed}
    ref = build_reference([(ErrorCounts(tuple(map(tuple, r["counts"])), tuple(r["totals"]), threshold),
                            canonical_arch(t["arch"]),
                            f"{t['zoo']}/{t['key']}") for t, r in done], datasets[0], provenance)
    if variation_copies == 0:
        return ref
    variations = build_variation_reference(
        [torch.tensor(r["rate"]) for _, r in done], datasets[0], variation_copies,
        variation_anchor, {**provenance, "archs": sorted({canonical_arch(t["arch"]) for t, _ in done})})
    return replace(ref, variations=variations)
