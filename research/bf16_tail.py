"""What bfloat16 autocast buys the repair's tuning on the CPU (research, issue #19)

The repair tunes the layers after a cut on the frozen part's cached activations
(docs/benchmarks.md: on ResNet-18 the tuning of ``layer4`` and the head is 56% of the repair).
This times that loop alone, as ``repair_model`` runs it (SGD, batches of 64, forward,
cross-entropy, backward, step, channels-last), in float32 and under
``torch.autocast("cpu", torch.bfloat16)``, alternating the two ``--repeats`` times on the same
activations, and reports steps per second and the ratio. The activations are the real ones of
the benchmark's ResNet-18 (``--model``) on clean test images; speed does not depend on what
the weights have learnt. Whether bfloat16 is fast depends on the processor (AVX512-BF16 or
AMX): the record carries the CPU flags.

    python research/bf16_tail.py --model runs/bench_study/resnet18-stripet-n12000-e1.th --out research/results/bf16_tail_r18.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from provenance import write_record  # research/provenance.py

from soda_backdoor.data import load_dataset, normalize
from soda_backdoor.workflow import open_model
from soda_backdoor.repair.repair import _tuned_part
from soda_backdoor.utils import cpu_channels_last, run_batched


def cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def time_loop(tail: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, bf16: bool) -> tuple[float, float]:
    opt = torch.optim.SGD(tail.parameters(), lr=0.01, momentum=0.9)
    tail.train()
    gen = torch.Generator().manual_seed(0)
    t0, loss = time.perf_counter(), 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = tail(x[idx])
        out = F.cross_entropy(logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        loss = float(out.detach())
    return (time.perf_counter() - t0) / steps, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--model", required=True, help="a state_dict of --arch in the study's layout")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    data = load_dataset("fmnist")
    loaded = open_model(args.model, data, torch.device("cpu"), args.arch)
    model = loaded.module
    x = normalize(data.x_test[:args.samples], loaded.meta.mean, loaded.meta.std)
    y = data.y_test[:args.samples]
    rows = []
    with cpu_channels_last(model):
        split = _tuned_part(model, x, "auto")
        feats = run_batched(split.prefix, x)
        print(f"{args.arch}: tail after {split.layer}, activations {tuple(feats.shape[1:])}, CPU flags {cpu_flags()}")
        time_loop(split.tail, feats, y, 3, False)  # warm-up, both paths
        time_loop(split.tail, feats, y, 3, True)
        for rep in range(args.repeats):
            for bf16 in (False, True):
                s, loss = time_loop(split.tail, feats, y, args.steps, bf16)
                rows.append({"repeat": rep, "bf16": bf16, "s_per_step": s, "last_loss": loss})
                print(f"repeat {rep} {'bf16' if bf16 else 'fp32'}: {s * 1000:.1f} ms per step of 64")
    fp = sorted(r["s_per_step"] for r in rows if not r["bf16"])[len(rows) // 4]
    bf = sorted(r["s_per_step"] for r in rows if r["bf16"])[len(rows) // 4]
    print(f"median: fp32 {fp * 1000:.1f} ms, bf16 {bf * 1000:.1f} ms per step: bf16 is {fp / bf:.2f}x")
    if args.out:
        write_record(args.out, {"layer": split.layer, "cpu_flags": cpu_flags(), "fp32_median_s": fp,
                                "bf16_median_s": bf, "speedup": fp / bf, "runs": rows}, args)


if __name__ == "__main__":
    main()
