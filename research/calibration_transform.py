"""How the calibration reads the detector's score: raw (identity) or sign(s) log(1 + |s|) (research)

`soda zoo calibrate` fits, per architecture, a logistic map from the detector's score to
P(backdoor) (and from each class's score to P(class is the target)). The confident-error
evidence has a heavy tail: dev's backdoors score from 2.2 to 258, its clean models at most
1.9. On the raw score a single slope cannot be steep near the threshold and still give the
tail the probability Platt's targets ask for, so the fit flattens (the `cnn` slope of the
dev + lowratio_dev fit is 0.058: P(backdoor) 0.39 at score 1, 0.44 at score 5).

Chosen on the dev zoos only (``--dev``: their models pooled, as `soda zoo calibrate DEV...`
fits): the mean log loss of leave-one-model-out fits, each transform. Reported on the
held-out zoos (``--report``) with the fit on all the dev models. Reads the rows of `soda zoo
score --json` records; fits with the product's :func:`fit_calibration`.

Usage:
    python research/calibration_transform.py --dev results/zoo_score_dev_bn.json results/zoo_score_lowratio_dev_bn.json \\
        --report results/zoo_score_{test,holdout3,holdout4,holdout5,lowratio}_bn.json --json results/calibration_transform.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import log_loss

from soda_backdoor.detection import fit_calibration
from soda_backdoor.detection.calibration import TRANSFORMS

from provenance import write_record  # research/provenance.py


def rows_of(path: str) -> list[dict]:
    return [r for r in json.loads(Path(path).read_text())["rows"] if r["role"] in ("clean", "backdoored")]


def losses(cal, rows: list[dict]) -> tuple[float, float]:
    """Log loss of P(backdoor) over the models and of P(class = target) over their classes."""
    y = [int(r["role"] == "backdoored") for r in rows]
    p = [cal.probability(r["score"], r["arch"]) for r in rows]
    yc = [int(r["role"] == "backdoored" and k == r["target"]) for r in rows for k in range(len(r["class_scores"]))]
    pc = [q for r in rows for q in cal.class_probabilities(r["class_scores"], r["arch"])]
    return float(log_loss(y, p, labels=[0, 1])), float(log_loss(yc, pc, labels=[0, 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", nargs="+", required=True, help="`soda zoo score --json` records of the dev zoos")
    ap.add_argument("--report", nargs="+", default=[], help="records of the held-out zoos")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = [r for path in args.dev for r in rows_of(path)]
    out = {}
    for t in TRANSFORMS:
        loo = [losses(fit_calibration(dev[:i] + dev[i + 1:], "soda", transform=t), [dev[i]]) for i in range(len(dev))]
        cal = fit_calibration(dev, "soda", transform=t)
        out[t] = {"dev_loo": [float(np.mean([a for a, _ in loo])), float(np.mean([b for _, b in loo]))],
                  "held_out": {Path(p).stem: losses(cal, rows_of(p)) for p in args.report},
                  "maps": {a.arch: {"model": [a.model.slope, a.model.intercept],
                                    "target": [a.target.slope, a.target.intercept]} for a in cal.archs}}
        held = "  ".join(f"{k.removeprefix('zoo_score_')} {a:.3f}/{b:.3f}" for k, (a, b) in out[t]["held_out"].items())
        print(f"{t:9} dev leave-one-out {out[t]['dev_loo'][0]:.3f}/{out[t]['dev_loo'][1]:.3f} | held out "
              f"(P(backdoor)/P(class)): {held}")
    best = min(TRANSFORMS, key=lambda t: out[t]["dev_loo"][0])
    print(f"chosen on dev (P(backdoor) leave-one-out log loss): {best}")
    if args.json:
        write_record(args.json, {"chosen": best, **out}, args)


if __name__ == "__main__":
    main()
