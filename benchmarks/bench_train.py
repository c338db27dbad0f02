"""Training throughput (images/s) of ``cnn`` and ``resnet18`` on this machine.

Times SGD steps on random data of the Fashion-MNIST shape (1 x 28 x 28, batch 64), after a
warm-up, with and without channels-last memory layout (the trainer uses channels-last on CPU).

Usage: python benchmarks/bench_train.py [--archs cnn resnet18] [--steps 20] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from soda_backdoor.models import create_model
from soda_backdoor.utils import resolve_device


def throughput(arch: str, steps: int, channels_last: bool, device: torch.device, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = create_model(arch, 10, 1, 28).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["cnn", "resnet18"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = resolve_device(a.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch 64, input 1x28x28")
    print(f"{'arch':<12}{'contiguous img/s':>18}{'channels-last img/s':>21}{'ratio':>8}")
    for arch in a.archs:
        base = throughput(arch, a.steps, False, device)
        cl = throughput(arch, a.steps, True, device)
        print(f"{arch:<12}{base:>18.0f}{cl:>21.0f}{cl / base:>8.2f}")


if __name__ == "__main__":
    main()
