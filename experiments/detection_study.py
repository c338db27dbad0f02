"""Evidence for the detection defaults: target anomaly indices and source statistics.

For each model file given, computes at the default layer (and optionally others) the target
scores and MAD anomaly index, and for the true or detected target several candidate source
statistics:

- mean_logit: E[c, t], the study's rule;
- asymmetry: E[c, t] - E[t, c];
- confusion: fraction of clean class-c samples predicted as t, minus the reverse;
- steps: mean optimisation steps for class-c samples to reach the target (SPEC 2.4), fewer = closer.

Usage:
    python experiments/detection_study.py MODEL.safetensors [...] --json out.json [--layers a b]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from soda_backdoor.analysis import AttributionConfig, parse_layer
from soda_backdoor.cli.steps import class_inputs, load_context, open_model
from soda_backdoor.detection import DetectionConfig, detect_backdoor, mad_outliers, mean_logits, source_scores
from soda_backdoor.reconstruction import ReconstructionConfig, optimize_batch


def study(path: str, layers: list[str | None], target: int | None, steps_budget: int) -> dict:
    ctx = load_context("fmnist", None, None, None)
    loaded = open_model(path, ctx, torch.device("cpu"))
    meta = loaded.meta
    if meta.attack != "none":
        ctx = load_context("fmnist", None, meta.attack, None)
    model = loaded.module
    inputs = class_inputs(ctx, meta, 256, torch.device("cpu"))
    out = {"model": path, "attack": meta.attack, "layers": {}}
    for layer in layers:
        ref = parse_layer(model, layer)
        res, _ = detect_backdoor(model, ref, inputs, 10, DetectionConfig(attribution=AttributionConfig(num_samples=256)))
        out["layers"][str(ref)] = {"anomaly_index": res.target_test.anomaly_index, "flagged": res.target_test.flagged,
                                   "seconds": res.seconds}
    t = target if target is not None else 2
    e = mean_logits(model, inputs, 10)
    stats = {}
    for rule in ("mean_logit", "asymmetry"):
        stats[rule] = source_scores(e, t, rule)[0].tolist()
    with torch.no_grad():
        preds = {c: model(x).argmax(1) for c, x in inputs.items()}
    conf = torch.zeros(10, 10)
    for c, p in preds.items():
        conf[c] = torch.bincount(p, minlength=10).float() / len(p)
    stats["confusion"] = [float(conf[c, t] - conf[t, c]) if c != t else 0.0 for c in range(10)]
    if steps_budget:
        cfg = ReconstructionConfig(steps=steps_budget)
        speed = []
        for c in range(10):
            if c == t:
                speed.append(0.0)
                continue
            _, n, _ = optimize_batch(model.eval(), inputs[c][:64], t, cfg)
            speed.append(-float(n.float().mean()))
        stats["neg_steps"] = speed
    out["source_stats"] = {k: {"scores": v, "argmax": int(max(range(10), key=lambda c: v[c] if c != t else -1e9)),
                               "anomaly": mad_outliers(torch.tensor(v), 2.0, exclude=(t,)).anomaly_index}
                           for k, v in stats.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--layers", nargs="*", default=[None])
    ap.add_argument("--target", type=int, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = []
    for m in a.models:
        r = study(m, a.layers, a.target, a.steps)
        results.append(r)
        for layer, v in r["layers"].items():
            ai = v["anomaly_index"]
            print(f"{m} [{layer}] anomaly index: " + " ".join(f"{x:.2f}" for x in ai) + f"  flagged {v['flagged']}")
        for k, v in r["source_stats"].items():
            print(f"   source {k:<11} argmax {v['argmax']}  " + " ".join(f"{x:7.3f}" for x in v["scores"]))
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
