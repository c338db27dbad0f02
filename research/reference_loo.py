"""Leave-one-out over the shipped reference: each clean reference model scored against the others.

A random-recipe reference model left out of the reference is a clean model of a recipe the
reference has not seen: the closest a defender gets, without held-out zoos, to the
false-alarm rate on models trained by someone else. For every model of a reference file
(each model's own counts are in it) this scores its confident errors against the reference
without it (``detect_errors``, defaults), and, for the models whose variation rates are in
``variation_rates.py``'s records, its variation excess over the largest rate of the others;
the model is flagged when either reaches its threshold (docs/detection.md).

Usage:
    python research/reference_loo.py [--reference FILE] [--rates results/variation_rates.jsonl] \\
        [--variation-zoos reference_wide reference_wide2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from soda_backdoor.detection.errors import (ErrorConfig, ErrorCounts, ErrorReference, build_reference,
                                            detect_errors, shipped_reference)

from provenance import write_record  # research/provenance.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=None, help="a reference file (default: the shipped one)")
    ap.add_argument("--rates", default="results/variation_rates.jsonl")
    ap.add_argument("--variation-zoos", nargs="+", default=["reference_wide", "reference_wide2"])
    ap.add_argument("--variation-tau", type=float, default=ErrorConfig.variation_tau)
    ap.add_argument("--json")
    args = ap.parse_args()
    ref = ErrorReference.load(args.reference) if args.reference else shipped_reference()
    config = ErrorConfig(variation_tau=0.0)
    models = [(ErrorCounts(c, n, ref.threshold), e.arch, m)
              for e in ref.entries for c, n, m in zip(e.model_counts, e.model_totals, e.models)]
    recs = {f"{r['zoo']}/{r['key']}": np.array(r["rate"]) for r in map(json.loads, open(args.rates))
            if r["zoo"] in args.variation_zoos and r["role"] == "clean"}
    rows = []
    for i, (counts, arch, name) in enumerate(models):
        rest = build_reference([m for j, m in enumerate(models) if j != i], ref.dataset)
        det = detect_errors(counts, rest.entry(arch), config)
        v = None
        if name in recs:
            others = np.max([r for k, r in recs.items() if k != name], axis=0)
            x = recs[name] - others
            np.fill_diagonal(x, -np.inf)
            v = float(x.max())
        flagged = det.backdoor or (v is not None and v >= args.variation_tau)
        rows.append({"model": name, "arch": arch, "errors_score": det.score, "errors_pairs": det.pairs,
                     "variation_excess": v, "flagged": flagged, "random_recipe": name in recs})
    for group, sel in (("random-recipe models (variation rates measured)", [r for r in rows if r["random_recipe"]]),
                       ("the other reference models (errors only; their recipe's twin seed stays in)",
                        [r for r in rows if not r["random_recipe"]])):
        fl = [r for r in sel if r["flagged"]]
        print(f"{group}: {len(fl)} of {len(sel)} flagged; errors alone {sum(r['errors_score'] > config.tau for r in sel)}")
        for r in sorted(sel, key=lambda r: -r["errors_score"])[:4]:
            print(f"    {r['model']:34} {r['arch']:6} errors {r['errors_score']:.2f} {r['errors_pairs'][:1]} "
                  f"variations {r['variation_excess'] if r['variation_excess'] is None else round(r['variation_excess'], 3)}"
                  f"{'  FLAGGED' if r['flagged'] else ''}")
    if args.json:
        write_record(args.json, {"rows": rows, "variation_tau": args.variation_tau, "tau": config.tau,
                                 "num_models": len(rows)}, args)


if __name__ == "__main__":
    main()
