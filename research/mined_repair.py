"""Repair with mined natural samples: the model's own confident errors from source to target.

The confident-error detector finds natural samples of the source class that the model gives
the target with confidence. Where the reconstruction misses a backdoor's feature (darkness,
size: docs/repair.md), these samples carry it. This probe repairs each backdoored zoo model on
its true pair (``--given-pair`` protocol) with the reconstructed samples plus the mined ones
(labelled with their true class by the repair's loss, as the reconstructed ones are).

Protocol that keeps the measurement clean: the samples are mined from the test split MINUS
the attack's own semantic test samples (the ASR samples are never trained on), and ACC,
before and after, is measured on the clean test split minus the mined samples (they are
never scored). So this measures what mining adds when the defender's data does not hold the
exact subgroup (the hard case); a defender's data that holds it gives more samples.

Usage: python research/mined_repair.py zoos/dev [--thresholds 0.5 0.9] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from soda_backdoor.artifacts import SampleSet
from soda_backdoor.data import normalize
from soda_backdoor.executor import run_tasks
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.score import label_rows


def _one(task: dict) -> dict:
    from soda_backdoor.utils import resolve_device
    from soda_backdoor.workflow import evaluate, load_context, open_model, reconstruct, repair

    r, thr = task["row"], task["threshold"]
    ctx = load_context(r["dataset"], None, r["attack"], r.get("attack_file") or None, 0)
    device = resolve_device("cpu")
    s, t = r["source"], r["target"]
    loaded = open_model(task["path"], ctx.data, device)
    idx = ctx.splits.clean_test[ctx.data.y_test[ctx.splits.clean_test] == s]
    x = normalize(ctx.data.x_test[idx], loaded.meta.mean, loaded.meta.std)
    with torch.no_grad():
        p = loaded.module.eval()(x).softmax(1)[:, t]
    mined_idx = idx[p >= thr] if thr < 1 else idx[:0]
    keep = ~torch.isin(ctx.splits.clean_test, mined_idx)
    ctx = dataclasses.replace(ctx, splits=dataclasses.replace(ctx.splits, clean_test=ctx.splits.clean_test[keep]))
    before = evaluate(loaded, ctx, device)
    rec = reconstruct(loaded, ctx, s, t, None, device, 0)
    mined = normalize(ctx.data.x_test[mined_idx], loaded.meta.mean, loaded.meta.std)
    # every sample goes to both halves' order: one copy is used for the repair, one held out
    samples = torch.cat([rec.reconstruction.samples, mined.repeat_interleave(2, dim=0)])
    rep = repair(loaded, ctx, s, t, SampleSet(samples, s, t, rec.fingerprint, "rec+mined"), None, None, device,
                 before=before)
    return {"key": r["key"], "arch": r["arch"], "attack": r["attack"], "seed": r["seed"],
            "blend": r["config"]["train"]["source_blend"], "threshold": thr, "mined": int(len(mined_idx)),
            "acc_before": before.acc, "acc_after": rep.after.acc, "asr_before": before.asr, "asr_after": rep.after.asr,
            "rasr_after": rep.rasr_after, "n_clean_test": int(keep.sum())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.9, 0.5],
                    help="mining confidence; 1.0 mines nothing (the default repair, same protocol)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tasks = []
    for z in args.zoos:
        root = Path(z)
        for r in label_rows(list(read_manifest(root).values())):
            if r["role"] == "backdoored":
                tasks += [{"row": r, "path": str(root / r["file"]), "threshold": thr, "zoo": root.name}
                          for thr in args.thresholds]
    rows = []
    for o in run_tasks(_one, tasks, args.jobs):
        if not o.ok:
            print(f"FAILED {o.task['row']['key']}: {o.error}", file=sys.stderr)
            continue
        rows.append({"zoo": o.task["zoo"], **o.result})
        x = o.result
        print(f"{o.task['zoo']} {x['arch']} {x['attack']} s{x['seed']} thr {x['threshold']}: mined {x['mined']}, "
              f"ASR {x['asr_before']:.2f} -> {x['asr_after']:.2f}, ACC loss "
              f"{(x['acc_before'] - x['acc_after']) * 100:.2f} pt", file=sys.stderr, flush=True)
    summary = {}
    for z in sorted({r["zoo"] for r in rows}):
        for thr in args.thresholds:
            mine = [r for r in rows if r["zoo"] == z and r["threshold"] == thr]
            loss = [(r["acc_before"] - r["acc_after"]) * 100 for r in mine]
            summary[f"{z}@{thr}"] = {"n": len(mine), "asr_ok": sum(r["asr_after"] <= 0.10 for r in mine),
                                    "median_asr": statistics.median(r["asr_after"] for r in mine),
                                    "median_loss": statistics.median(loss), "max_loss": max(loss),
                                    "median_mined": statistics.median(r["mined"] for r in mine)}
            print(f"{z} mining at {thr}: {summary[f'{z}@{thr}']}")
    if args.json:
        meta = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "torch": torch.__version__, "threads": 1, "machine": platform.machine(), "config": vars(args)}
        Path(args.json).write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
