"""Probe: repair with the defender's clean samples varied along natural axes.

The repair's failures given the true pair are subgroups of the source class defined by a
natural property the reconstruction does not reach: darkness, size, width (docs/repair.md).
The defender's clean samples hold no member of the subgroup (the attack's own samples are kept
out of clean data), so fine-tuning on them never shows the model a dark sneaker labelled
sneaker. This probe adds, to the repair's clean pool, copies of the defender's clean samples
drawn from a generic family of natural variations (no attack is known to it): intensity
scale, gamma, zoom, aspect ratio, shift, rotation, blur. Each copy keeps its label, so the
fine-tuning teaches that a varied source sample is still the source.

Variants (``--variants``): ``none`` (the default repair), ``all:K`` (K varied copies of every
clean sample), ``source:K`` (K varied copies of the source class's clean samples only). The
number of training steps is kept at the default's (epochs scaled down by the pool's growth),
so the cost per step and the number of steps are the default's. A third field scales the variations' ranges (``all:1:0.5``: half as strong). ``fix:K`` leaves the clean
pool alone and adds K varied copies of the source's clean samples to the reconstructed
samples instead (the stream each batch draws ``num_recon`` from, labelled source and pushed
away from the target). ``mine:K`` draws K varied copies of each clean source sample and adds
to the reconstructed samples only those the model sends to the target (at most ``MINE_CAP``):
the variations that reach the backdoor; a fourth field sets the cap (``mine:10:1:50``).

Same protocol as ``soda zoo repair --given-pair``: the true pair, reconstruction with
defaults, ASR on the attack's semantic test samples, ACC on the clean test split.

Usage: python research/augment_repair.py zoos/dev --variants none all:1 source:4 [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_probe import run_probe, summaries, write_record  # noqa: E402

# The family of natural variations: every copy draws each parameter at random.
INTENSITY = (0.45, 1.35)   # log-uniform factor on pixel intensity (FMNIST's background is 0)
GAMMA = (0.6, 1.6)         # log-uniform exponent on [0, 1] pixels
ZOOM = (0.75, 1.3)         # log-uniform scale of the content about the centre
ASPECT = (0.75, 1.3)       # log-uniform ratio of horizontal to vertical scale
SHIFT = 3.0                # pixels, uniform in [-SHIFT, SHIFT] on each axis
DEGREES = 10.0
BLUR_P = 0.3               # probability of a 3x3 blur
MINE_CAP = 200             # ``mine``: at most this many varied samples that reach the target


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(math.log(lo) + torch.rand(n, generator=gen) * (math.log(hi) - math.log(lo)))


def vary(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """One varied copy of each image of ``x`` ((N, C, H, W) in [0, 1]); ``strength`` scales
    every range (log ranges in the log domain) and the blur probability."""
    n, c, h, w = x.shape

    def lu(lo: float, hi: float) -> torch.Tensor:
        return _log_uniform(n, lo ** strength, hi ** strength, gen)

    x = (x * lu(*INTENSITY).view(-1, 1, 1, 1)).clamp(0, 1)
    x = x.clamp_min(0) ** lu(*GAMMA).view(-1, 1, 1, 1)
    zoom, aspect = lu(*ZOOM), lu(*ASPECT)
    sx, sy = zoom * aspect.sqrt(), zoom / aspect.sqrt()
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(DEGREES * strength)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * SHIFT * strength
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)  # output -> input coordinates: the inverse of scale then rotate
    theta[:, 0, 0], theta[:, 0, 1] = cos / sx, sin / sx
    theta[:, 1, 0], theta[:, 1, 1] = -sin / sy, cos / sy
    theta[:, 0, 2], theta[:, 1, 2] = -shift[:, 0] * 2 / w, -shift[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(x.dtype), [n, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    blur = torch.rand(n, generator=gen) < BLUR_P * strength
    if blur.any():
        k = torch.full((c, 1, 3, 3), 1 / 9, dtype=x.dtype)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return x.clamp(0, 1)


def _one(task: dict) -> dict:
    from soda_backdoor.analysis import parse_layer
    from soda_backdoor.data import normalize
    from soda_backdoor.repair import RepairConfig, repair_model
    from soda_backdoor.utils import resolve_device, seed_everything
    from soda_backdoor.workflow import evaluate, load_context, open_model, reconstruct
    from soda_backdoor.workflow.steps import rasr

    r = task["row"]
    parts = task["variant"].split(":")
    mode, copies, strength = parts[0], int((parts + ["0"])[1]), float((parts + ["0", "1"])[2])
    cap = int((parts + ["0", "1", str(MINE_CAP)])[3])
    ctx = load_context(r["dataset"], None, r["attack"], r.get("attack_file") or None, 0)
    device = resolve_device("cpu")
    s, t = r["source"], r["target"]
    loaded = open_model(task["path"], ctx.data, device)
    before = evaluate(loaded, ctx, device)
    rec = reconstruct(loaded, ctx, s, t, None, device, 0)
    from soda_backdoor.reconstruction import split_samples

    x_fix, x_hold = split_samples(rec.reconstruction.samples)
    meta, module = loaded.meta, loaded.module
    dfd = ctx.data.x_train[ctx.splits.defender]
    y = ctx.data.y_train[ctx.splits.defender]
    pix = dfd.float() / 255 if dfd.dtype == torch.uint8 else dfd.float()
    gen = torch.Generator().manual_seed(1)
    mined = 0
    extra_x, extra_y = [], []
    base = RepairConfig()
    if mode == "mine" and copies > 0:
        varied = torch.cat([vary(pix[y == s], gen, strength) for _ in range(copies)])
        xv = normalize(varied, meta.mean, meta.std).to(x_fix.device)
        with torch.no_grad():
            hit = torch.cat([module(xv[i:i + 512]).argmax(1) for i in range(0, len(xv), 512)]) == t
        mined = int(hit.sum())
        x_fix = torch.cat([x_fix, xv[hit][:cap]])
    elif mode == "fix" and copies > 0:
        pick = y == s
        varied = torch.cat([vary(pix[pick], gen, strength) for _ in range(copies)])
        x_fix = torch.cat([x_fix, normalize(varied, meta.mean, meta.std).to(x_fix.device)])
    elif mode != "none" and copies > 0:
        pick = torch.ones(len(y), dtype=torch.bool) if mode == "all" else y == s
        for _ in range(copies):
            extra_x.append(vary(pix[pick], gen, strength))
            extra_y.append(y[pick])
    x_all = torch.cat([pix, *extra_x]) if extra_x else pix
    y_all = torch.cat([y, *extra_y]) if extra_y else y
    # the default's number of steps: epochs scaled down by the pool's growth
    epochs = max(1, round(base.epochs * len(y) / len(y_all)))
    config = RepairConfig(epochs=epochs)
    seed_everything(config.seed)
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    x_clean = normalize(x_all[perm], meta.mean, meta.std).to(device)
    ref = parse_layer(module, None)
    result = repair_model(module, ref, torch.ones(1), x_clean, y_all[perm].to(device), x_fix, s, t, config)
    after = evaluate(loaded, ctx, device)
    return {"key": r["key"], "arch": r["arch"], "attack": r["attack"], "seed": r["seed"],
            "blend": r["config"]["train"]["source_blend"], "variant": task["variant"], "epochs": epochs,
            "pool": len(y_all), "mined": mined, "kept": rec.reconstruction.kept, "acc_before": before.acc, "acc_after": after.acc,
            "asr_before": before.asr, "asr_after": after.asr, "rasr_after": rasr(module, x_hold, t),
            "seconds": result.seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--variants", nargs="+", default=["none", "all:1", "source:4"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = run_probe(args.zoos, [{"variant": v} for v in args.variants], _one, args.jobs,
                     lambda x: f"{x['variant']} (pool {x['pool']}, {x['epochs']} epochs, {x['seconds']:.1f}s)")
    summary = summaries(rows, "variant", args.variants, lambda z, v: f"{z}/{v}",
                        lambda mine: {"median_seconds": statistics.median(r["seconds"] for r in mine)})
    write_record(args.json, args, summary, rows)


if __name__ == "__main__":
    main()
