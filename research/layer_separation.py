"""Does a layer (or the sum of two layers' anomaly indices) separate backdoored from clean models?

Reads JSON files written by ``layer_study.py --json`` and prints, per layer and per pair of
layers, the lowest anomaly index of a backdoored model's true target and the highest of any
class of a clean model (for a pair: the per-class sum over both layers). A layer separates
when the first is larger.

Usage:
    python research/layer_separation.py research/results/layers_*.json
"""

from __future__ import annotations

import itertools
import sys

from provenance import read_rows


def main() -> None:
    rows = [r for p in sys.argv[1:] for r in read_rows(p)]
    layers = sorted(set.intersection(*(set(r["layers"]) for r in rows)))
    combos = [(name,) for name in layers] + list(itertools.combinations(layers, 2))
    print(f"{len(rows)} models ({sum(r['target'] is None for r in rows)} clean); layers in all: {', '.join(layers)}")
    print(f"{'layers':<30}{'lowest backdoor target':>24}{'highest clean class':>22}  separates")
    for combo in combos:
        low, high = float("inf"), -float("inf")
        for r in rows:
            ai = [sum(r["layers"][name]["anomaly_index"][k] for name in combo) for k in range(len(r["layers"][combo[0]]["anomaly_index"]))]
            t = r["target"]
            if t is None:
                high = max(high, max(ai))
            else:
                low = min(low, ai[t])
        print(f"{' + '.join(combo):<30}{low:>24.2f}{high:>22.2f}  {'yes' if low > high else 'no'}")


if __name__ == "__main__":
    main()
