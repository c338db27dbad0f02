"""Where the ``fastest`` source rule should optimise: the input, or a hidden layer (issue 19).

The ``fastest`` rule (docs/method.md §2.3) moves clean samples of every class towards the
candidate target and calls the class that gets there in the fewest steps the source. In pixel
space each step is a forward and backward pass of the whole network, which makes it the
costliest part of detection on MobileNetV2 and ResNet-18 (docs/benchmarks.md). Optimising the
activation at a hidden layer instead needs the prefix once and only the tail per step. This
script measures whether the source stays right.

For every working backdoor of the given zoos (ASR >= 0.5) and every ``--model PATH:ARCH``
(the study-layout benchmark models, attack ``--attack``), and for each space (``input`` or a
layer name from ``--layers ARCH=L1,L2``), 64 clean samples per class are moved by normalised
gradient descent on ``-log p_t``: each step has length ``alpha * ||h0||`` (scale-free, so one
setting serves every layer), up to ``--steps`` steps; a sample's cost is the interpolated step
at which ``p_t`` reaches 0.99. The source is the class of smallest mean cost. The prefix is
recomputed at each step (correctness, not speed, is measured here).

Usage:
    python research/source_space.py --zoos zoos/dev zoos/test \
        --model runs/bench_study/MobileNetV2-stripet-n30000-e2.th:MobileNetV2 \
        --model runs/bench_study/resnet18-stripet-n12000-e1.th:resnet18 \
        --out research/results/source_space.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

from soda_backdoor.analysis.hooks import capture, intervene, parse_layer
from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.build import worker_context

DEFAULT_LAYERS = {
    "cnn": ["features.3", "features.7", "features.10"],
    "lenet": ["features.2", "features.5", "classifier.1"],
    "MobileNetV2": ["layers.6", "layers.13", "layers.16"],
    "resnet18": ["layer2", "layer3", "layer4"],
}


def steps_to_target(model, x: torch.Tensor, target: int, space: str, steps: int, alpha: float,
                    threshold: float = 0.99, chunk: int = 64) -> torch.Tensor:
    """Per-row interpolated normalised-GD steps for ``x`` to reach ``p_target >= threshold`` in ``space``."""
    out = []
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk]
        if space == "input":
            ref = None
            h = xb.clone()
        else:
            ref = parse_layer(model, space)
            with torch.no_grad(), capture(model, ref) as store:
                model(xb)
            h = store[0]

        def f(hh: torch.Tensor) -> torch.Tensor:
            if ref is None:
                return model(hh)
            with intervene(model, ref, lambda _t: hh * 1.0):
                return model(xb)

        size = h.flatten(1).norm(dim=1).clamp_min(1e-12)
        cost = torch.full((len(h),), float(steps))
        prev = torch.full((len(h),), -math.inf)
        running = torch.ones(len(h), dtype=torch.bool)
        log_th = math.log(threshold)
        for k in range(steps + 1):
            hh = h.detach().requires_grad_(True)
            logp = f(hh).log_softmax(1)[:, target]
            (g,) = torch.autograd.grad(-logp.sum(), hh)
            lp = logp.detach()
            hit = running & (lp >= log_th)
            if hit.any():
                frac = ((log_th - prev[hit]) / (lp[hit] - prev[hit])).clamp(0, 1).nan_to_num(1.0)
                cost[hit] = torch.where(torch.tensor(k > 0), k - 1 + frac, torch.zeros_like(frac))
            running &= ~hit
            prev = lp
            if not running.any() or k == steps:
                break
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            step = (alpha * size / gn).view(-1, *([1] * (h.dim() - 1)))
            h = torch.where(running.view(-1, *([1] * (h.dim() - 1))), h - step * g, h).detach()
        out.append(cost)
    return torch.cat(out)


def source_by_space(model, inputs: dict[int, torch.Tensor], target: int, spaces: list[str], n: int, steps: int,
                    alpha: float) -> dict:
    res = {}
    for space in spaces:
        t0 = time.perf_counter()
        mean = {c: float(steps_to_target(model, x[:n], target, space, steps, alpha).mean())
                for c, x in inputs.items() if c != target}
        res[space] = {"source": min(mean, key=mean.get), "mean_steps": mean, "seconds": time.perf_counter() - t0}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoos", nargs="*", default=[])
    ap.add_argument("--model", action="append", default=[], help="PATH:ARCH of a study-layout model (attack --attack)")
    ap.add_argument("--attack", default="stripet")
    ap.add_argument("--layers", nargs="*", default=[], help="ARCH=L1,L2 (overrides the built-in candidates)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--alpha", type=float, default=0.03)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    layers = dict(DEFAULT_LAYERS)
    layers.update({k: v.split(",") for k, v in (s.split("=", 1) for s in a.layers)})
    jobs = []  # (zoo, key, arch, source, target, model, inputs)
    for zoo in a.zoos:
        for m in read_manifest(Path(zoo)).values():
            if m["attack"] == "none" or m["asr"] < 0.5:
                continue
            ctx = worker_context(m["dataset"], m.get("data_dir") or None, m["attack"], m.get("attack_file") or None)
            jobs.append((Path(zoo).name, m["key"], m["arch"], m["attack"], m["source"], m["target"],
                         lambda ctx=ctx, m=m, zoo=zoo: (open_model(str(Path(zoo) / m["file"]), ctx.data,
                                                                   torch.device("cpu")), ctx)))
    for spec in a.model:
        path, arch = spec.rsplit(":", 1)
        ctx = load_context("fmnist", None, a.attack, None)
        jobs.append(("bench", Path(path).name, arch, a.attack, ctx.attack.source, ctx.attack.target,
                     lambda ctx=ctx, path=path, arch=arch: (open_model(path, ctx.data, torch.device("cpu"), arch=arch),
                                                             ctx)))
    rows = []
    for zoo, key, arch, attack, source, target, load in jobs:
        model, ctx = load()
        module = model.module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        inputs = class_inputs(ctx, model.meta, a.samples, torch.device("cpu"))
        spaces = ["input"] + layers.get(arch, [])
        res = source_by_space(module, inputs, target, spaces, a.samples, a.steps, a.alpha)
        rows.append({"zoo": zoo, "key": key, "arch": arch, "attack": attack, "source": source, "target": target,
                     "by_space": res})
        print(zoo, arch, attack, f"{source}->{target}",
              {s: (r["source"], round(r["seconds"], 1)) for s, r in res.items()}, flush=True)
    summary: dict = {}
    for r in rows:
        for i, (space, v) in enumerate(r["by_space"].items()):
            d = summary.setdefault(r["zoo"], {}).setdefault(f"depth{i}", {"right": 0, "of": 0})
            d["right"] += int(v["source"] == r["source"])
            d["of"] += 1
    print(json.dumps(summary, indent=1))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(a.out).write_text(json.dumps({"config": vars(a), "layers": layers, "summary": summary, "rows": rows,
                                       "commit": commit, "torch": torch.__version__,
                                       "threads": torch.get_num_threads(), "machine": platform.machine(),
                                       "processor": platform.processor()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
