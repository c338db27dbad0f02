"""Which class is the source of a flagged target: three readings of the same confident-error counts (research)

The detector's source is the class with the largest evidence into the flagged target,
``argmax_s E[s, t]`` (docs/method.md §2.2b). On the test zoo it is wrong for the two `cnn`
wider-dress models (dress -> coat read as shirt -> coat): the backdoor adds confident errors
into coat from shirts too, a pair that clean models confuse often, and the p-value of a
small excess on a large count beats a large excess on a small one. Two alternatives:

- ``ratio``: the largest relative excess, ``(n[s, t] + 0.5) / (lambda[s, t] + 0.5)``;
- ``E_inflated``: the evidence again after the null of every pair into ``t`` is raised by the
  median relative excess over the sources (the common widening of the target's region),
  so only what one source adds beyond it counts.

Counts are the product's (batch-norm statistics re-estimated, softmax >= 0.95) from
`threshold_count.py`'s cache; the null is the shipped reference with the default settings.
Every backdoor with ASR >= 0.5 whose target the errors flag counts. Chosen on dev and
lowratio_dev; the others reported. The research counts re-estimate on the defender subset of
a clean split (``make_splits(data, None)``); the product leaves the attack's own training
samples out first when the model's metadata names it, a slightly different subset, and that
flips borderline sources (dev's `cnn` small bags of seed 0 and test's wider dresses of seed
10, batch 200, are right here and wrong in the product's records, or the reverse).

Usage:
    python research/source_excess.py --cache research/results/threshold_counts.jsonl --json research/results/source_excess.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.special import betainc

from soda_backdoor.data import load_dataset
from soda_backdoor.detection.errors import (EVIDENCE_CAP, ErrorConfig, exposure_factors, pair_dispersion,
                                           shipped_reference)

from provenance import write_record  # research/provenance.py


def evidence(n: np.ndarray, lam: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``E = -log10 P(X >= n)``, X negative binomial with mean ``lam`` and size ``r`` (the nbpair null)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e = -np.log(betainc(n, r, lam / (r + lam))) / math.log(10)
    e = np.where(n > 0, np.minimum(e, EVIDENCE_CAP), 0.0)
    np.fill_diagonal(e, 0.0)
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="threshold_count.py's counts")
    ap.add_argument("--min-asr", type=float, default=0.5)
    ap.add_argument("--json")
    args = ap.parse_args()
    ref, cfg = shipped_reference(), ErrorConfig()
    totals = torch.bincount(load_dataset("fmnist").y_test, minlength=10).numpy().astype(float)
    out, summary = [], {}
    for r in map(json.loads, Path(args.cache).read_text().splitlines()):
        if r["attack"] == "none" or r["asr"] < args.min_asr:
            continue
        ent, t = ref.entry(r["arch"]), r["target"]
        n = np.asarray(r["counts"]["bn"]["0.95"], dtype=float)
        rate = (np.asarray(ent.counts, dtype=float) + cfg.prior) / np.maximum(ent.totals, 1)[:, None]
        lam = rate * totals[:, None]
        lam = lam * exposure_factors(n, lam, cfg.exposure)[None, :]
        size = 1.0 / pair_dispersion(ent, rate, cfg.shrink)
        e = evidence(n, lam, size)
        if e[:, t].max() <= cfg.tau:
            continue
        excess = (n[:, t] + 0.5) / (lam[:, t] + 0.5)
        others = [s for s in range(len(n)) if s != t]
        inflated = lam.copy()
        inflated[:, t] *= max(1.0, float(np.median(excess[others])))
        rules = {"E": e[:, t], "ratio": excess, "E_inflated": evidence(n, inflated, size)[:, t]}
        picks = {k: max(others, key=lambda s: v[s]) for k, v in rules.items()}
        out.append({"zoo": r["zoo"], "key": r["key"], "arch": r["arch"], "attack": r["attack"],
                    "source": r["source"], "target": t, "picks": picks})
        z = summary.setdefault(r["zoo"], {"found": 0, **{k: 0 for k in rules}})
        z["found"] += 1
        for k, s in picks.items():
            z[k] += int(s == r["source"])
    for zoo, z in summary.items():
        print(f"{zoo:16} targets found {z['found']:2}  right source: " + "  ".join(f"{k} {z[k]}" for k in z if k != "found"))
    for row in out:
        if len(set(row["picks"].values())) > 1:
            print(f"  {row['zoo']:14} {row['key'][:8]} {row['arch']:5} {row['attack']:18} true {row['source']} -> "
                  f"{row['target']}: {row['picks']}")
    if args.json:
        write_record(args.json, {"summary": summary, "models": out}, args)


if __name__ == "__main__":
    main()
