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
import statistics

import torch

from soda_backdoor.artifacts import SampleSet
from soda_backdoor.data import normalize

from repair_probe import run_probe, summaries, write_record  # the probes' shared runner (research/)


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
    rows = run_probe(args.zoos, [{"threshold": t} for t in args.thresholds], _one, args.jobs,
                     lambda x: f"thr {x['threshold']}: mined {x['mined']}")
    summary = summaries(rows, "threshold", args.thresholds, lambda z, t: f"{z}@{t}",
                        lambda mine: {"median_mined": statistics.median(r["mined"] for r in mine)})
    write_record(args.json, args, summary, rows)


if __name__ == "__main__":
    main()
