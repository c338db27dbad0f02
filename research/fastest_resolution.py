"""The `fastest` source rule at several step sizes and sample counts.

For each backdoored model (its attack from the metadata, or ``--attack-file``), every class c
other than the target t gets the mean number of docs/method.md §2.4 optimisation steps its clean samples
need to reach softmax_t >= 0.99 (counted continuously, budget 50). The rule picks the class
with the fewest. With a large step size most samples cross within about three steps, so the
count saturates; smaller steps measure the same distance on a finer ruler, at more cost.

Usage:
    python research/fastest_resolution.py M1.safetensors ... [--attack-file F.json]
        [--lrs 0.05 0.02 0.01] [--ns 64 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

import torch

from soda_backdoor.analysis.optimize import optimize_batch
from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.data import get_attack
from soda_backdoor.detection import TransferSettings
from soda_backdoor.utils import cpu_channels_last, eval_mode, frozen

from provenance import write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--attack-file", default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'model':<34}{'true':>7}{'lr':>6}{'n':>5}{'pick':>5}  {'ok':<4}{'true steps':>11}{'runner-up':>14}{'sec':>6}")
    for path in a.models:
        name = open_model(path, None, torch.device("cpu")).meta.attack
        attack_file = a.attack_file if name not in ("stripet",) else None
        atk = get_attack(name, "fmnist", attack_file)
        if atk is None:
            continue
        ctx = load_context("fmnist", None, name, attack_file)
        loaded = open_model(path, ctx.data, torch.device("cpu"))
        model = loaded.module.eval()
        inputs = class_inputs(ctx, loaded.meta, max(a.ns), torch.device("cpu"))
        t = atk.target
        others = [c for c in range(len(inputs)) if c != t]
        for lr in a.lrs:
            for n in a.ns:
                x = torch.cat([inputs[c][:n] for c in others])
                owner = torch.cat([torch.full((len(inputs[c][:n]),), c) for c in others])
                t0 = time.perf_counter()
                with eval_mode(model), frozen(model), cpu_channels_last(model):
                    crossing = optimize_batch(model, x, torch.full((len(x),), t), TransferSettings(a.budget, lr)).crossing
                steps = {c: float(crossing[owner == c].mean()) for c in others}
                pick = min(others, key=lambda c: steps[c])
                runner = min((c for c in others if c != atk.source), key=lambda c: steps[c])
                row = {"model": path, "source": atk.source, "target": t, "lr": lr, "n": n, "pick": pick,
                       "steps": steps, "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"{path[-34:]:<34}{atk.source:>3}->{t:<3}{lr:>6}{n:>5}{pick:>5}  {'OK' if pick == atk.source else 'BAD':<4}"
                      f"{steps[atk.source]:>11.2f}{f'{runner}: {steps[runner]:.2f}':>14}{row['seconds']:>6.1f}", flush=True)
    for lr in a.lrs:
        for n in a.ns:
            sel = [r for r in rows if r["lr"] == lr and r["n"] == n]
            print(f"lr {lr}, n {n}: {sum(r['pick'] == r['source'] for r in sel)}/{len(sel)} correct")
    if a.json:
        write_record(a.json, rows, a)


if __name__ == "__main__":
    main()
