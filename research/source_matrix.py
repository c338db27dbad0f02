"""Source-class rules from the full matrix of optimisation distances between classes.

For a model, ``S[c, k]`` is the mean number of docs/method.md §2.4 optimisation steps (lr 0.05, reg 0.9,
stop at softmax_k >= 0.99, budget 50, counted continuously as in ``transfer_steps``) that
``n`` clean samples of class c need to be classified as k. The candidate rules below score
every class c as the source of a backdoor into the target t (largest score wins):

- ``fastest``      -S[c, t]                        (the current default rule)
- ``one_way``      log((1 + S[t, c]) / (1 + S[c, t]))
- ``rel_source``   -S[c, t] / median_k S[c, k]     (c's pull to t against its pull anywhere)
- ``rel_both``     S[t, c] / median_k S[t, k] - S[c, t] / median_k S[c, k]
- ``rank``         -(rank of t among c's destinations) - S[c, t] / 1000 (ties by steps)
- ``mean_logit``   E[c, t]                         (the study's rule)

Usage:
    python research/source_matrix.py M1.safetensors ... [--attack-file F.json] [--n 32] [--json OUT]
"""

from __future__ import annotations

import argparse

import torch

from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.data import get_attack
from soda_backdoor.detection import mean_logits
from soda_backdoor.detection.detector import transfer_steps

from provenance import write_record

RULES = ("fastest", "one_way", "rel_source", "rel_both", "rank", "mean_logit")


def step_matrix(model: torch.nn.Module, inputs: dict[int, torch.Tensor], n: int, budget: int, lr: float) -> torch.Tensor:
    """``S[c, k]`` for every ordered pair of classes (diagonal 0)."""
    K = len(inputs)
    pairs = [(c, k) for c in range(K) for k in range(K) if c != k]
    steps = transfer_steps(model, [(inputs[c][:n], k) for c, k in pairs], budget, lr)
    S = torch.zeros(K, K, dtype=torch.double)
    for (c, k), v in zip(pairs, steps):
        S[c, k] = v
    return S


def rule_scores(S: torch.Tensor, E: torch.Tensor, t: int) -> dict[str, list[float]]:
    K = len(S)
    off = ~torch.eye(K, dtype=torch.bool)
    med = torch.stack([S[c][off[c]].median() for c in range(K)])
    out = {}
    for name in RULES:
        v = torch.zeros(K, dtype=torch.double)
        for c in range(K):
            if c == t:
                continue
            if name == "fastest":
                v[c] = -S[c, t]
            elif name == "one_way":
                v[c] = torch.log((1 + S[t, c]) / (1 + S[c, t]))
            elif name == "rel_source":
                v[c] = -S[c, t] / med[c]
            elif name == "rel_both":
                v[c] = S[t, c] / med[t] - S[c, t] / med[c]
            elif name == "rank":
                order = sorted((k for k in range(K) if k != c), key=lambda k: float(S[c, k]))
                v[c] = -order.index(t) - S[c, t] / 1000
            else:
                v[c] = E[c, t]
        v[t] = v[[c for c in range(K) if c != t]].min() - 1
        out[name] = [float(x) for x in v]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--attack-file", default=None)
    ap.add_argument("--n", type=int, default=32, help="samples per ordered pair of classes")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results, wins = {}, {r: 0 for r in RULES}
    for path in a.models:
        ctx = load_context("fmnist", None, None, None)
        loaded = open_model(path, ctx.data, torch.device("cpu"))
        name = loaded.meta.attack
        atk = get_attack(name, "fmnist", a.attack_file if name not in ("stripet",) else None)
        if atk is None:
            continue
        ctx = load_context("fmnist", None, name, a.attack_file if name not in ("stripet",) else None)
        model = loaded.module.eval()
        inputs = class_inputs(ctx, loaded.meta, 256, torch.device("cpu"))
        S = step_matrix(model, inputs, a.n, a.budget, a.lr)
        E = mean_logits(model, inputs, len(inputs))
        scores = rule_scores(S, E, atk.target)
        results[path] = {"source": atk.source, "target": atk.target, "S": S.tolist(), "scores": scores}
        print(f"{path}: true {atk.source} -> {atk.target}")
        for rule, v in scores.items():
            best = max(range(len(v)), key=lambda c: v[c])
            wins[rule] += best == atk.source
            ranked = sorted(range(len(v)), key=lambda c: -v[c])
            runner = max(v[c] for c in range(len(v)) if c not in (atk.source, atk.target))
            print(f"  {rule:<11} picks {best} {'OK ' if best == atk.source else 'BAD'} true rank "
                  f"{ranked.index(atk.source) + 1}, margin {v[atk.source] - runner:+.3f}", flush=True)
    print("correct: " + ", ".join(f"{r} {w}/{len(results)}" for r, w in wins.items()))
    if a.json:
        write_record(a.json, results, a)


if __name__ == "__main__":
    main()
