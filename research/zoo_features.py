"""Per-class detection evidence for every model of a built zoo, cached as JSON lines.

For each model (clean analysis data: the test split minus its own attack's semantic samples,
256 samples per class) it records, per class k:

- ``s_w``: the weight-profile target score of the default detector (docs/method.md), and
  ``ai_w`` its MAD anomaly index;
- ``s_act`` / ``ai_act``: the same score with activation-weighted attributions,
  ``A_c[i, k] = mean_x h_i(x) * |W[k, i]|`` (data-dependent: class c's own activations);
- ``logits``: the K x K mean-logit matrix ``E[c, k]``;
- ``dist``: the K x K matrix of first-order (DeepFool-step) distances from class c's clean
  samples to class k's decision boundary, ``mean_x (z_c - z_k) / ||grad_x (z_c - z_k)||``
  (32 samples per class; one backward pass per class k). A cheap stand-in for the number of
  optimisation steps that carry class c to class k (the ``fastest`` source rule).

Usage: python research/zoo_features.py ZOO_DIR [--out FILE] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from soda_backdoor.analysis import AttributionConfig, activations, compute_neuron_effects, parse_layer
from soda_backdoor.data import get_attack, load_dataset, normalize
from soda_backdoor.data.splits import make_splits
from soda_backdoor.detection.detector import mean_logits, target_scores
from soda_backdoor.detection.stats import mad_outliers
from soda_backdoor.executor import run_tasks
from soda_backdoor.models import load_model
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.build import append_jsonl, read_jsonl

NUM_SAMPLES = 256
DIST_SAMPLES = 32


def boundary_distances(model: torch.nn.Module, inputs: dict[int, torch.Tensor], k: int) -> torch.Tensor:
    """``D[c, t]``: mean first-order distance of class c's samples to the c/t boundary."""
    x = torch.cat([inputs[c][:DIST_SAMPLES] for c in range(k)]).clone().requires_grad_(True)
    own = torch.cat([torch.full((min(DIST_SAMPLES, len(inputs[c])),), c) for c in range(k)])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    z = model(x)
    zc = z.gather(1, own[:, None]).squeeze(1)
    d = torch.zeros(k, k, dtype=torch.double)
    for t in range(k):
        margin = zc - z[:, t]
        (g,) = torch.autograd.grad(margin.sum(), x, retain_graph=t < k - 1)
        dist = (margin / (g.flatten(1).norm(dim=1) + 1e-8)).detach().double()
        for c in range(k):
            if c != t:
                d[c, t] = dist[own == c].mean()
    return d


def _features(task: dict) -> dict:
    row = task["row"]
    data = load_dataset(row["dataset"], row.get("data_dir") or None)
    atk = None if row["attack"] == "none" else get_attack(row["attack"], row["dataset"], row.get("attack_file") or None)
    splits = make_splits(data, atk, 0)
    loaded = load_model(task["path"])
    model, meta = loaded.module, loaded.meta
    k = data.num_classes
    x, y = data.x_test[splits.clean_test], data.y_test[splits.clean_test]
    inputs = {c: normalize(x[(y == c).nonzero().flatten()[:NUM_SAMPLES]], meta.mean, meta.std) for c in range(k)}
    t0 = time.perf_counter()
    ref = parse_layer(model, None)
    eff = compute_neuron_effects(model, ref, inputs, AttributionConfig(num_samples=NUM_SAMPLES))
    s_w = target_scores(eff, k)
    # activation-weighted: scale each neuron's row by class c's mean activation
    mats = []
    for ci, c in enumerate(eff.classes):
        with torch.no_grad():
            h, _ = activations(model, ref, inputs[c])
        mats.append(eff.matrices[ci] * h.flatten(1).mean(0).abs().unsqueeze(1))
    act = type(eff)(eff.layer, torch.stack(mats), eff.classes, eff.num_samples, "act")
    s_act = target_scores(act, k)
    e = mean_logits(model, inputs, k)
    dist = boundary_distances(model, inputs, k)
    return {"key": row["key"], "s_w": s_w.tolist(), "ai_w": list(mad_outliers(s_w, 1.0).anomaly_index),
            "s_act": s_act.tolist(), "ai_act": list(mad_outliers(s_act, 1.0).anomaly_index),
            "logits": e.tolist(), "dist": dist.tolist(), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo")
    ap.add_argument("--out", default=None, help="default ZOO/features.jsonl")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args(argv)
    root = Path(args.zoo)
    out = Path(args.out or root / "features.jsonl")
    done = read_jsonl(out)
    rows = [r for r in read_manifest(root).values() if r["key"] not in done]
    meta = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "torch": torch.__version__, "threads": 1, "machine": platform.machine(),
            "config": {"num_samples": NUM_SAMPLES, "dist_samples": DIST_SAMPLES}}
    tasks = [{"row": r, "path": str(root / r["file"])} for r in rows]
    for i, o in enumerate(run_tasks(_features, tasks, args.jobs), 1):
        if o.ok:
            append_jsonl(out, {**o.result, **meta})
        print(f"[{i}/{len(tasks)}] {o.task['row']['key']} {o.task['row']['arch']} {o.task['row']['attack']}: "
              f"{'%.1fs' % o.result['seconds'] if o.ok else o.error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
