"""Target-detection statistics of several analysis layers over many models (docs/method.md §2.1-2.2).

For every model and layer: the anomaly index of the true target (backdoored models) and the
largest anomaly index of any other class, with 256 clean samples per class. A layer separates
well when every backdoored model's target sits far above every clean model's maximum.

Usage:
    python research/layer_study.py M1.safetensors ... [--layers fc:input features.9 ...]
        [--attack-file F.json] [--json OUT]
"""

from __future__ import annotations

import argparse

import torch

from soda_backdoor.analysis import AttributionConfig, compute_neuron_effects, parse_layer
from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.data import get_attack
from soda_backdoor.detection import target_scores
from soda_backdoor.detection.stats import mad_outliers

from provenance import write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--layers", nargs="+", default=["fc:input", "features.9", "features.8", "features.6"])
    ap.add_argument("--attack-file", default=None)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'model':<30}{'true':>8}" + "".join(f"{layer:>24}" for layer in a.layers))
    print(f"{'':<38}" + "".join(f"{'AI(target) / max other':>24}" for _ in a.layers))
    for path in a.models:
        name = open_model(path, None, torch.device("cpu")).meta.attack
        attack_file = a.attack_file if name not in ("stripet", "none") else None
        atk = get_attack(name, "fmnist", attack_file)
        ctx = load_context("fmnist", None, name, attack_file)
        loaded = open_model(path, ctx.data, torch.device("cpu"))
        inputs = class_inputs(ctx, loaded.meta, a.num_samples, torch.device("cpu"))
        row = {"model": path, "attack": name, "source": atk.source if atk else None,
               "target": atk.target if atk else None, "layers": {}}
        cells = []
        for layer in a.layers:
            ref = parse_layer(loaded.module, layer)
            eff = compute_neuron_effects(loaded.module, ref, inputs, AttributionConfig(num_samples=a.num_samples))
            test = mad_outliers(target_scores(eff, len(inputs)), 0.0)
            ai = list(test.anomaly_index)
            t = atk.target if atk else None
            other = max(v for k, v in enumerate(ai) if k != t)
            row["layers"][layer] = {"anomaly_index": ai, "target_ai": ai[t] if t is not None else None,
                                    "max_other": other, "method": eff.method, "seconds": eff.seconds}
            cells.append(f"{ai[t]:.2f} / {other:.2f}" if t is not None else f"- / {other:.2f}")
        rows.append(row)
        true = f"{atk.source}->{atk.target}" if atk else "none"
        print(f"{path[-30:]:<30}{true:>8}" + "".join(f"{c:>24}" for c in cells), flush=True)
    if a.json:
        write_record(a.json, rows, a)


if __name__ == "__main__":
    main()
