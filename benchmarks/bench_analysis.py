"""Batched causal attribution against the study's per-neuron loop, same model, same inputs.

The study's procedure (the naive reference): for each batch of 64 images, one forward pass
of the rest of the network per neuron, in a Python loop. Ours: all (neuron, sample)
interventions in chunks, with the affine modules that follow the layer folded into one
response per neuron (exact; ``soda_backdoor.analysis.fold``). The unfolded batched path is
timed too, to show what batching alone gives on this machine.

The default layer, ``cnn`` at ``features.6`` (the ReLU of the second conv block), is one
where the rest of the network is not affine: max-pool, conv, batch norm, ReLU, pooling and
the Linear head. ``--layers`` adds rows for other layers (the JSON describes the first).

Usage:
    python benchmarks/bench_analysis.py [--model M.safetensors] [--arch cnn]
        [--layers features.6 features.2 ...] [--classes 10] [--samples 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from soda_backdoor.analysis import AttributionConfig, compute_neuron_effects, naive_class_attribution, parse_layer
from soda_backdoor.models import create_model, load_model


def _timed(fn, repeat: int):
    """Median wall time of ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_layer(model: torch.nn.Module, layer: str, inputs: dict[int, torch.Tensor], chunk_size: int,
                unfolded: bool, repeat: int) -> dict:
    """Time the naive loop, the unfolded batched path and the default (folded) path at one layer."""
    ref = parse_layer(model, layer)
    samples = len(next(iter(inputs.values())))
    config = AttributionConfig(num_samples=samples, chunk_size=chunk_size)
    batched, eff = _timed(lambda: compute_neuron_effects(model, ref, inputs, config), repeat)
    naive_s, naive = _timed(lambda: torch.stack([naive_class_attribution(model, ref, inputs[c]) for c in sorted(inputs)]),
                            repeat)
    plain_s, plain_diff = float("nan"), float("nan")
    if unfolded:
        plain_config = AttributionConfig(num_samples=samples, chunk_size=chunk_size, exact_affine=False)
        plain_s, plain = _timed(lambda: compute_neuron_effects(model, ref, inputs, plain_config), 1)
        plain_diff = float((naive - plain.matrices).abs().max())
    return {"layer": str(ref), "neurons": eff.num_neurons, "method": eff.method, "folded": eff.folded,
            "naive_seconds": naive_s, "unfolded_seconds": plain_s, "batched_seconds": batched,
            "speedup": naive_s / batched, "max_abs_diff": float((naive - eff.matrices).abs().max()),
            "unfolded_max_abs_diff": plain_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: a fresh seeded model of --arch)")
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--layers", nargs="+", default=["features.6"], help="layers to time (the JSON has the first)")
    ap.add_argument("--layer", default=None, help="one layer (same as --layers LAYER)")
    ap.add_argument("--classes", type=int, default=10, help="classes analysed")
    ap.add_argument("--samples", type=int, default=256, help="samples per class")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=AttributionConfig().chunk_size)
    ap.add_argument("--no-unfolded", action="store_true", help="skip timing the unfolded batched path")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of the naive and default paths (median)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    layers = [a.layer] if a.layer else a.layers
    torch.manual_seed(0)
    model = (load_model(a.model).module if a.model else create_model(a.arch, 10, a.channels, a.size)).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = {c: torch.randn(a.samples, a.channels, a.size, a.size, generator=gen) for c in range(a.classes)}
    rows = [bench_layer(model, layer, inputs, a.chunk_size, not a.no_unfolded, a.repeat) for layer in layers]

    print(f"{a.model or a.arch}: {a.classes} classes x {a.samples} samples, {torch.get_num_threads()} threads, "
          f"chunks of {a.chunk_size} rows, median of {a.repeat} runs")
    head = f"{'layer':<14}{'neurons':>8}{'naive s':>10}{'unfolded s':>12}{'ours s':>9}{'speedup':>9}{'max diff':>10}  folded"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<14}{r['neurons']:>8}{r['naive_seconds']:>10.2f}{r['unfolded_seconds']:>12.2f}"
              f"{r['batched_seconds']:>9.2f}{r['speedup']:>8.1f}x{r['max_abs_diff']:>10.1e}  {r['folded'] or '-'}")
    if a.json:
        res = {**rows[0], "classes": a.classes, "samples_per_class": a.samples, "threads": torch.get_num_threads(),
               "chunk_size": a.chunk_size, "repeat": a.repeat, "rows": rows}
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
