"""The study's architectures: our audit steps against faithful references of the study's code.

On one model per architecture (a state_dict in the study's layout, from ``--model`` or trained
briefly here and cached), the same data and the same inputs, one run times each step twice:

* ours: ``soda_backdoor.workflow`` with its defaults;
* the reference: the procedure of the SODA study's ``semantic_mitigation.py``
  (github.com/sunbing7/SODA), re-implemented below step by step:

  - evaluate: ``test()``: eval mode, ``no_grad``, batches of 64, clean test split then the
    semantic test samples;
  - detect: ``analyze_hidden`` for every class (256 samples, batches of 64, one pass of the
    rest of the network per neuron, each output moved to numpy as the study does), the PCC
    target score and MAD test, then for a flagged target ``analyze_source_class`` (the mean
    logits of 256 samples of every class);
  - reconstruct: ``gen_trigger``, one image at a time with ``torch.optim.SGD`` and early stop;
  - repair: ``remove``: the masked model (``--top``), ``--epoch`` epochs of ``train_tune``
    in train mode over the 5% clean subset, each followed by three test passes (clean,
    semantic, reconstructed), and the test passes before and after.

It prints seconds, peak memory of the step (resident memory above its start on CPU; the peak
of allocated GPU memory with ``--device cuda``), the outcome of each side, and the ratio. Both
sides run on the same device (``--device``, default auto); as the study's data loaders do, the
reference moves each batch to the device, and ours keeps its own data path. The reference
repair uses the study's settings for striped T-shirts on
MobileNetV2 (``data/commands.txt``: lr 0.01, reg 0.0005, top 0.5, 5 epochs) unless told.

Usage:
    python benchmarks/bench_study_archs.py [--arch MobileNetV2 resnet18] [--model ARCH=PATH ...]
        [--steps evaluate detect reconstruct repair] [--device auto|cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from soda_backdoor.analysis import activations, naive_class_attribution, parse_layer
from soda_backdoor.analysis.effects import make_head
from soda_backdoor.analysis.fold import trace_downstream
from soda_backdoor.analysis.hooks import intervene
from soda_backdoor.artifacts import SampleSet
from soda_backdoor.detection import DetectionConfig
from soda_backdoor.detection.detector import SourceEvidence, get_source_rule, mean_logits
from soda_backdoor.detection.stats import mad_outliers, pearson
from soda_backdoor.errors import UserInputError
from soda_backdoor.data import normalize
from soda_backdoor.reconstruction import ReconstructionConfig, reconstruct_one_by_one
from soda_backdoor.repair import RepairConfig
from soda_backdoor.repair.repair import PRECISIONS
from soda_backdoor.training import TrainConfig
from soda_backdoor.utils import resolve_device
from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.workflow import steps

STEPS = ("evaluate", "detect", "reconstruct", "repair")
BRIEF = {"MobileNetV2": (30000, 2), "resnet18": (12000, 1)}
"""Clean images and epochs of the brief training per architecture (a few minutes each on 2 cores)."""


class PeakRSS:
    """Peak resident set size (bytes) of this process above its value at entry, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss() - self.base)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def timed(fn, device: torch.device = torch.device("cpu")):
    """``(result, seconds, peak MB)`` of ``fn()``: on CUDA, the clock waits for the device's
    queued work and the peak is of allocated GPU memory above the step's start."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else mem.peak
    return out, sec, peak / 2**20


def device_of(module) -> torch.device:
    return next(module.parameters()).device


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def ref_test_pass(module, x_u8, y, mean, std, batch=64) -> float:
    """The study's ``test()``: eval mode, ``no_grad``, batches of 64; accuracy against ``y``."""
    module.eval()
    dev, correct = device_of(module), 0
    for i in range(0, len(x_u8), batch):
        out = module(normalize(x_u8[i:i + batch].to(dev), mean, std))
        correct += int((out.argmax(1) == y[i:i + batch].to(dev)).sum())
    return correct / max(len(y), 1)


def ref_evaluate(model, ctx) -> dict:
    d, sp, m = ctx.data, ctx.splits, model.meta
    acc = ref_test_pass(model.module, d.x_test[sp.clean_test], d.y_test[sp.clean_test], m.mean, m.std)
    xs = d.x_test[sp.semantic_test]
    asr = ref_test_pass(model.module, xs, torch.full((len(xs),), ctx.attack.target), m.mean, m.std)
    return {"acc": acc, "asr": asr}


@torch.no_grad()
def study_analyze_hidden(module, ref, x, batch: int = 64) -> torch.Tensor:
    """``analyze_hidden`` as the study writes it: per batch, per neuron, clone, shift, run the tail
    (its split model's second half), move the output to numpy; then stack and average."""
    tail = trace_downstream(module, ref, x[:4]).tail(0)
    avg = []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        h, logits = activations(module, ref, xb)
        g, _ = make_head(module, ref, xb, h, logits, tail)
        flat = torch.clone(h.reshape(len(h), -1))
        per_neuron = []
        for i in range(flat.shape[1]):
            moved = torch.clone(flat)
            moved[:, i] = flat[:, i] + 1
            per_neuron.append(g(moved.reshape(h.shape)).cpu().detach().numpy())
        per_neuron = np.abs(logits.cpu().numpy() - np.array(per_neuron))
        avg.append(np.mean(per_neuron, axis=1))
    return torch.from_numpy(np.mean(np.array(avg), axis=0)).float()


def ref_detect(model, ctx, layer: str, tau: float) -> dict:
    """``analyze_hidden`` per class, ``detect_pcc``, then ``analyze_source_class`` per flagged target."""
    module, k = model.module.eval(), ctx.data.num_classes
    inputs = class_inputs(ctx, model.meta, 256, device_of(module))
    ref = parse_layer(module, layer)
    mats = torch.stack([study_analyze_hidden(module, ref, inputs[c]) for c in range(k)])
    rho = torch.zeros(k, k)
    for c in range(k):
        for j in range(k):
            if j != c:
                others = torch.cat([mats[c][:, :j], mats[c][:, j + 1:]], 1).mean(1)
                rho[c, j] = pearson(mats[c][:, j], others)
    test = mad_outliers(1.0 - rho.mean(0), tau)
    pairs = []
    for t in test.flagged:
        e = ref_mean_logits(module, inputs, k)
        col = e[:, t].clone()
        col[t] = 0.0
        pairs.append((int(col.argmax()), t))
    return {"pairs": pairs}


@torch.no_grad()
def ref_mean_logits(module, inputs, k: int):
    """``analyze_embedding`` for every class: mean logits of 256 samples in batches of 64."""
    module.eval()
    return torch.stack([torch.cat([module(inputs[c][i:i + 64]) for i in range(0, 256, 64)]).mean(0)
                        for c in range(k)])


def ref_reconstruct(model, ctx, source: int, target: int, n: int, steps_: int) -> dict:
    """``gen_trigger``: one image at a time, starts in the same order as ours."""
    idx = ctx.splits.clean_train[ctx.data.y_train[ctx.splits.clean_train] == source]
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]
    starts = normalize(ctx.data.x_train[idx].to(device_of(model.module)), model.meta.mean, model.meta.std)
    cfg = ReconstructionConfig(steps=steps_, num_keep=n)
    kept_x, tried = [], 0
    for i in range(0, len(starts), 10):  # the study stops at n kept; tried in blocks of 10 to check
        xs, _, kept = reconstruct_one_by_one(model.module, starts[i:i + 10], target, cfg)
        for x, k in zip(xs, kept):
            if len(kept_x) < n:
                tried += 1
                if k:
                    kept_x.append(x)
        if len(kept_x) >= n:
            break
    return {"kept": len(kept_x), "tried": tried, "success": len(kept_x) / max(tried, 1)}


def ref_repair(model, ctx, source: int, target: int, samples: SampleSet, layer: str, attribution: torch.Tensor,
               top: float, epochs: int, lr: float, reg: float) -> dict:
    """``remove``: masked model, ``train_tune`` epochs (train mode), three test passes per epoch.

    ``attribution``: ``A_s[:, t]``, which the study reads from its analysis files.
    """
    module, meta = model.module, model.meta
    dev = device_of(module)
    ref = parse_layer(module, layer)
    x_fix, x_hold = samples.split()
    x_hold = x_hold.to(dev)
    d, sp = ctx.data, ctx.splits
    x_clean = normalize(d.x_train[sp.defender], meta.mean, meta.std)
    y_clean = d.y_train[sp.defender]
    a = attribution
    mask = torch.zeros_like(a)
    mask[a.argsort(descending=True)[:int(len(a) * top)]] = 1.0

    def tests() -> tuple[float, float, float]:
        with intervene(module, ref, lambda h: h * mask.view([1, -1] + [1] * (h.dim() - 2))):
            e = ref_evaluate(model, ctx)
            with torch.no_grad():
                module.eval()
                r = float((torch.cat([module(x_hold[i:i + 64]) for i in range(0, len(x_hold), 64)]).argmax(1)
                           == target).float().mean())
        return e["acc"], e["asr"], r

    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    tests()
    need = 20
    for _ in range(epochs):
        module.train()
        perm = torch.randperm(len(y_clean), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64][:64 - need]
            pick = torch.randint(0, len(x_fix), (need,), generator=gen)
            xb = torch.cat([x_clean[b], x_fix[pick]]).to(dev)
            yb = torch.cat([y_clean[b], torch.full((need,), source)]).to(dev)
            with intervene(module, ref, lambda h: h * mask.view([1, -1] + [1] * (h.dim() - 2))):
                out = module(xb)
            away = F.cross_entropy(out[-need:], torch.full((need,), target, device=dev))
            loss = F.cross_entropy(out, yb) - reg * away
            opt.zero_grad()
            loss.backward()
            opt.step()
        tests()
    module.eval()
    e = ref_evaluate(model, ctx)  # the recovered (unmasked) model, as the study's final test
    return {**e, "rasr": float((module(x_hold).argmax(1) == target).float().mean())}


# ---------------------------------------------------------------------------- the benchmark


def brief_model(arch: str, ctx, n: int, epochs: int, cache: Path, device: torch.device) -> Path:
    """Train ``arch`` on ``n`` clean images (+ the semantic samples) for ``epochs``; cached by settings."""
    path = cache / f"{arch}-stripet-n{n}-e{epochs}.th"
    if path.exists():
        return path
    g = torch.Generator().manual_seed(0)
    sub = ctx.splits.clean_train[torch.randperm(len(ctx.splits.clean_train), generator=g)[:n]].sort().values
    small = replace(ctx, splits=replace(ctx.splits, clean_train=sub))
    cfg = TrainConfig(epochs=epochs, lr=0.05, milestones=(max(1, epochs - 1),), plain_final_epochs=1, seed=0)
    print(f"training {arch} on {n} images for {epochs} epoch(s) (cached at {path})", flush=True)
    rep = steps.train(small, cfg, device, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rep.model.module.state_dict(), path)
    return path


def bench_arch(arch: str, path: str, ctx, which: tuple[str, ...], a, dev: torch.device) -> list[dict]:
    base = open_model(path, ctx.data, dev, arch=arch)
    clock = functools.partial(timed, device=dev)
    src, tgt = ctx.attack.source, ctx.attack.target
    rows = []

    def row(step, ours, ref, ours_out, ref_out):
        (_, so, mo), (_, sr, mr) = ours, ref
        r = {"arch": arch, "step": step, "ours_s": so, "ref_s": sr, "ratio": sr / so, "ours_mb": mo, "ref_mb": mr,
             "ours": ours_out, "ref": ref_out}
        rows.append(r)
        print(f"{arch:<12}{step:<22}{sr:>9.1f}{so:>9.2f}{sr / so:>8.1f}x{mr:>8.0f}{mo:>8.0f}  "
              f"ref {ref_out}  ours {ours_out}", flush=True)

    if "evaluate" in which:  # short: alternate twice, keep each side's faster run
        runs = [(clock(lambda: steps.evaluate(base, ctx, device=dev)), clock(lambda: ref_evaluate(base, ctx)))
                for _ in range(2)]
        o = min((x[0] for x in runs), key=lambda t: t[1])
        r = min((x[1] for x in runs), key=lambda t: t[1])
        row("evaluate", o, r, {"acc": round(o[0].acc, 4), "asr": round(o[0].asr, 4)},
            {k: round(v, 4) for k, v in r[0].items()})
    if "detect" in which:
        cfg = DetectionConfig()
        o = clock(lambda: steps.detect(base, ctx, cfg, device=dev))
        rep = o[0]
        r = clock(lambda: ref_detect(base, ctx, a.ref_layer or str(parse_layer(base.module, None)), a.ref_tau))
        # ours: the default verdict (confident errors: the pair, source included, from one pass over the test
        # split); the reference: its target test, and its source rule when a target is flagged
        row("detect", o, r, {"pairs": [list(p) for p in rep.pairs], "evidence": rep.evidence,
                             "weight_pairs": [list(p) for p in rep.result.pairs], "note": rep.note[:60]},
            {"pairs": [list(p) for p in r[0]["pairs"]]})
        # The `fastest` source rule of `--evidence weights` for the true target, timed alone: what a
        # weight-profile flag adds to that evidence (the default verdict does not run it).
        inputs = class_inputs(ctx, base.meta, cfg.attribution.num_samples, dev)
        e = mean_logits(base.module, inputs, ctx.data.num_classes)
        ev = SourceEvidence(base.module, inputs, tgt, ctx.data.num_classes, e, cfg)
        so = clock(lambda: get_source_rule(cfg.source_rule)(ev))
        sr = clock(lambda: ref_mean_logits(base.module, inputs, ctx.data.num_classes))
        scores = so[0][0].clone()
        scores[tgt] = -float("inf")
        col = sr[0][:, tgt].clone()
        col[tgt] = -float("inf")
        row(f"weights' source (t={tgt})", so, sr, {"source": int(scores.argmax())}, {"source": int(col.argmax())})
    samples = None
    if "reconstruct" in which or "repair" in which:
        rcfg = ReconstructionConfig(num_keep=a.n_recon, steps=a.recon_steps)
        o = clock(lambda: steps.reconstruct(base, ctx, src, tgt, rcfg, device=dev))
        rec = o[0].reconstruction
        samples = SampleSet.from_reconstruction(rec, o[0].fingerprint)
        if "reconstruct" in which:
            r = clock(lambda: ref_reconstruct(base, ctx, src, tgt, a.n_recon, a.recon_steps))
            row("reconstruct", o, r, {"kept": rec.kept, "tried": rec.tried, "success": round(rec.kept / rec.tried, 4)},
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r[0].items()})
    if "repair" in which:
        ours = []
        for precision in a.repair_precision:  # ours once per precision, against one run of the reference
            m1 = copy.deepcopy(base)
            cfg = RepairConfig(precision=precision, **({} if a.repair_epochs is None else {"epochs": a.repair_epochs}))
            ours.append((precision, clock(lambda: steps.repair(m1, ctx, src, tgt, samples, cfg, device=dev))))
        m2 = copy.deepcopy(base)
        layer = a.ref_layer or str(parse_layer(base.module, None))
        inputs = class_inputs(ctx, base.meta, 256, dev)
        attribution = naive_class_attribution(m2.module.eval(), parse_layer(m2.module, layer), inputs[src])[:, tgt]
        r = clock(lambda: ref_repair(m2, ctx, src, tgt, samples, layer, attribution, a.ref_top, a.ref_epochs,
                                     a.ref_lr, a.ref_reg))
        for precision, o in ours:
            rep = o[0]
            row("repair" if precision == "auto" else f"repair ({precision})", o, r,
                {"acc": round(rep.after.acc, 4), "asr": round(rep.after.asr, 4),
                 "rasr": round(rep.rasr_after, 4), "acc_before": round(rep.before.acc, 4),
                 "asr_before": round(rep.before.asr, 4), "precision": rep.config.precision},
                {k: round(v, 4) for k, v in r[0].items()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["MobileNetV2", "resnet18"])
    ap.add_argument("--model", nargs="*", default=[], help="ARCH=PATH: a state_dict to use instead of training one")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--attack", default="stripet")
    ap.add_argument("--train-images", type=int, default=None, help="clean images of the brief training "
                    "(default per arch: MobileNetV2 30000, resnet18 12000)")
    ap.add_argument("--train-epochs", type=int, default=None, help="(default: MobileNetV2 2, resnet18 1)")
    ap.add_argument("--cache", default="runs/bench_study", help="where briefly trained models are kept")
    ap.add_argument("--n-recon", type=int, default=100)
    ap.add_argument("--recon-steps", type=int, default=2000)
    ap.add_argument("--repair-epochs", type=int, default=None, help="our repair's epochs (default: ours)")
    ap.add_argument("--repair-precision", nargs="+", default=["auto"], choices=PRECISIONS,
                    help="our repair's tuning precision; several: ours once per precision (default auto, ours)")
    ap.add_argument("--ref-layer", default=None, help="the reference's analysis layer (default: ours)")
    ap.add_argument("--ref-tau", type=float, default=3.0, help="the reference's --confidence")
    ap.add_argument("--ref-top", type=float, default=0.5)
    ap.add_argument("--ref-epochs", type=int, default=5)
    ap.add_argument("--ref-lr", type=float, default=0.01)
    ap.add_argument("--ref-reg", type=float, default=0.0005)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda: where both sides run (default auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        dev = resolve_device(a.device)
    except UserInputError as exc:
        ap.error(str(exc))
    ctx = load_context("fmnist", None, a.attack, None)
    given = dict(m.split("=", 1) for m in a.model)
    print(f"{'arch':<12}{'step':<22}{'ref s':>9}{'ours s':>9}{'ratio':>9}{'ref MB':>8}{'ours MB':>8}")
    rows = []
    for arch in a.arch:
        n, epochs = BRIEF.get(arch, (20000, 1))
        path = given.get(arch) or str(brief_model(arch, ctx, a.train_images or n, a.train_epochs or epochs,
                                                  Path(a.cache), dev))
        rows += bench_arch(arch, path, ctx, tuple(a.steps), a, dev)
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        rec = {"config": vars(a), "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "commit": commit, "machine": platform.machine(), "processor": platform.processor(),
               "cpus": os.cpu_count(),
               "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
        Path(a.json).write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    main()
