"""One-at-a-time against batched reconstruction of the same samples on the same model.

Usage:
    python benchmarks/bench_reconstruct.py --model M.safetensors --source 0 --target 2 [--n 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from soda_backdoor.workflow import load_context, open_model
from soda_backdoor.data import normalize
from soda_backdoor.reconstruction import ReconstructionConfig, reconstruct_inputs, reconstruct_one_by_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", default="fmnist")
    ap.add_argument("--source", type=int, default=0)
    ap.add_argument("--target", type=int, default=2)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ctx = load_context(a.dataset, None, None, None)
    loaded = open_model(a.model, ctx.data, torch.device("cpu"))
    idx = ctx.splits.clean_train[ctx.data.y_train[ctx.splits.clean_train] == a.source][:a.n]
    starts = normalize(ctx.data.x_train[idx], loaded.meta.mean, loaded.meta.std)
    cfg = ReconstructionConfig(steps=a.steps, num_keep=a.n, batch_size=a.n)

    t0 = time.perf_counter()
    rec = reconstruct_inputs(loaded.module, starts, idx, a.source, a.target, cfg)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    xs, steps, kept = reconstruct_one_by_one(loaded.module, starts, a.target, cfg)
    single = time.perf_counter() - t0
    ok = [i for i, k in enumerate(kept) if k]
    diff = float((rec.samples - torch.stack([xs[i] for i in ok])).abs().max()) if ok and rec.kept == len(ok) else float("nan")
    res = {"one_at_a_time_seconds": single, "batched_seconds": batched, "speedup": single / batched,
           "kept_batched": rec.kept, "kept_one_at_a_time": len(ok), "max_abs_diff": diff,
           "mean_steps": float(torch.tensor(steps, dtype=torch.float).mean()), "n": a.n}
    print(f"{'procedure':<16}{'seconds':>10}{'kept':>6}")
    print(f"{'one at a time':<16}{single:>10.2f}{len(ok):>6}")
    print(f"{'batched':<16}{batched:>10.2f}{rec.kept:>6}")
    print(f"speedup {res['speedup']:.1f}x, max |diff| {diff:.2e}, mean steps {res['mean_steps']:.1f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
