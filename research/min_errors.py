"""A minimum count of confident errors per pair: what it costs and what it saves (research)

A clean `cnn` of `soda train`'s default recipe (zoo/default_recipe.toml, seed 21) was flagged
pullover -> shirt with evidence 3.04 from **two** confident errors: the reference's 36 `cnn`s
almost never make that error, so two of them sit at p ~ 1e-3, and among 90 pairs per model such
a chance event is not rare. A semantic backdoor sends a subgroup, not one or two samples. With
a minimum m, a pair with fewer than m errors has its evidence capped at tau (it still ranks the
model, so the AUC moves only where such a pair was the model's largest; a first version set it
to 0 and cost lowratio's AUC 0.893 -> 0.786 for no change of verdict anywhere). This
script scores the confident-error verdict (errors alone, the product's `detect_errors`, shipped
reference, defaults but `min_errors`) for each minimum m on every zoo whose counts are cached
(`research/results/threshold_counts.jsonl`, softmax 0.95, batch-norm statistics re-estimated:
the product's counting) and on the shipped reference's models left out one at a time.

Per zoo and m: clean models flagged, backdoors (ASR >= 0.5) flagged with the right target, AUC
of the errors' model score, and the count on the flagged pair of every flagged model at m = 1.

Usage:
    python research/min_errors.py --json research/results/min_errors.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from sklearn.metrics import roc_auc_score

from soda_backdoor.detection.errors import ErrorConfig, ErrorCounts, build_reference, detect_errors, shipped_reference

from provenance import write_record  # research/provenance.py

DEV = ("dev", "lowratio_dev")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="research/results/threshold_counts.jsonl")
    ap.add_argument("--minimums", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--json")
    args = ap.parse_args()
    ref = shipped_reference()
    rows = [json.loads(line) for line in open(args.cache)]
    cells = defaultdict(list)
    for r in rows:
        counts = ErrorCounts(tuple(map(tuple, r["counts"]["bn"]["0.95"])), (1000,) * 10, 0.95)
        entry, _ = ref.for_model(r["arch"], "fmnist")
        for m in args.minimums:
            det = detect_errors(counts, entry, ErrorConfig(variation_tau=0.0, min_errors=m))
            first = det.pairs[0] if det.pairs else None
            cells[(r["zoo"], m)].append({
                "key": r["key"], "arch": r["arch"], "attack": r["attack"], "asr": r["asr"],
                "source": r["source"], "target": r["target"], "score": det.score, "pairs": det.pairs,
                "n_first": None if first is None else counts.counts[first[0]][first[1]],
                "target_found": r["target"] is not None and any(t == r["target"] for _, t in det.pairs)})
    # the shipped reference's own models, each against the others (counts as the reference keeps them)
    models = [(ErrorCounts(c, n, ref.threshold), e.arch, name)
              for e in ref.entries for c, n, name in zip(e.model_counts, e.model_totals, e.models)]
    for i, (counts, arch, name) in enumerate(models):
        rest = build_reference([x for j, x in enumerate(models) if j != i], ref.dataset).entry(arch)
        for m in args.minimums:
            det = detect_errors(counts, rest, ErrorConfig(variation_tau=0.0, min_errors=m))
            first = det.pairs[0] if det.pairs else None
            cells[("reference (leave one out)", m)].append({
                "key": name, "arch": arch, "attack": "none", "asr": 0.0, "source": None, "target": None,
                "score": det.score, "pairs": det.pairs, "target_found": False,
                "n_first": None if first is None else counts.counts[first[0]][first[1]]})
    summary = []
    print(f"{'zoo':28}{'m':>3}{'clean flagged':>15}{'right target':>14}{'AUC':>7}   counts on the flagged pair of flagged clean models")
    for (zoo, m), cs in cells.items():
        clean = [c for c in cs if c["attack"] == "none"]
        bd = [c for c in cs if c["attack"] != "none" and c["asr"] >= 0.5]
        y = [0] * len(clean) + [1] * len(bd)
        auc = roc_auc_score(y, [c["score"] for c in clean + bd]) if clean and bd else None
        fc = [c for c in clean if c["pairs"]]
        row = {"zoo": zoo, "min_errors": m, "dev": zoo in DEV, "clean": len(clean), "clean_flagged": len(fc),
               "backdoored": len(bd), "right_target": sum(c["target_found"] for c in bd), "auc": auc,
               "clean_flagged_counts": [c["n_first"] for c in fc],
               "right_target_min_count": min((c["n_first"] for c in bd if c["target_found"] and c["n_first"]),
                                             default=None)}
        summary.append(row)
        print(f"{zoo:28}{m:>3}{len(fc):>9} of {len(clean):<3}{row['right_target']:>6} of {len(bd):<5}"
              f"{'' if auc is None else format(auc, '.3f'):>7}   {row['clean_flagged_counts']}")
    if args.json:
        write_record(args.json, {"summary": summary, "models": {f"{z}|{m}": cs for (z, m), cs in cells.items()}}, args)


if __name__ == "__main__":
    main()
