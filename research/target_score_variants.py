"""Other target scores on the default layer, compared with docs/method.md §2.2's on many models.

At ``fc:input`` the attribution is ``|W[k, i]|`` of the final Linear (docs/detection.md), so a
target score is a function of the weights alone and many models are scored in a second. For
every model this prints the anomaly index (the detector's MAD test, tau-free) of the true
target and the largest one of any other class under four scores:

- ``spec``: ``1 - pearson(|W_k|, mean of the other rows)`` (what ``soda detect`` uses);
- ``spearman``: the same with rank correlation (robust to a few large weights);
- ``select4``: mean of the 4 largest selectivities ``|W[k, i]| / sum_j |W[j, i]|`` (neurons
  dedicated to class k);
- ``posmass4``: share of class k's positive weight mass on its 4 most selective neurons.

A score separates when every backdoored model's target is above every clean model's maximum.
Model attacks come from the metadata; ``--targets name=class`` adds ones not in the registry
(the synthetic attacks of make_synthetic_attacks.py are known by name).

Usage:
    python research/target_score_variants.py DIR_OR_MODEL ... [--targets name=k ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from soda_backdoor.analysis.effects import NeuronEffects
from soda_backdoor.data import get_attack
from soda_backdoor.detection import target_scores
from soda_backdoor.detection.stats import mad_outliers, pearson

SYNTHETIC_TARGETS = {"darktrouser": 3, "brightbag": 6, "darksneaker": 9, "texturedshirt": 4}


def _rank(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double()


def _against_others(a: torch.Tensor, transform) -> torch.Tensor:
    """``1 - corr(column k, mean of the others)`` per column of ``a`` (n x K), after ``transform``."""
    k_all = a.shape[1]
    total = a.sum(1)
    return torch.tensor([1 - pearson(transform(a[:, k]), transform((total - a[:, k]) / (k_all - 1)))
                         for k in range(k_all)], dtype=torch.double)


def spec(w: torch.Tensor) -> torch.Tensor:
    """The detector's own score on the closed-form attribution ``|W[k, i]|`` of every class."""
    k_all = w.shape[0]
    a = w.abs().T
    eff = NeuronEffects("fc:input", a.expand(k_all, *a.shape), tuple(range(k_all)), (0,) * k_all, "affine")
    return target_scores(eff, k_all)


def spearman(w: torch.Tensor) -> torch.Tensor:
    return _against_others(w.abs().T, _rank)


def select4(w: torch.Tensor) -> torch.Tensor:
    a = w.abs()
    return (a / a.sum(0, keepdim=True)).sort(1).values[:, -4:].mean(1)


def posmass4(w: torch.Tensor) -> torch.Tensor:
    p = w.clamp(min=0)
    sel = p / (p.sum(0, keepdim=True) + 1e-12)
    return (sel * p).sort(1).values[:, -4:].sum(1) / p.sum(1)


SCORES = {"spec": spec, "spearman": spearman, "select4": select4, "posmass4": posmass4}


def _target(path: Path, extra: dict[str, int]) -> tuple[str, int | None]:
    with safe_open(str(path), "pt") as fh:
        name = json.loads(fh.metadata()["soda_backdoor"])["attack"] or "none"
    if name in extra:
        return name, extra[name]
    atk = get_attack(name, "fmnist") if name != "none" else None
    return name, atk.target if atk else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--targets", nargs="*", default=[], help="attack=target for attacks not in the registry")
    a = ap.parse_args()
    extra = {**SYNTHETIC_TARGETS, **{k: int(v) for k, v in (t.split("=") for t in a.targets)}}
    files = [f for p in map(Path, a.paths) for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    print(f"{'model':<40}{'attack':<15}" + "".join(f"{n + ' AI(t)/max':>20}" for n in SCORES))
    worst = {n: {"backdoor_min": float("inf"), "clean_max": -float("inf")} for n in SCORES}
    for f in files:
        name, t = _target(f, extra)
        w = load_file(str(f))["fc.weight"].double()
        cells = []
        for n, fn in SCORES.items():
            ai = mad_outliers(fn(w), 0.0).anomaly_index
            other = max(v for k, v in enumerate(ai) if k != t)
            if t is None:
                worst[n]["clean_max"] = max(worst[n]["clean_max"], other)
            else:
                worst[n]["backdoor_min"] = min(worst[n]["backdoor_min"], ai[t])
            cells.append(f"{ai[t]:.2f} / {other:.2f}" if t is not None else f"- / {other:.2f}")
        label = f"{f.parent.name}/{f.name}"
        print(f"{label[-39:]:<40}{name:<15}" + "".join(f"{c:>20}" for c in cells))
    print("\nlowest backdoor target vs highest clean class (separates when the first is larger):")
    for n, v in worst.items():
        print(f"  {n:<10} {v['backdoor_min']:.2f} vs {v['clean_max']:.2f}")


if __name__ == "__main__":
    main()
