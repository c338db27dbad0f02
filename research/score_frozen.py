"""`soda zoo score`'s table for zoos whose files are not at hand, from the committed counts.

`soda zoo score DIR` runs the detector on every model file of a built zoo. The confident-error
verdict depends on a model only through its confident-error counts on the test split, and
those are committed for every zoo model (`research/results/error_counts.jsonl`, counted with
the product's own `confident_errors`). This scores them with the product's own verdict
(`detect_errors` against the shipped reference, default settings), labels and tables
(`zoo/score.py`: `_annotate`, `group_score`, `breakdown`), so its numbers are those `soda zoo
score` prints on the built zoo (compared with `soda zoo score` on holdout3, built here). It also
fits the calibration on one zoo (`--calibrate-on`, as `soda zoo calibrate`) and measures it
on the others (log loss and Brier of P(backdoor), as `soda zoo score --calibration`).

Usage:
    python research/score_frozen.py frozen:dev frozen:test frozen:holdout frozen:holdout2 \\
        --calibrate-on frozen:dev --calibration-out research/results/calibration_dev.json \\
        --json research/results/score_frozen.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_detector import _meta, _read  # noqa: E402
from frozen_zoo import zoo_name, zoo_rows  # noqa: E402

from soda_backdoor.artifacts import save_calibration  # noqa: E402
from soda_backdoor.detection import DetectionConfig, fit_calibration  # noqa: E402
from soda_backdoor.detection.errors import ErrorCounts, detect_errors, shipped_reference  # noqa: E402
from soda_backdoor.zoo.score import _annotate, _losses, breakdown, group_score, settings_key  # noqa: E402


def score_rows(rows: list[dict], threshold: float = 0.95) -> list[dict]:
    ref, config = shipped_reference(), DetectionConfig().errors
    out = []
    for r in rows:
        d = r["c"][f"all@{threshold}"]
        entry, note = ref.for_model(r["arch"], "fmnist")
        det = detect_errors(ErrorCounts(tuple(map(tuple, d["counts"])), tuple(d["totals"]), threshold), entry,
                            config, note)
        row = {k: v for k, v in r.items() if k != "c"}
        row.update(dataset="fmnist", target=r.get("target"), source=r.get("source"))
        out.append(_annotate(row, {"score": det.score, "flagged": det.backdoor,
                                   "pairs": [list(p) for p in det.pairs], "class_scores": list(det.class_scores)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--counts", default="research/results/error_counts.jsonl")
    ap.add_argument("--calibrate-on")
    ap.add_argument("--calibration-out")
    ap.add_argument("--json")
    args = ap.parse_args()
    counts = {r["id"]: r for r in _read(Path(args.counts))}
    scored = {zoo_name(z): score_rows(zoo_rows(z, counts)) for z in args.zoos}
    cal = None
    if args.calibrate_on:
        import torch

        name = zoo_name(args.calibrate_on)
        key = settings_key(DetectionConfig(), None, shipped_reference())
        rows = scored[name] if name in scored else score_rows(zoo_rows(args.calibrate_on, counts))
        spec = {"name": name, "path": f"zoo/{name}.toml",  # as `soda zoo calibrate` records it
                "hash": hashlib.sha256(json.dumps(sorted(r["key"] for r in rows)).encode()).hexdigest()[:16]}
        cal = fit_calibration(rows, "soda", zoo=name, zoo_spec=spec, detector_settings=key,
                              settings={"layer": None, "detector_config": asdict(DetectionConfig()),
                                        "reference": shipped_reference().provenance},
                              torch=torch.__version__, commit=_meta()["commit"])
        if args.calibration_out:
            save_calibration(args.calibration_out, cal)
    out = {**_meta(), "reference": shipped_reference().provenance, "config": vars(args), "zoos": {}}
    print(f"{'zoo':10} {'clean/bd':>8} {'AUC':>6} {'TPR':>6} {'FPR':>6} {'target':>7} {'source':>7}"
          + ("  log loss (base)  Brier (base)" if cal else ""))
    for name, rows in scored.items():
        g = group_score(rows)
        rec = {"overall": vars(g), "breakdown": {a: {k: vars(v) for k, v in d.items()} for a, d in breakdown(rows).items()},
               "clean_flagged": [f"{r['arch']} {r['key']} {r['score']:.2f} {r['pairs']}" for r in rows
                                 if r["role"] == "clean" and r["flagged"]],
               "backdoored_wrong": [f"{r['arch']} {r['attack']} {r['key']} {r['score']:.2f} {r['pairs']}" for r in rows
                                    if r["role"] == "backdoored" and not (r["target_found"] and r["source_found"])],
               "rows": rows}
        line = (f"{name:10} {g.n_clean:>3}/{g.n_backdoored:<4} {g.auc:6.3f} {g.tpr:6.3f} {g.fpr:6.3f} "
                f"{g.target_acc:7.3f} {g.source_acc:7.3f}")
        if cal:
            y = [int(r["role"] == "backdoored") for r in rows]
            p = [cal.probability(r["score"], r["arch"]) for r in rows]
            ll, brier, base_ll, base_brier = _losses(y, p)
            rec["calibration"] = {"log_loss": ll, "brier": brier, "base_log_loss": base_ll, "base_brier": base_brier}
            line += f"  {ll:.3f} ({base_ll:.3f})  {brier:.3f} ({base_brier:.3f})"
        print(line)
        for x in rec["clean_flagged"]:
            print(f"    clean flagged: {x}")
        for x in rec["backdoored_wrong"]:
            print(f"    missed or wrong pair: {x}")
        out["zoos"][name] = rec
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
