"""Compare candidate source-class rules on trained models (docs/method.md §2.3, issue 3).

For a model and its detected (or given) target t, every class c gets several scores; the rule
is right when the true source has the largest score. Statistics:

- mean_logit:      E[c, t] (the study's rule).
- asym_logit:      E[c, t] - E[t, c] on per-sample centred logits.
- asym_prob:       P[c, t] - P[t, c] (mean softmax).
- ease:            mean log-softmax_t after k steps of the optimisation of docs/method.md §2.4 from class-c samples.
- asym_ease:       ease(c -> t) - ease(t -> c): natural similarity is symmetric, a backdoor one-way.
- steps:           minus the mean steps to reach softmax_t >= 0.99 (budget B).
- asym_steps:      steps(t -> c) - steps(c -> t).
- steps_q25:       minus the 25th percentile of the per-sample steps (a tail statistic: the
                   samples of class c closest to the backdoor feature).
- steps_median:    minus the median of the per-sample steps.

Usage: python research/source_rules.py M1.safetensors ... [--attack-file F.json] [--json OUT]
       (--target T --source S for a model trained clean)
"""

from __future__ import annotations

import argparse
import json

import torch

from soda_backdoor.workflow import class_inputs, load_context, open_model
from soda_backdoor.data import get_attack
from soda_backdoor.detection import mean_logits
from soda_backdoor.models import load_model


def directed_optimisation(model, x: torch.Tensor, tgt: torch.Tensor, steps: int, lr: float = 0.1, reg: float = 0.9,
                          threshold: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row docs/method.md §2.4 optimisation towards per-row targets; returns (log p_t after k steps, steps to threshold)."""
    x = x.clone()
    buf = torch.zeros_like(x)
    reached = torch.full((len(x),), steps, dtype=torch.float)
    rows = torch.arange(len(x))
    for s in range(steps):
        xa = x.requires_grad_(True)
        logits = model(xa)
        logp = logits.log_softmax(1)[rows, tgt]
        hit = (logp.exp() >= threshold) & (reached == steps)
        reached[hit] = s
        loss = (-logits[rows, tgt] + reg * xa.pow(2).flatten(1).mean(1)).sum()
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            g = g + 5e-4 * x
            buf = g if s == 0 else 0.9 * buf + g
            x = (x - lr * buf).detach()
    with torch.no_grad():
        logp = model(x).log_softmax(1)[rows, tgt]
    return logp, reached


def attack_of(path: str, attack_file: str | None) -> tuple[int, int]:
    """(source, target) of the attack a model was trained with (from its metadata)."""
    name = load_model(path).meta.attack
    atk = get_attack(name, "fmnist", attack_file if name not in ("stripet",) else None)
    if atk is None:
        raise SystemExit(f"{path}: trained clean; give --target/--source")
    return atk.source, atk.target


def scores_for(path: str, target: int, n: int, k: int, attack_file: str | None = None) -> dict[str, list[float]]:
    ctx = load_context("fmnist", None, None, None)
    loaded = open_model(path, ctx.data, torch.device("cpu"))
    if loaded.meta.attack != "none":
        name = loaded.meta.attack
        ctx = load_context("fmnist", None, name, attack_file if name not in ("stripet",) else None)
    model = loaded.module.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    inputs = class_inputs(ctx, loaded.meta, 256, torch.device("cpu"))
    K = len(inputs)
    e = mean_logits(model, inputs, K)
    with torch.no_grad():
        cent = torch.stack([(model(inputs[c]) - model(inputs[c]).mean(1, keepdim=True)).mean(0) for c in range(K)])
        prob = torch.stack([model(inputs[c]).softmax(1).mean(0) for c in range(K)])
    others = [c for c in range(K) if c != target]
    xs = torch.cat([inputs[c][:n] for c in others] + [inputs[target][:n]] * len(others))
    tg = torch.cat([torch.full((n,), target) for _ in others] + [torch.full((n,), c) for c in others])
    logp, reached = directed_optimisation(model, xs, tg, k)
    m = len(others) * n
    fwd_e, rev_e = logp[:m].view(-1, n).mean(1), logp[m:].view(-1, n).mean(1)
    fwd_s, rev_s = reached[:m].view(-1, n).mean(1), reached[m:].view(-1, n).mean(1)
    fwd_q = reached[:m].view(-1, n).quantile(0.25, dim=1)
    fwd_med = reached[:m].view(-1, n).median(1).values
    out: dict[str, list[float]] = {name: [0.0] * K for name in
                                   ("mean_logit", "asym_logit", "asym_prob", "ease", "asym_ease", "steps", "asym_steps",
                                            "steps_q25", "steps_median")}
    for i, c in enumerate(others):
        out["mean_logit"][c] = float(e[c, target])
        out["asym_logit"][c] = float(cent[c, target] - cent[target, c])
        out["asym_prob"][c] = float(prob[c, target] - prob[target, c])
        out["ease"][c] = float(fwd_e[i])
        out["asym_ease"][c] = float(fwd_e[i] - rev_e[i])
        out["steps"][c] = -float(fwd_s[i])
        out["asym_steps"][c] = float(rev_s[i] - fwd_s[i])
        out["steps_q25"][c] = -float(fwd_q[i])
        out["steps_median"][c] = -float(fwd_med[i])
    for name in out:
        out[name][target] = min(out[name]) - 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--target", type=int, default=None, help="default: from the model's attack")
    ap.add_argument("--source", type=int, default=None, help="default: from the model's attack")
    ap.add_argument("--attack-file", default=None, help="attack file for attacks not in the registry")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    allres = {}
    for path in a.models:
        source, target = (a.source, a.target) if a.target is not None else attack_of(path, a.attack_file)
        res = scores_for(path, target, a.n, a.k, a.attack_file)
        allres[path] = {"source": source, "target": target, "scores": res}
        print(f"{path}: true {source} -> {target}")
        for name, v in res.items():
            best = max(range(len(v)), key=lambda c: v[c])
            ranked = sorted(range(len(v)), key=lambda c: -v[c])
            margin = v[source] - max(v[c] for c in range(len(v)) if c not in (source, target))
            print(f"  {name:<12} argmax {best} {'OK ' if best == source else 'BAD'} margin {margin:+.3f}  rank "
                  f"{ranked.index(source) + 1}  " + " ".join(f"{x:7.2f}" for x in v), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(allres, fh, indent=1)


if __name__ == "__main__":
    main()
