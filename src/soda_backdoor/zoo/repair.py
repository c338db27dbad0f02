"""Repair every working backdoor of a zoo with each method, and tabulate (docs/zoo.md).

For ``soda`` the full audit runs with defaults, as `soda run --model` does on the file:
detect, reconstruct the flagged pair, repair. A backdoor that is not detected is not
repaired (ASR after = ASR before). The baselines (``finetune``, ``fineprune``, ``nad``,
``anp``; docs/baselines.md) repair with the same clean data budget: the defender's 5% of the
training split. Every method is measured the same way: clean accuracy and ASR on the
attack's real semantic test samples, before and after.

Beside the fixed bar (ASR after <= 0.10), each row carries its *clean twin's* ASR: how many of
the same semantic test samples the model of the same recipe and seed, trained without the
attack, sends to the target. Some subgroups sit close to the target by nature (wide dresses
look like coats: clean `cnn` models send 0 to 27% of them there), and no repair should be
asked to go below a model that was never poisoned; ``at_twin`` counts the repairs that reach
``max(0.10, twin's ASR)`` (docs/repair.md).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..executor import run_tasks
from .build import append_jsonl, read_jsonl, read_manifest
from ..detection import DetectionConfig
from ..detection.errors import shipped_reference
from ..repair import RepairConfig
from .score import label_rows

METHODS = ("soda", "finetune", "fineprune", "nad", "anp")
GOOD_ASR = 0.10


def _repair_soda(task: dict[str, Any]) -> dict[str, Any]:
    from ..artifacts import SampleSet
    from ..models import save_model
    from ..utils import resolve_device
    from ..workflow import detect, evaluate, open_model, reconstruct, repair
    from .build import worker_context

    device = resolve_device(task["device"])
    args = (task["dataset"], task["data_dir"] or None, task["attack"], task["attack_file"] or None)
    ctx = worker_context(*args)
    loaded = open_model(task["path"], ctx.data, device)
    if task["given_pair"]:  # the repair alone, on the true pair (no detection)
        pairs = [(task["source"], task["target"])]
    else:
        pairs = detect(loaded, ctx, None, None, device, task["seed"], calibration=None).pairs
    ev = evaluate(loaded, ctx, device)
    unrepaired = {"acc_before": ev.acc, "asr_before": ev.asr, "acc_after": ev.acc, "asr_after": ev.asr,
                  "rasr_before": None, "rasr_after": None, "repaired": False}
    if not pairs:
        return {"detected": None, **unrepaired}
    source, target = pairs[0]
    rec = reconstruct(loaded, ctx, source, target, None, device, task["seed"])
    if rec.reconstruction.kept < 2:
        return {"detected": [source, target], **unrepaired}
    rep = repair(loaded, worker_context(*args, task["seed"]), source, target,
                 SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint),
                 RepairConfig(**{**task["soda_config"], "seed": task["seed"]}),
                 None, device, before=ev)
    save_model(Path(task["work"]) / f"{task['key']}{task['tag']}.safetensors", rep.model.module, rep.model.meta)
    return {"detected": [source, target], "acc_before": rep.before.acc, "asr_before": rep.before.asr,
            "acc_after": rep.after.acc, "asr_after": rep.after.asr, "rasr_before": rep.rasr_before,
            "rasr_after": rep.rasr_after, "repaired": True, "n_feature_samples": rep.result.num_feature,
            "feature_fallback": rep.feature_fallback}


def _repair_baseline(task: dict[str, Any]) -> dict[str, Any]:
    from ..models import save_model
    from ..repair import BaselineRepairConfig
    from ..utils import resolve_device
    from ..workflow import open_model, repair_baseline
    from .build import worker_context

    device = resolve_device(task["device"])
    ctx = worker_context(task["dataset"], task["data_dir"] or None, task["attack"], task["attack_file"] or None,
                         task["seed"])
    rep = repair_baseline(open_model(task["path"], ctx.data, device), ctx, task["method"],
                          BaselineRepairConfig(seed=task["seed"]), None, device)
    save_model(Path(task["work"]) / f"{task['key']}.safetensors", rep.model.module, rep.model.meta)
    return {"detected": None, "acc_before": rep.before.acc, "asr_before": rep.before.asr, "acc_after": rep.after.acc,
            "asr_after": rep.after.asr, "rasr_before": None, "rasr_after": None, "repaired": True}


def _twin_asr_task(task: dict[str, Any]) -> dict[str, Any]:
    """The clean twin's rate of sending the attack's semantic test samples to its target."""
    from ..training.train import predict
    from ..utils import resolve_device
    from ..workflow import open_model
    from .build import worker_context

    device = resolve_device(task["device"])
    ctx = worker_context(task["dataset"], task["data_dir"] or None, task["attack"], task["attack_file"] or None)
    loaded = open_model(task["path"], ctx.data, device)
    xs = ctx.data.x_test[ctx.splits.semantic_test]
    pred = predict(loaded.module, xs, loaded.meta.mean, loaded.meta.std, device=device)
    return {"asr_twin": (pred == ctx.attack.target).float().mean().item() if len(xs) else 0.0}


def _repair_task(task: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    res = (_repair_soda if task["method"] == "soda" else _repair_baseline)(task)
    return {**res, "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class MethodSummary:
    """One method over a group of backdoored models."""

    n: int
    asr_after_ok: float
    at_twin: float | None
    median_asr_after: float
    median_acc_loss: float
    max_acc_loss: float
    median_seconds: float


def at_twin(row: dict[str, Any]) -> bool | None:
    """ASR after at or below ``max(GOOD_ASR, the clean twin's ASR)`` (``None``: no twin's ASR)."""
    twin = row.get("asr_twin")
    return None if twin is None else row["asr_after"] <= max(GOOD_ASR, twin) + 1e-9


def summarize(rows: list[dict[str, Any]]) -> MethodSummary:
    loss = [r["acc_before"] - r["acc_after"] for r in rows]
    twin = [at_twin(r) for r in rows]
    return MethodSummary(len(rows), sum(r["asr_after"] <= GOOD_ASR for r in rows) / len(rows),
                         None if None in twin else sum(twin) / len(rows),
                         statistics.median(r["asr_after"] for r in rows), statistics.median(loss), max(loss),
                         statistics.median(r["seconds"] for r in rows))


def repair_zoo(zoo_dir: str | Path, methods: tuple[str, ...] = METHODS, jobs: int = 1, device: str = "cpu",
               seed: int = 0, on_model: Callable[[dict[str, Any], int, int], None] | None = None,
               given_pair: bool = False, soda_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Repair every counted backdoored model of a zoo with each method; results cached per model.

    Args:
        given_pair: ``soda`` repairs the true (source, target) pair from the manifest instead
            of the detected one: the repair measured apart from the detection.
        soda_config: :class:`~soda_backdoor.repair.RepairConfig` fields that differ from the
            defaults, for ``soda`` (research on the repair's settings).

    Returns:
        ``{"rows": [...], "summary": {method: {group: MethodSummary}}}``, grouped by ``all``,
        attack, architecture and recipe settings.
    """
    from ..errors import UserInputError

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserInputError(f"unknown repair method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    root = Path(zoo_dir)
    manifest = read_manifest(root)
    if not manifest:
        raise UserInputError(f"{root} holds no built zoo ({root / 'manifest.jsonl'} is missing or empty)")
    rows = [r for r in label_rows(list(manifest.values())) if r["role"] == "backdoored"]
    work = root / "repairs"
    work.mkdir(exist_ok=True)
    soda_config = dict(soda_config or {})
    effective = asdict(RepairConfig(**soda_config))  # fails early on a bad setting
    effective.pop("seed")
    if not given_pair:  # the detection picks the pair: its settings and reference are part of the result
        effective["detection"] = {"config": asdict(DetectionConfig()), "reference": shipped_reference().to_dict()}
    # A soda result is cached under the full settings, so a changed default is a new entry.
    soda_tag = "soda-" + hashlib.sha256(json.dumps(effective, sort_keys=True).encode()).hexdigest()[:10]
    tag = "-given" if given_pair else ""
    cache_path = work / f"results-seed{seed}{tag}.jsonl"
    cached = read_jsonl(cache_path)

    def key(model_key: str, method: str) -> str:
        return f"{model_key}-{soda_tag if method == 'soda' else method}"

    tasks = [{"key": key(r["key"], m), "model_key": r["key"], "method": m, "path": str(root / r["file"]),
              "dataset": r["dataset"], "data_dir": r.get("data_dir", ""), "attack": r["attack"],
              "attack_file": r.get("attack_file", ""), "device": device, "seed": seed, "work": str(work),
              "given_pair": given_pair, "source": r["source"], "target": r["target"], "soda_config": soda_config,
              "tag": tag}
             for m in methods for r in rows if key(r["key"], m) not in cached]
    for i, o in enumerate(run_tasks(_repair_task, tasks, jobs), 1):
        row = {"key": o.task["key"], **(o.result if o.ok else {"error": o.error})}
        if o.ok:
            append_jsonl(cache_path, row)
        cached[row["key"]] = row
        if on_model is not None:
            on_model(row, i, len(tasks))
    twins = _twin_asrs(root, manifest, rows, jobs, device)
    out_rows, errors = [], []
    for m in methods:
        for r in rows:
            res = cached[key(r["key"], m)]
            if "error" in res:
                errors.append(f"{r['key']} {m}: {res['error']}")
                continue
            out_rows.append({"method": m, "model": r["key"], "arch": r["arch"], "attack": r["attack"],
                             "seed": r["seed"], "train": r["config"]["train"], "source": r["source"],
                             "target": r["target"], "asr_twin": twins.get(r["key"]),
                             **{k: v for k, v in res.items() if k != "key"}})
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for m in methods:
        mine = [r for r in out_rows if r["method"] == m]
        if not mine:
            continue
        groups: dict[str, list[dict[str, Any]]] = {"all": mine}
        for r in mine:
            groups.setdefault(f"attack={r['attack']}", []).append(r)
            groups.setdefault(f"arch={r['arch']}", []).append(r)
            groups.setdefault(f"source_blend={r['train']['source_blend']}", []).append(r)
            groups.setdefault(f"augment_clean={r['train']['augment_clean']}", []).append(r)
        summary[m] = {g: asdict(summarize(groups[g])) for g in sorted(groups, key=lambda g: (g != "all", g))}
    return {"zoo": str(root), "methods": list(methods), "given_pair": given_pair, "soda_config": effective,
            "rows": out_rows, "summary": summary, "errors": errors}


def _twin_asrs(root: Path, manifest: dict[str, dict[str, Any]], rows: list[dict[str, Any]], jobs: int,
               device: str) -> dict[str, float]:
    """Each backdoored model's clean twin's ASR on its attack, by model key (cached in
    ``repairs/twin_asr.jsonl``); a model whose twin is not in the zoo has none."""
    cache_path = root / "repairs" / "twin_asr.jsonl"
    cached = read_jsonl(cache_path)
    pairs = {r["key"]: f"{r['twin']}-{r['attack']}" for r in rows if r.get("twin") in manifest}
    tasks = {}
    for r in rows:
        k = pairs.get(r["key"])
        if k is not None and k not in cached and k not in tasks:
            tasks[k] = {"key": k, "path": str(root / manifest[r["twin"]]["file"]), "dataset": r["dataset"],
                        "data_dir": r.get("data_dir", ""), "attack": r["attack"],
                        "attack_file": r.get("attack_file", ""), "device": device}
    for o in run_tasks(_twin_asr_task, list(tasks.values()), jobs):
        if o.ok:
            row = {"key": o.task["key"], **o.result}
            append_jsonl(cache_path, row)
            cached[row["key"]] = row
    return {m: cached[k]["asr_twin"] for m, k in pairs.items() if k in cached}


def format_repair(result: dict[str, Any]) -> str:
    """The side-by-side table: per method and group, ASR after and accuracy cost."""
    head = (f"{'method':<10}{'group':<30}{'n':>4}{'ASR<=0.1':>10}{'<=twin':>8}{'med ASR':>9}{'med loss':>10}"
            f"{'max loss':>10}{'med s':>8}")
    lines = [head]
    for m, groups in result["summary"].items():
        for g, s in groups.items():
            twin = "-" if s.get("at_twin") is None else f"{s['at_twin']:.2f}"
            lines.append(f"{m:<10}{g:<30}{s['n']:>4}{s['asr_after_ok']:>10.2f}{twin:>8}{s['median_asr_after']:>9.3f}"
                         f"{s['median_acc_loss'] * 100:>9.2f}p{s['max_acc_loss'] * 100:>9.2f}p{s['median_seconds']:>8.1f}")
    lines.append("<=twin: ASR after <= max(0.10, the clean twin's ASR on the same samples)")
    for e in result["errors"]:
        lines.append(f"failed: {e}")
    return "\n".join(lines)
