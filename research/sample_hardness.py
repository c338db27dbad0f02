"""Are a model's confident errors on samples that clean models find easy? (research, a feasibility check)

The confident-error evidence counts, per pair, the test samples a model gives another class
with softmax >= 0.95, against the counts of clean reference models. Its false alarms on the
held-out zoos are clean models trained *without learning-rate decay* (docs/detection.md):
their errors pile onto one pair. A semantic backdoor's errors are on a subgroup that clean
models classify correctly and confidently (a striped T-shirt is a T-shirt to every clean
model); an undecayed model's errors may be on samples at the pair's natural boundary.

This script measures that directly. A test sample is *easy* when at least ``--agree`` of the
hardness models (clean, decayed-schedule models of other zoos) give its true class softmax
>= 0.95. For every model of the zoos it reports its top pair's confident errors and the share
of them on easy samples: a per-sample null would count only those.

Usage:
    python research/sample_hardness.py --hardness reference_wide2 --zoos reference_wide3 holdout3 dev \\
        --json results/sample_hardness.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from soda_backdoor.data import load_dataset
from soda_backdoor.models.io import load_model
from soda_backdoor.data.datasets import normalize
from soda_backdoor.utils import inference_view

from provenance import write_record  # research/provenance.py

ZOOS = Path("/work/zoos")


def probs(path: Path, x: torch.Tensor) -> torch.Tensor:
    loaded = load_model(path)
    xn = normalize(x, loaded.meta.mean, loaded.meta.std)
    with inference_view(loaded.module) as fast, torch.inference_mode():
        return torch.cat([fast(xn[i:i + 256]).float().softmax(1) for i in range(0, len(xn), 256)])


def rows_of(zoo: str) -> list[dict]:
    return [json.loads(line) for line in (ZOOS / zoo / "manifest.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardness", nargs="+", default=["reference_wide2"], help="zoos of clean models that define 'easy'")
    ap.add_argument("--zoos", nargs="+", required=True)
    ap.add_argument("--agree", type=float, default=0.9)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("fmnist")
    x, y = data.x_test, data.y_test
    right = []
    for z in args.hardness:
        for r in rows_of(z):
            if r["attack"] == "none":
                p = probs(ZOOS / z / r["file"], x)
                right.append(p[torch.arange(len(y)), y] >= args.threshold)
    easy = torch.stack(right).float().mean(0) >= args.agree
    print(f"{int(easy.sum())} of {len(y)} test samples easy ({len(right)} hardness models, agree {args.agree})")
    out = []
    for z in args.zoos:
        for r in rows_of(z):
            p = probs(ZOOS / z / r["file"], x)
            conf, pred = p.max(1)
            err = (conf >= args.threshold) & (pred != y)
            k = data.num_classes
            counts = torch.zeros(k, k, dtype=torch.long)
            counts.index_put_((y[err], pred[err]), torch.ones(int(err.sum()), dtype=torch.long), accumulate=True)
            s, t = divmod(int(counts.argmax()), k)
            on_pair = err & (y == s) & (pred == t)
            rec = {"zoo": z, "key": r["key"], "arch": r["arch"], "attack": r["attack"],
                   "gamma": r["config"]["train"]["gamma"], "acc": r["acc"], "asr": r["asr"],
                   "top_pair": [s, t], "top_count": int(on_pair.sum()), "top_easy": int((on_pair & easy).sum()),
                   "all_errors": int(err.sum()), "all_easy": int((err & easy).sum())}
            if r["attack"] != "none":
                src, tgt = r["source"], r["target"]
                bd = err & (y == src) & (pred == tgt)
                rec.update(true_pair=[src, tgt], true_count=int(bd.sum()), true_easy=int((bd & easy).sum()))
            out.append(rec)
            print(f"{z:16} {r['key'][:8]} {r['arch']:5} {r['attack']:16} gamma {rec['gamma']:<4} acc {r['acc']:.3f} "
                  f"top {s}->{t}: {rec['top_count']:3} ({rec['top_easy']:3} easy)  all {rec['all_errors']:4} "
                  f"({rec['all_easy']} easy)"
                  + (f"  true {rec['true_pair']}: {rec['true_count']} ({rec['true_easy']} easy)" if "true_pair" in rec else ""))
    if args.json:
        write_record(args.json, out, args)


if __name__ == "__main__":
    main()
