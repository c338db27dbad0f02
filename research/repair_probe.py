"""Probe the repair on the zoo's backdoors given their true pair: more reconstructed samples,
and photometric / geometric jitter of the reconstructed samples.

The repair's failures on the zoos are subgroups defined by darkness or size (docs/repair.md):
R-ASR falls to 0 while the real samples keep going to the target. Two generic levers, neither
knowing the attack:

- ``--recon-keep N``: reconstruct N samples instead of the default 100 (half are used);
- ``--jitter``: add to the repair samples copies of each reconstructed sample with its pixel
  intensities scaled by 0.6, 0.8 and 1.25 and its content zoomed by 0.8 and 1.2 (about the
  centre), so that the unlearning covers nearby brightness and size.

Same protocol as ``soda zoo repair --given-pair`` (defaults otherwise); ASR on the attack's
semantic test samples, ACC on the clean test split.

Usage: python research/repair_probe.py zoos/dev [--recon-keep 50 100 200] [--jitter] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from soda_backdoor.artifacts import SampleSet
from soda_backdoor.executor import run_tasks
from soda_backdoor.reconstruction import ReconstructionConfig
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.score import label_rows

BRIGHTNESS = (0.6, 0.8, 1.25)
ZOOM = (0.8, 1.2)


def _zoom(x: torch.Tensor, factor: float, fill: torch.Tensor) -> torch.Tensor:
    """Zoom the content of ``x`` (N, C, H, W) by ``factor`` about the centre; the border is ``fill``."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, align_corners=False, padding_mode="zeros")
    return out + fill


def jitter(samples: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Copies of normalised ``samples`` at other brightness and size (module docstring)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pix = samples * s + m
    copies = [(pix * b).clamp(0, 1) for b in BRIGHTNESS]
    copies += [_zoom(pix, z, torch.zeros(1)).clamp(0, 1) for z in ZOOM]
    return (torch.cat(copies) - m) / s


def _one(task: dict) -> dict:
    from soda_backdoor.utils import resolve_device
    from soda_backdoor.workflow import evaluate, load_context, open_model, reconstruct, repair

    r = task["row"]
    ctx = load_context(r["dataset"], None, r["attack"], r.get("attack_file") or None, 0)
    device = resolve_device("cpu")
    s, t = r["source"], r["target"]
    loaded = open_model(task["path"], ctx.data, device)
    before = evaluate(loaded, ctx, device)
    rec = reconstruct(loaded, ctx, s, t, ReconstructionConfig(num_keep=task["keep"]), device, 0)
    x = rec.reconstruction.samples
    if task["jitter"] and len(x):
        fix, hold = x[0::2], x[1::2]
        extra = jitter(fix, loaded.meta.mean, loaded.meta.std)
        # the repair takes every other sample: interleave so every copy is used and the held-out
        # half stays the plain reconstructed samples (R-ASR measured as before)
        fix_all = torch.cat([fix, extra])
        hold_all = hold.repeat((len(fix_all) + len(hold) - 1) // len(hold), 1, 1, 1)[:len(fix_all)]
        x = torch.stack([fix_all, hold_all], 1).flatten(0, 1)
    rep = repair(loaded, ctx, s, t, SampleSet(x, s, t, rec.fingerprint, "probe"), None, None, device, before=before)
    return {"key": r["key"], "arch": r["arch"], "attack": r["attack"], "seed": r["seed"],
            "blend": r["config"]["train"]["source_blend"], "keep": task["keep"], "jitter": task["jitter"],
            "kept": rec.reconstruction.kept, "n_repair": rep.n_repair_samples,
            "acc_before": before.acc, "acc_after": rep.after.acc, "asr_before": before.asr,
            "asr_after": rep.after.asr, "rasr_after": rep.rasr_after, "seconds": rep.seconds}


def run_probe(zoos: list[str], variants: list[dict], fn, jobs: int, describe) -> list[dict]:
    """``fn(task)`` on every working backdoor of ``zoos`` once per variant (merged into the task);
    each result, with its zoo, is printed (``describe(result)``) as it finishes and returned."""
    tasks = []
    for z in zoos:
        root = Path(z)
        for r in label_rows(list(read_manifest(root).values())):
            if r["role"] == "backdoored":
                tasks += [{"row": r, "path": str(root / r["file"]), "zoo": root.name, **v} for v in variants]
    rows = []
    for o in run_tasks(fn, tasks, jobs):
        if not o.ok:
            print(f"FAILED {o.task['row']['key']}: {o.error}", file=sys.stderr)
            continue
        x = {"zoo": o.task["zoo"], **o.result}
        rows.append(x)
        print(f"{x['zoo']} {x['arch']} {x['attack']} s{x['seed']} {describe(x)}: ASR {x['asr_before']:.2f} -> "
              f"{x['asr_after']:.2f}, ACC loss {(x['acc_before'] - x['acc_after']) * 100:.2f} pt",
              file=sys.stderr, flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Backdoors at ASR <= 0.10, median ASR after, median and max accuracy loss (points)."""
    loss = [(r["acc_before"] - r["acc_after"]) * 100 for r in rows]
    return {"n": len(rows), "asr_ok": sum(r["asr_after"] <= 0.10 for r in rows),
            "median_asr": statistics.median(r["asr_after"] for r in rows), "median_loss": statistics.median(loss),
            "max_loss": max(loss)}


def summaries(rows: list[dict], field: str, values: list, label, extra) -> dict:
    """:func:`summarize` per zoo and per value of ``rows[field]``, keyed ``label(zoo, value)``,
    with ``extra(rows of that group)`` merged in."""
    out = {}
    for z in sorted({r["zoo"] for r in rows}):
        for v in values:
            mine = [r for r in rows if r["zoo"] == z and r[field] == v]
            if mine:
                out[label(z, v)] = {**summarize(mine), **extra(mine)}
    return out


def write_record(path: str | None, args: argparse.Namespace, summary: dict, rows: list[dict]) -> None:
    """The JSON record: commit, torch, threads, machine, the arguments, the summary and every row."""
    for k, v in summary.items():
        print(k, v)
    if path:
        meta = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "torch": torch.__version__, "threads": 1, "machine": platform.machine(), "config": vars(args)}
        Path(path).write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--recon-keep", type=int, nargs="+", default=[100])
    ap.add_argument("--jitter", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = run_probe(args.zoos, [{"keep": k, "jitter": args.jitter} for k in args.recon_keep], _one, args.jobs,
                     lambda x: f"keep {x['keep']} jitter {x['jitter']}, {x['n_repair']} repair samples, "
                               f"{x['seconds']:.1f}s")
    summary = {}
    for z in sorted({r["zoo"] for r in rows}):
        for k in args.recon_keep:
            mine = [r for r in rows if r["zoo"] == z and r["keep"] == k]
            summary[f"{z}/keep{k}/jitter{int(args.jitter)}"] = {
                **summarize(mine), "median_seconds": statistics.median(r["seconds"] for r in mine)}
    write_record(args.json, args, summary, rows)


if __name__ == "__main__":
    main()
