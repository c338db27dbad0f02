"""Batched causal attribution against the study's per-neuron loop, same model, same inputs.

The study's procedure: for each batch of 64 images, one forward pass of the rest of the
network per neuron, in a Python loop. Ours: all (neuron, sample) interventions in chunks.
Both run the rest of the network through the same hook mechanism, on a layer where the rest
of the network is not affine (default: ``cnn`` at ``features.6``, the second conv block).

Usage:
    python benchmarks/bench_analysis.py [--model M.safetensors] [--arch cnn] [--layer features.6]
        [--classes 10] [--samples 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from soda_backdoor.analysis import AttributionConfig, compute_neuron_effects, naive_class_attribution, parse_layer
from soda_backdoor.models import create_model, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: a fresh seeded model of --arch)")
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--layer", default="features.6")
    ap.add_argument("--classes", type=int, default=10, help="classes analysed")
    ap.add_argument("--samples", type=int, default=256, help="samples per class")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = (load_model(a.model).module if a.model else
             create_model(a.arch, 10, a.channels, a.size)).eval()
    ref = parse_layer(model, a.layer)
    inputs = {c: torch.randn(a.samples, a.channels, a.size, a.size) for c in range(a.classes)}

    t0 = time.perf_counter()
    eff = compute_neuron_effects(model, ref, inputs, AttributionConfig(num_samples=a.samples, chunk_size=a.chunk_size))
    batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = torch.stack([naive_class_attribution(model, ref, inputs[c]) for c in range(a.classes)])
    naive_s = time.perf_counter() - t0

    diff = float((naive - eff.matrices).abs().max())
    res = {"naive_seconds": naive_s, "batched_seconds": batched, "speedup": naive_s / batched,
           "max_abs_diff": diff, "layer": str(ref), "method": eff.method, "neurons": eff.num_neurons,
           "classes": a.classes, "samples_per_class": a.samples, "threads": torch.get_num_threads()}
    print(f"{'path':<28}{'seconds':>10}")
    print(f"{'naive (per-neuron loop)':<28}{naive_s:>10.2f}")
    print(f"{'batched (' + eff.method + ')':<28}{batched:>10.2f}")
    print(f"speedup {res['speedup']:.1f}x, max |diff| {diff:.2e}, layer {ref}, {eff.num_neurons} neurons, "
          f"{a.classes} classes x {a.samples} samples")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
