"""Iterative repair: reconstruct against the current model before every repair epoch.

An experiment, not a default (docs/repair.md, "Models of the 12-epoch recipe"). Each round
reconstructs ``NKEEP`` infected samples (source 0 -> target 2, at most ``STEPS`` steps each)
from fresh source-class training samples, then fine-tunes one epoch with them.

Usage:
    python research/iter_repair.py MODEL.safetensors ROUNDS LR NKEEP STEPS
"""

from __future__ import annotations

import argparse

import torch

from soda_backdoor.analysis import parse_layer
from soda_backdoor.workflow import load_context, open_model
from soda_backdoor.data import normalize
from soda_backdoor.reconstruction import ReconstructionConfig, reconstruct_inputs
from soda_backdoor.repair import RepairConfig, repair_model
from soda_backdoor.training.train import evaluate_attack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rounds", type=int)
    ap.add_argument("lr", type=float)
    ap.add_argument("nkeep", type=int)
    ap.add_argument("steps", type=int)
    a = ap.parse_args()
    dev = torch.device("cpu")
    ctx = load_context("fmnist", None, "stripet", None, 0)
    loaded = open_model(a.model, ctx.data, dev)
    m, meta = loaded.module, loaded.meta
    ev = evaluate_attack(m, ctx.data, ctx.splits, ctx.attack, meta.mean, meta.std, dev)
    print("before", round(ev.acc, 4), round(ev.asr, 3))
    idx = ctx.splits.clean_train[ctx.data.y_train[ctx.splits.clean_train] == 0]
    gen = torch.Generator().manual_seed(0)
    dfd = ctx.splits.defender
    xc, yc = normalize(ctx.data.x_train[dfd], meta.mean, meta.std), ctx.data.y_train[dfd]
    ref = parse_layer(m, None)
    for r in range(a.rounds):
        pick = idx[torch.randperm(len(idx), generator=gen)[:a.nkeep * 2]]
        starts = normalize(ctx.data.x_train[pick], meta.mean, meta.std)
        rec = reconstruct_inputs(m, starts, pick, 0, 2, ReconstructionConfig(num_keep=a.nkeep, steps=a.steps))
        repair_model(m, ref, torch.ones(1), xc, yc, rec.samples, 0, 2, RepairConfig(epochs=1, lr=a.lr, seed=r))
        ev = evaluate_attack(m, ctx.data, ctx.splits, ctx.attack, meta.mean, meta.std, dev)
        steps = round(float(rec.steps.float().mean()), 1) if rec.kept else float("nan")
        print("round", r + 1, "kept", rec.kept, "tried", rec.tried, "steps", steps,
              "acc", round(ev.acc, 4), "asr", round(ev.asr, 3), flush=True)


if __name__ == "__main__":
    main()
