"""Which class is the source: the confident errors on samples that clean models find easy (research)

A backdoor keyed on a property widens its target's region for every class that has the
property (docs/detection.md, "a source from the variations"): the `cnn` wider dresses of test
send more shirts than dresses to coat. But the shirts it sends are, in large part, shirts
that clean models already find coat-like, while the wide dresses are dresses to any clean
model. This asks whether counting only the confident errors on samples that clean reference
models give their own class with softmax >= ``--easy`` (mean over the references) names the
source better than all confident errors do.

``probs`` stores each model's softmax on the test split (batch-norm statistics re-estimated on
the defender's clean data, as the detector counts; float16) under ``--cache``; ``analyse``
builds the per-sample reference from the clean models of ``--reference`` zoos, and for every
flagged backdoor (the target of ``source_variation.py``'s cache, the product's pair) picks:

- ``all``: the most confident errors into the target (the counts the evidence reads);
- ``easy``: the most confident errors into the target among the samples the references find
  easy, at each ``--easy`` level;
- ``product``: the product's source since 2026-12-07 (the errors' evidence where it flags the
  target, else the variations'; from ``source_variation.py``'s cache).

Chosen on dev + lowratio_dev; test reported. The reference models are clean models of the same
builds (dev's for dev; for test an out-of-sample reference).

Usage:
    python research/source_easy.py probs /work/zoos/dev /work/zoos/lowratio_dev /work/zoos/test --cache /work/zoos/probs --jobs 2
    python research/source_easy.py analyse --cache /work/zoos/probs --pairs research/results/source_variation.jsonl --reference dev lowratio_dev --json research/results/source_easy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from provenance import write_record  # research/provenance.py

THRESHOLD = 0.95
TAU = 2.99  # ErrorConfig().tau


def probs_one(task: dict[str, Any]) -> str:
    import torch

    from soda_backdoor.data import normalize
    from soda_backdoor.utils import inference_view, recalibrated_batchnorm
    from soda_backdoor.zoo.score import _open

    torch.set_num_threads(1)
    out = Path(task["out"])
    loaded, ctx, _ = _open({**task, "device": "cpu"})
    meta, d = loaded.meta, ctx.data
    module = recalibrated_batchnorm(loaded.module, normalize(d.x_train[ctx.splits.defender], meta.mean, meta.std))
    x = normalize(d.x_test, meta.mean, meta.std)
    with torch.no_grad(), inference_view(module) as fast:
        p = torch.cat([fast(x[i:i + 1000]).float().softmax(1) for i in range(0, len(x), 1000)])
    np.save(out, p.numpy().astype(np.float16))
    return str(out)


def cmd_probs(args) -> None:
    from concurrent.futures import ProcessPoolExecutor

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tasks = []
    for z in map(Path, args.zoos):
        for line in (z / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            out = cache / f"{z.name}_{r['key']}.npy"
            if not out.exists():
                tasks.append({"path": str(z / r["file"]), "dataset": r["dataset"], "data_dir": r.get("data_dir", ""),
                              "attack": r["attack"], "attack_file": r.get("attack_file", ""), "out": str(out)})
    print(f"{len(tasks)} models", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, path in enumerate(pool.map(probs_one, tasks), 1):
            print(f"[{i}/{len(tasks)}] {path}", flush=True)


def cmd_analyse(args) -> None:
    from soda_backdoor.data import load_dataset

    y = load_dataset("fmnist").y_test.numpy()
    recs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    cache = Path(args.cache)
    refs = [np.load(cache / f"{r['zoo']}_{r['key']}.npy").astype(np.float32) for r in recs
            if r["zoo"] in args.reference and r["attack"] == "none"]
    ref = np.mean(refs, axis=0)                       # (N, k): the clean references' mean softmax
    own = ref[np.arange(len(y)), y]                   # what they give each sample's own class
    print(f"per-sample reference: {len(refs)} clean models of {', '.join(args.reference)}")
    rules = ["product", "all"] + [f"easy>={e}" for e in args.easy]
    table: dict[str, dict[str, list[int]]] = {name: {} for name in rules}
    rows = []
    for r in recs:
        if r["attack"] == "none" or r["asr"] < 0.5 or r["target"] not in [p[1] for p in r["pairs"]]:
            continue
        t, s = r["target"], r["source"]
        p = np.load(cache / f"{r['zoo']}_{r['key']}.npy").astype(np.float32)
        err = (p[:, t] >= THRESHOLD) & (y != t)
        others = [c for c in range(p.shape[1]) if c != t]
        counts = {"all": np.bincount(y[err], minlength=p.shape[1])}
        for e in args.easy:
            counts[f"easy>={e}"] = np.bincount(y[err & (own >= e)], minlength=p.shape[1])
        e_col, v_col = np.asarray(r["E"])[:, t], np.asarray(r["V"])[:, t]
        col = e_col if max(e_col[j] for j in others) > TAU else v_col  # the product's rule since 2026-12-07
        picks = {"product": max(others, key=lambda j: (col[j], -j))}
        for name, c in counts.items():
            picks[name] = max(others, key=lambda j: (c[j], -j))
        for name in rules:
            cell = table[name].setdefault(r["zoo"], [0, 0])
            cell[0] += picks[name] == s
            cell[1] += 1
        rows.append({"zoo": r["zoo"], "key": r["key"], "arch": r["arch"], "attack": r["attack"], "source": s,
                     "target": t, "picks": picks, "counts": {k: v.tolist() for k, v in counts.items()}})
    zoos = sorted(table["product"], key=lambda z: (z not in args.dev, z))
    print(f"{'rule':12} " + " ".join(f"{z:>14}" for z in zoos) + "   dev total")
    for name in rules:
        tot = sum(table[name].get(z, [0, 0])[0] for z in args.dev)
        print(f"{name:12} " + " ".join(f"{table[name][z][0]:>8} of {table[name][z][1]:<3}" for z in zoos) + f"   {tot}")
    print("\nmodels where a rule disagrees with the true source:")
    for row in rows:
        if any(v != row["source"] for v in row["picks"].values()):
            t = row["target"]
            print(f"  {row['zoo']:12} {row['key'][:8]} {row['arch']:5} {row['attack']:18} true {row['source']}->{t} "
                  + " ".join(f"{k}:{v}" for k, v in row["picks"].items())
                  + "  counts all " + str(row["counts"]["all"]) + f" easy>={args.easy[-1]} "
                  + str(row["counts"][f"easy>={args.easy[-1]}"]))
    if args.json:
        write_record(args.json, {"table": table, "rows": rows}, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probs")
    a.add_argument("zoos", nargs="+")
    a.add_argument("--cache", required=True)
    a.add_argument("--jobs", type=int, default=2)
    b = sub.add_parser("analyse")
    b.add_argument("--cache", required=True)
    b.add_argument("--pairs", required=True, help="source_variation.py's cache (the product's pairs)")
    b.add_argument("--reference", nargs="+", default=["dev", "lowratio_dev"])
    b.add_argument("--dev", nargs="+", default=["dev", "lowratio_dev"])
    b.add_argument("--easy", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    b.add_argument("--json")
    args = ap.parse_args()
    {"probs": cmd_probs, "analyse": cmd_analyse}[args.cmd](args)


if __name__ == "__main__":
    main()
