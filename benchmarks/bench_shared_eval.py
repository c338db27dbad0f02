"""The repair's before-and-after measurement: one pass of the untouched layers against two test passes.

A repair that tunes only the layers after a cut (the default, docs/repair.md) leaves every
weight before the cut as it was, so the model before and the model after share that part.
``soda repair`` measures both (ACC on the clean test split, ASR on the attack's samples) with
``evaluate_attack_shared``: the shared part runs once per batch, each tail after it. The naive
reference, measured in the same run on the same models, is what the repair did before: one
whole test pass per model (``evaluate_attack`` twice).

The timing does not depend on the weights' values, so each architecture is built with random
weights (batch-norm statistics from one batch of noise), cut where the repair cuts it
(``deepest_split``), and its tail perturbed to stand for the repaired model. The labels are
checked to be the same either way.

    python benchmarks/bench_shared_eval.py [--arch cnn MobileNetV2 resnet18] [--repeat 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))

from provenance import write_record  # noqa: E402

from soda_backdoor.analysis.split import deepest_split, split_after  # noqa: E402
from soda_backdoor.models import create_model  # noqa: E402
from soda_backdoor.training import evaluate_attack, evaluate_attack_shared  # noqa: E402
from soda_backdoor.workflow import load_context  # noqa: E402


def _pair(arch: str, side: int) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """A model with non-trivial batch-norm statistics, a copy with its tail changed, and the cut."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1, input_size=side)
    with torch.no_grad():
        model.train()
        model(torch.randn(64, 1, side, side))
    model.eval()
    layer = deepest_split(model, torch.zeros(1, 1, side, side)).layer
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in split_after(changed, layer).tail.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, changed, layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["cnn", "MobileNetV2", "resnet18"])
    ap.add_argument("--attack", default="stripet")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, alternating; the median is shown")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ctx = load_context("fmnist", None, a.attack, None)
    mean, std = ctx.data.spec.mean, ctx.data.spec.std
    side = int(ctx.data.x_test.shape[-1])
    rows = []
    print(f"{'arch':<12}{'cut after':<12}{'two passes s':>14}{'shared s':>10}{'ratio':>8}  same ACC/ASR")
    for arch in a.arch:
        model, changed, layer = _pair(arch, side)
        old, new = split_after(model, layer), split_after(changed, layer)
        args = (ctx.data, ctx.splits, ctx.attack, mean, std)

        def two() -> list:
            return [evaluate_attack(model, *args), evaluate_attack(changed, *args)]

        def shared() -> list:
            return evaluate_attack_shared(new.prefix, [old.tail, new.tail], *args)

        times: dict[str, list[float]] = {"two": [], "shared": []}
        results = {}
        for _ in range(a.repeat):
            for name, fn in (("two", two), ("shared", shared)):
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
        t_two, t_shared = statistics.median(times["two"]), statistics.median(times["shared"])
        same = results["two"] == results["shared"]
        rows.append({"arch": arch, "cut": layer, "two_passes_s": t_two, "shared_s": t_shared,
                     "ratio": t_two / t_shared, "same_results": same, "times": times,
                     "n_clean": results["two"][0].n_clean, "n_semantic": results["two"][0].n_semantic})
        print(f"{arch:<12}{layer:<12}{t_two:>14.2f}{t_shared:>10.2f}{t_two / t_shared:>7.2f}x  {same}")
    if a.json:
        write_record(a.json, rows, a)


if __name__ == "__main__":
    main()
