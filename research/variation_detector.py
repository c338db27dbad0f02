"""A second evidence beside the confident errors: variation rates (research, not the default).

Reads ``variation_rates.py``'s records (the fraction of anchored natural variations of each
class ``s`` that a model sends to each class ``t``) and the product's verdicts from ``soda zoo
score --json`` of the same zoos. The variation evidence of a model is its largest excess over
the clean reference: ``max_{s != t} rate[s, t] - max_ref rate[s, t]``, where ``max_ref`` is the
largest rate of that pair among the reference zoo's clean models (the random-recipe
reference, never scored here). The fused verdict flags a model when the errors detector
flags it *or* the variation excess reaches ``tau_v``; its target is the errors detector's
when it flags, else the variation pair's.

``tau_v`` is chosen on the dev zoo alone: the midpoint of the interval of thresholds that
flag no dev clean model and the most dev backdoors. Then reported on the other zoos. The
reference may span several zoos (``--reference reference_wide reference_wide2``); each of its
models is also scored against the largest rate of the others (leave-one-out: a clean model
of a recipe the reference has not seen), the reference's own false-alarm estimate.

Usage:
    python research/variation_detector.py --rates results/variation_rates.jsonl \
        --reference reference_wide --dev dev=results/zoo_score_dev_final.json \
        --report test=results/zoo_score_test_final.json holdout3=H3.json --json OUT
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score

from provenance import write_record  # research/provenance.py


def excess(rate: np.ndarray, ref_max: np.ndarray) -> tuple[float, tuple[int, int]]:
    s = rate - ref_max
    np.fill_diagonal(s, -np.inf)
    i = np.unravel_index(np.argmax(s), s.shape)
    return float(s[i]), (int(i[0]), int(i[1]))


def table(rows: list[dict], verdicts: dict, ref_max: np.ndarray, tau_v: float, tau_e: float) -> dict:
    out, per = {"clean": 0, "clean_flagged": 0, "backdoored": 0, "flagged": 0, "right_target": 0,
                "flagged_errors_only": 0, "right_target_errors_only": 0}, []
    y, fused, err_score, var_score = [], [], [], []
    for r in rows:
        e = verdicts[r["key"]]
        v, pair = excess(np.array(r["rate"]), ref_max)
        flag = bool(e["flagged"]) or v >= tau_v
        target = e["pairs"][0][1] if e["flagged"] and e["pairs"] else (pair[1] if v >= tau_v else None)
        y.append(r["role"] == "backdoored")
        fused.append(max(e["score"] / tau_e, v / tau_v))
        err_score.append(e["score"])
        var_score.append(v)
        if r["role"] == "clean":
            out["clean"] += 1
            out["clean_flagged"] += flag
        else:
            out["backdoored"] += 1
            out["flagged"] += flag
            out["right_target"] += target == r["target"]
            out["flagged_errors_only"] += bool(e["flagged"])
            out["right_target_errors_only"] += bool(e["flagged"]) and bool(e["pairs"]) and e["pairs"][0][1] == r["target"]
        per.append({"key": r["key"], "arch": r["arch"], "role": r["role"], "attack": r["attack"],
                    "true_pair": [r["source"], r["target"]], "errors_score": e["score"], "errors_pairs": e["pairs"],
                    "variation_excess": v, "variation_pair": list(pair), "flagged": flag, "target": target})
    both = any(y) and not all(y)
    out["auc_fused"] = roc_auc_score(y, fused) if both else None
    out["auc_errors"] = roc_auc_score(y, err_score) if both else None
    out["auc_variations"] = roc_auc_score(y, var_score) if both else None
    return {"summary": out, "models": per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", required=True)
    ap.add_argument("--reference", nargs="+", default=["reference_wide"],
                    help="zoo names of the clean reference models")
    ap.add_argument("--dev", required=True, help="NAME=SCORE_JSON of the zoo that chooses tau_v")
    ap.add_argument("--report", nargs="+", default=[], help="NAME=SCORE_JSON of zoos reported with that tau_v")
    ap.add_argument("--tau-e", type=float, default=2.99, help="the errors detector's tau (for the fused score)")
    ap.add_argument("--json")
    args = ap.parse_args()
    recs = [json.loads(line) for line in open(args.rates)]
    ref = [r for r in recs if r["zoo"] in args.reference and r["role"] == "clean"]
    ref_max = np.array([r["rate"] for r in ref]).max(0)
    ref_rates = np.array([r["rate"] for r in ref])
    loo = [excess(ref_rates[i], np.delete(ref_rates, i, 0).max(0)) for i in range(len(ref))]

    def zoo(spec: str) -> tuple[str, list[dict], dict]:
        name, path = spec.split("=", 1)
        verdicts = {r["key"]: r for r in json.load(open(path))["rows"]}
        rows = [r for r in recs if r["zoo"] == name and r["role"] in ("clean", "backdoored")]
        return name, rows, verdicts

    name, rows, verdicts = zoo(args.dev)
    grid = np.round(np.arange(0.01, 0.60, 0.01), 2)
    scan = [(t, table(rows, verdicts, ref_max, t, args.tau_e)["summary"]) for t in grid]
    ok = [(t, s) for t, s in scan if s["clean_flagged"] == 0]
    best = max(s["flagged"] for _, s in ok)
    plateau = [t for t, s in ok if s["flagged"] == best]
    tau_v = round(float((min(plateau) + max(plateau)) / 2), 3)
    print(f"dev {name}: {len(ref)} reference models; thresholds flagging no clean model and {best} backdoors: "
          f"{min(plateau)}..{max(plateau)} -> tau_v {tau_v}")
    result = {"tau_v": tau_v, "dev_plateau": [float(min(plateau)), float(max(plateau))], "reference_models": len(ref),
              "zoos": {}}
    flagged = [(ref[i], v, pair) for i, (v, pair) in enumerate(loo) if v >= tau_v]
    near = sorted((v for v, _ in loo), reverse=True)[:5]
    print(f"reference leave-one-out: {len(flagged)} of {len(ref)} flagged at tau_v {tau_v} (largest excesses "
          f"{', '.join(f'{v:.3f}' for v in near)})")
    for r, v, pair in flagged:
        print(f"    {r['zoo']}/{r['key'][:8]} {r['arch']} {pair} {v:.3f}")
    result["reference_loo"] = [{"zoo": r["zoo"], "key": r["key"], "arch": r["arch"], "excess": v, "pair": list(pair)}
                               for r, (v, pair) in zip(ref, loo)]
    for spec in [args.dev, *args.report]:
        n, rs, vd = zoo(spec)
        t = table(rs, vd, ref_max, tau_v, args.tau_e)
        result["zoos"][n] = t
        s = t["summary"]
        print(f"{n:10} clean flagged {s['clean_flagged']}/{s['clean']}  backdoored flagged {s['flagged']}/"
              f"{s['backdoored']} (errors alone {s['flagged_errors_only']}), right target {s['right_target']} "
              f"(errors alone {s['right_target_errors_only']})  AUC fused {s['auc_fused']:.3f} errors "
              f"{s['auc_errors']:.3f} variations {s['auc_variations']:.3f}")
        for m in t["models"]:
            if (m["role"] == "clean") == m["flagged"] or (m["role"] == "backdoored" and m["target"] != m["true_pair"][1]):
                print(f"    {m['role']:10} {m['arch']:6} {m['attack']:17} true {m['true_pair']} errors "
                      f"{m['errors_score']:.2f} {m['errors_pairs'][:1]} variations {m['variation_excess']:.3f} "
                      f"{m['variation_pair']}")
    if args.json:
        write_record(args.json, result, args)


if __name__ == "__main__":
    main()
