"""Per-architecture unit costs, and the seconds of each audit step they predict.

For each architecture it measures on this machine, in passes of the default CPU pass size:
FLOPs of one forward pass (``torch.utils.flop_counter``), forward images/s (inference),
input-gradient rows/s (forward + backward to the input: reconstruction and the source rule),
and training rows/s (forward + backward + SGD step: repair). The step costs follow
(docs/benchmarks.md, "Cost model"):

    evaluate     = N_test / forward_rate
    detect       = K * n_analysis / forward_rate   (0 at a Linear layer's input: closed form)
    source step  = (K - 1) * source_samples * mean_steps / grad_rate
    reconstruct  = sum of steps over the tried starts / grad_rate
    repair       = epochs * n_defender * B / (B - 20) / train_rate + 2 * evaluate

Usage: python benchmarks/cost_model.py [--arch cnn MobileNetV2 resnet18] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from soda_backdoor.models import create_model
from soda_backdoor.utils import cpu_channels_last, frozen, pass_batch


def rate(fn, rows: int, min_seconds: float = 2.0) -> float:
    """Rows per second of ``fn`` (one call handles ``rows`` rows), after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += rows
    return n / (time.perf_counter() - t0)


def unit_costs(arch: str, size: int = 28, channels: int = 1) -> dict:
    model = create_model(arch, 10, channels, size).eval()
    b = pass_batch("cpu")
    x = torch.randn(b, channels, size, size)
    with FlopCounterMode(display=False) as fc:
        model(x[:1])
    flops = fc.get_total_flops()
    with cpu_channels_last(model):
        with torch.inference_mode():
            fwd = rate(lambda: model(x), b)
        with frozen(model):
            def grad():
                xa = x.clone().requires_grad_(True)
                torch.autograd.grad(model(xa)[:, 0].sum(), xa)
            grd = rate(grad, b)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        y = torch.zeros(64, dtype=torch.long)
        x64 = torch.randn(64, channels, size, size)

        def train():
            opt.zero_grad()
            F.cross_entropy(model(x64), y).backward()
            opt.step()
        trn = rate(train, 64)
    return {"arch": arch, "gflops": flops / 1e9, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "forward_per_s": fwd, "grad_per_s": grd, "train_per_s": trn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["cnn", "MobileNetV2", "resnet18"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [unit_costs(arch) for arch in a.arch]
    print(f"{'arch':<12}{'GFLOPs':>8}{'params M':>10}{'fwd img/s':>11}{'grad rows/s':>13}{'train rows/s':>14}"
          f"{'eval 10k s':>12}{'repair s':>10}")
    for r in rows:
        ev = 10000 / r["forward_per_s"]
        rep = 5 * 3000 * 64 / 44 / r["train_per_s"] + 2 * ev
        r.update(predicted_evaluate_s=ev, predicted_repair_s=rep)
        print(f"{r['arch']:<12}{r['gflops']:>8.3f}{r['params_m']:>10.2f}{r['forward_per_s']:>11.0f}"
              f"{r['grad_per_s']:>13.0f}{r['train_per_s']:>14.0f}{ev:>12.1f}{rep:>10.1f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "machine": platform.machine(), "pass_batch": pass_batch("cpu")}, fh, indent=2)


if __name__ == "__main__":
    main()
