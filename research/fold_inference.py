"""Inference with batch norms folded into their convolutions (``utils.inference_view``) against
the plain module: images per second of the passes that `soda evaluate` and the confident-error
verdict make (eval mode, channels-last, passes of ``pass_batch`` rows), and the largest logit
difference, on randomly initialised models with random BN statistics, same run, same inputs.

    python research/fold_inference.py --json research/results/fold_inference_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

from provenance import write_record
from soda_backdoor.models import create_model
from soda_backdoor.utils import cpu_channels_last, eval_mode, inference_view, pass_batch


def rate(fn, x: torch.Tensor, b: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x), b):
            fn(x[i:i + b])
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["cnn", "MobileNetV2", "resnet18"])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    x = torch.randn(a.images, 1, 28, 28)
    b = pass_batch("cpu")
    for arch in a.arch:
        model = create_model(arch, 10, 1, 28)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        with torch.inference_mode():
            with eval_mode(model), cpu_channels_last(model):
                plain = rate(model, x, b, a.repeats)
                ref = model(x[:64])
            t = time.perf_counter()
            with inference_view(model) as fast:
                setup = time.perf_counter() - t
                folded = rate(fast, x, b, a.repeats)
                diff = float((fast(x[:64]) - ref).abs().max())
        row = {"arch": arch, "plain_img_s": round(plain), "folded_img_s": round(folded),
               "speedup": round(folded / plain, 2), "fold_setup_s": round(setup, 3), "max_logit_diff": diff}
        rows.append(row)
        print(f"{arch:<12} plain {plain:8.0f} img/s   folded {folded:8.0f} img/s   x{folded / plain:.2f}   "
              f"setup {setup:.3f} s   max |logit diff| {diff:.1e}", flush=True)
    if a.json:
        write_record(a.json, rows, a)


if __name__ == "__main__":
    main()
