"""Nulls for the confident-error evidence that span training recipes (stop 18 study).

The third detector's null (`detection/errors.py`: the reference's pooled Poisson rate per
pair, times a model-level confidence factor) held on dev and on the zoos seen while it was
built, and broke on the held-out `zoo/holdout2.toml` (AUC 0.835, 2 of 11 clean models flagged
at evidence 10): a recipe the reference has not seen confuses *other* pairs, or one pair far
more, and one factor per model does not describe that (docs/detection.md). Two changes are
measured here, alone and together:

1. **A reference that samples the recipe space.** `zoo/reference_wide.toml`
   (`research/make_wide_reference.py`): 20 clean models, each on its own recipe drawn at
   random over every training setting. References: ``R32`` (the shipped 32 models: the dev
   recipes on other seeds), ``W20`` (the wide one), ``R32+W20``.
2. **Nulls that let the pair rates vary with the recipe:**
   - ``pooled``: the shipped null (pooled Poisson rate x the confidence factor, ``a`` = 20).
   - ``nbpair``: the same mean, but each pair's count is negative binomial with its own
     overdispersion ``phi_st``, estimated from the spread of that pair's counts over the
     reference models (method of moments, shrunk toward the pair-pooled value with weight
     ``SHRINK`` models): a pair whose count varies with the recipe gets a wider null.
   - ``mixture``: the null of pair ``(s, t)`` is a mixture over the reference models ``j``
     of Poissons with ``j``'s own (smoothed) rate, weighted by how well ``j`` explains the
     model's confident errors into every class *but* ``t`` (Poisson likelihood, tempered by
     ``beta``): which reference recipe the model resembles is judged on the errors a
     backdoor into ``t`` does not touch. A model of a recipe like no reference model falls
     back toward the whole spread. ``mixture+k`` also applies the confidence factor.

Choice, declared before `zoo/holdout3.toml` (built alongside, with four new attacks and new
recipes) is scored: each setting is scored on dev's backdoored and clean models and on every
reference model scored against the others minus its own recipe (a clean model of an unseen
recipe: ``loro``). Rank by the AUC of dev backdoored vs (dev clean + loro clean), then the
right pair on dev, then the gap; tau = the middle of the gap between the highest clean score
(dev and loro) and the lowest dev backdoored one, or, when they overlap, the value that
flags no more than 1 in 40 of the clean ones (the 97.5% quantile). Then the chosen setting
and the previous default (stop 17: ``R32``, pooled, tau 2.45) are reported on test, holdout,
holdout2 (all seen earlier) and holdout3; the previous one also on the wide reference's
models (clean models of random recipes it has never seen).

Usage:
    python research/recipe_nulls.py --wide frozen:reference_wide --report frozen:reference_wide \\
        frozen:test frozen:holdout frozen:holdout2 frozen:holdout3 --json research/results/recipe_nulls.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy.special import logsumexp
from scipy.stats import nbinom, poisson
from sklearn.metrics import roc_auc_score

from soda_backdoor.detection.errors import pair_dispersion  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_detector import VIEWS, _meta, _read, _recipe  # noqa: E402
from error_null_variants import _arr  # noqa: E402
from error_null_variants import score as score_models  # noqa: E402
from frozen_zoo import zoo_name, zoo_rows  # noqa: E402

LOG10 = math.log(10)
SHRINK = 8.0
EXPOSURE = 20.0


def _factor(n: np.ndarray, lam: np.ndarray) -> np.ndarray:
    off = ~np.eye(len(n), dtype=bool)
    n_off, lam_off = np.where(off, n, 0.0), np.where(off, lam, 0.0)
    k = (n_off.sum() - n_off.sum(0) + EXPOSURE) / (lam_off.sum() - lam_off.sum(0) + EXPOSURE)
    return np.maximum(k, 1.0)


def mixture_evidence(n: np.ndarray, totals: np.ndarray, own: np.ndarray, rate: np.ndarray, beta: float,
                     alpha: float, exposure: float | None) -> np.ndarray:
    """The evidence under the mixture null (module docstring).

    Reference model ``j``'s rate of pair ``(s, t)`` is its own (``own``, ``(J, k, k)``), smoothed
    toward the pooled ``rate`` with the weight of ``alpha`` models. For target ``t``, model ``j``
    gets the weight ``w_jt ∝ exp(beta * log L_j)``, ``L_j`` the Poisson likelihood of the model's
    confident errors into every class but ``t`` under ``j``'s rates. The null of ``n[s, t]`` is
    ``sum_j w_jt Poisson(mu_j[s, t] * k_t)``, ``k_t`` the confidence factor against the
    mixture's expectation (when ``exposure`` is set).
    """
    k = len(n)
    off = ~np.eye(k, dtype=bool)
    mus = (own + alpha * rate[None]) / (1.0 + alpha) * totals[None, :, None]      # (J, k, k)
    cell = np.where(off[None], n[None] * np.log(mus) - mus, 0.0)
    logw = beta * (cell.sum((1, 2))[:, None] - cell.sum(1))                       # (J, t): all but column t
    logw -= logsumexp(logw, axis=0, keepdims=True)
    if exposure is not None:
        mus_off = np.where(off[None], mus, 0.0)
        expect = np.exp(logw) * (mus_off.sum((1, 2))[:, None] - mus_off.sum(1))   # (J, t)
        n_off = np.where(off, n, 0.0)
        factor = (n_off.sum() - n_off.sum(0) + exposure) / (expect.sum(0) + exposure)
        mus = mus * np.maximum(factor, 1.0)[None, None, :]
    lsf = poisson.logsf(n[None] - 1, mus)                                         # (J, k, k)
    return -logsumexp(logw[:, None, :] + lsf, axis=0) / LOG10


class Null:
    """The null of one architecture's reference models at one threshold."""

    def __init__(self, refs: list[dict], thr: float, kind: str, prior: float = 0.5, beta: float = 1.0,
                 alpha: float = 1.0, factor: bool = True):
        per = [_arr(r, thr) for r in refs]
        self.counts = np.stack([c for c, _ in per])                 # (J, k, k)
        self.totals = np.stack([n for _, n in per])                 # (J, k)
        self.kind, self.beta, self.alpha, self.factor = kind, beta, alpha, factor
        self.rate = (self.counts.sum(0) + prior) / self.totals.sum(0)[:, None]
        k = self.rate.shape[0]
        self.off = ~np.eye(k, dtype=bool)
        if kind == "nbpair":  # the product's estimate (detection/errors.py)
            self.phi = pair_dispersion(SimpleNamespace(model_counts=self.counts, model_totals=self.totals),
                                       self.rate, SHRINK)
        if kind == "mixture":
            self.own = self.counts / np.maximum(self.totals, 1)[:, :, None]   # each model's own rates

    def evidence(self, n: np.ndarray, totals: np.ndarray) -> np.ndarray:
        k = n.shape[0]
        lam = self.rate * totals[:, None]
        if self.kind == "pooled":
            lam = lam * _factor(n, lam)[None, :]
            e = -poisson.logsf(n - 1, lam) / LOG10
        elif self.kind == "nbpair":
            if self.factor:
                lam = lam * _factor(n, lam)[None, :]
            r = 1.0 / self.phi
            e = -nbinom.logsf(n - 1, r, r / (r + lam)) / LOG10
        else:  # mixture
            e = mixture_evidence(n, totals, self.own, self.rate, self.beta, self.alpha,
                                 EXPOSURE if self.factor else None)
        return np.where((n > 0) & self.off, e, 0.0)


SETTINGS = ([("pooled", {})]
            + [("nbpair", {"factor": f}) for f in (True, False)]
            + [("mixture", {"beta": b, "alpha": a, "factor": f})
               for b, a, f in itertools.product((0.1, 0.3, 1.0), (0.5, 2.0), (False, True))])


def _nulls(refs: list[dict], thr: float, kind: str, opts: dict) -> dict[str, Null]:
    return {a: Null([r for r in refs if r["arch"] == a], thr, kind, **opts) for a in sorted({r["arch"] for r in refs})}


def score(rows: list[dict], nulls: dict[str, Null], thr: float, view: str = "all") -> list[dict]:
    """Every model of ``rows`` against its arch's null (the second round's scoring)."""
    return score_models(rows, nulls, thr, view)["models"]


def loro(refs: list[dict], thr: float, kind: str, opts: dict) -> list[dict]:
    """Each reference model against the others of its arch minus its own recipe."""
    out = []
    for r in refs:
        others = [x for x in refs if x["arch"] == r["arch"] and _recipe(x) != _recipe(r)]
        e = Null(others, thr, kind, **opts).evidence(*_arr(r, thr))
        out.append({"key": r["key"], "arch": r["arch"], "zoo": r.get("zoo", ""), "backdoored": False,
                    "score": float(e.max()), "top_pair": list(divmod(int(e.argmax()), e.shape[0]))})
    return out


def choose_tau(clean: list[float], bad: list[float]) -> float:
    hi, lo = max(clean), min(bad)
    if lo > hi:
        return round((hi + lo) / 2, 2)
    return round(float(np.quantile(clean, 0.975)), 2)


def summary(models: list[dict], tau: float) -> dict:
    bad = [x for x in models if x["backdoored"]]
    clean = [x for x in models if not x["backdoored"]]
    out = {"n_clean": len(clean), "n_backdoored": len(bad)}
    if bad and clean:
        out["auc"] = float(roc_auc_score([x["backdoored"] for x in models], [x["score"] for x in models]))
    if clean:
        out["fpr"] = sum(x["score"] > tau for x in clean) / len(clean)
        out["clean_max"] = max(x["score"] for x in clean)
        out["clean_flagged"] = [f"{x['arch']} {x['key']} {x['score']:.2f} {x['top_pair']}" for x in clean
                                if x["score"] > tau]
    if bad:
        right_t = [x for x in bad if x["target_found"]]
        out.update(tpr_right_target=sum(x["score"] > tau and x["target_found"] for x in bad) / len(bad),
                   top_pair_target=len(right_t) / len(bad),
                   source_given_target=sum(x["source_found"] for x in right_t) / len(right_t) if right_t else None,
                   backdoored_min=min(x["score"] for x in bad),
                   missed=[f"{x['arch']} {x['attack']} {x['key']} {x['score']:.2f} top {x['top_pair']}"
                           for x in bad if not (x["score"] > tau and x["source_found"])])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="research/results/error_counts.jsonl")
    ap.add_argument("--dev", default="frozen:dev")
    ap.add_argument("--reference", nargs="+", default=["frozen:reference", "frozen:reference_flip"])
    ap.add_argument("--wide", nargs="*", default=["/work/zoos/reference_wide"])
    ap.add_argument("--report", nargs="*", default=[])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.95])
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    counts = {r["id"]: r for r in _read(Path(args.counts))}
    dev = zoo_rows(args.dev, counts)

    def clean(zoos):
        return [dict(r, zoo=zoo_name(z)) for z in zoos for r in zoo_rows(z, counts) if r["role"] == "clean"]

    r32, w40 = clean(args.reference), clean(args.wide)
    refs = {"R32": r32}
    if w40:
        refs.update({"W20": w40, "R32+W20": r32 + w40})
    grid = []
    for (rname, ref), thr, (kind, opts) in itertools.product(refs.items(), args.thresholds, SETTINGS):
        models = score(dev, _nulls(ref, thr, kind, opts), thr)
        lo = loro(ref, thr, kind, opts)
        d_clean = [x["score"] for x in models if not x["backdoored"]]
        d_bad = [x["score"] for x in models if x["backdoored"]]
        allclean = d_clean + [x["score"] for x in lo]
        tau = choose_tau(allclean, d_bad)
        s = summary(models + lo, tau)
        sd = summary(models, tau)
        by_zoo = {z: sum(x["score"] > tau for x in lo if x["zoo"] == z) for z in sorted({x["zoo"] for x in lo})}
        g = {"reference": rname, "threshold": thr, "null": kind, **opts, "tau": tau,
             "auc_dev_loro": s["auc"], "auc_dev": sd["auc"], "fpr_loro": sum(x > tau for x in allclean[len(d_clean):]) / len(lo),
             "fpr_dev": sd["fpr"], "tpr_dev": sd["tpr_right_target"], "dev_top_pair_target": sd["top_pair_target"],
             "dev_source_given_target": sd["source_given_target"], "gap": min(d_bad) - max(allclean),
             "loro_max": max(x["score"] for x in lo), "loro_flagged_by_zoo": by_zoo}
        grid.append(g)
        print(f"{rname:8} {thr} {kind:8} {json.dumps(opts):42} tau {tau:6.2f} AUC dev+loro {s['auc']:.3f} dev "
              f"{sd['auc']:.3f} FPR loro {g['fpr_loro']:.3f} dev {sd['fpr']:.3f} TPR {sd['tpr_right_target']:.2f} "
              f"pair {sd['top_pair_target']:.2f}/{sd['source_given_target']:.2f} gap {g['gap']:6.2f} loro max "
              f"{g['loro_max']:6.2f} {by_zoo}", file=sys.stderr, flush=True)
    best = max(grid, key=lambda g: (round(g["auc_dev_loro"], 6),
                                    round(g["dev_top_pair_target"] * (g["dev_source_given_target"] or 0), 6), g["gap"]))
    keys = ("reference", "threshold", "null", "beta", "alpha", "factor", "tau")
    chosen = {k: best[k] for k in keys if k in best}
    previous = {"reference": "R32", "threshold": 0.95, "null": "pooled", "tau": 2.45}  # stop 17's default
    print(f"chosen: {chosen}", file=sys.stderr)
    out = {"config": {"settings": SETTINGS, "thresholds": args.thresholds, "shrink": SHRINK, "exposure": EXPOSURE,
                      "dev": args.dev, "reference": args.reference, "wide": args.wide,
                      "rule": "rank by AUC of dev backdoored vs dev clean + reference models scored against the "
                              "others minus their own recipe (loro), then the right pair on dev, then the gap; tau "
                              "mid-gap, or the 97.5% quantile of those clean scores when they overlap"},
           **_meta(), "grid": grid, "chosen": chosen, "previous": previous, "results": {}}
    in_reference = {zoo_name(z) for z in args.reference + args.wide}
    for name, setting in (("chosen", chosen), ("previous", previous)):
        opts = {k: setting[k] for k in ("beta", "alpha", "factor") if k in setting}
        nulls = _nulls(refs[setting["reference"]], setting["threshold"], setting["null"], opts)
        for zoo in [args.dev, *args.report]:
            if zoo_name(zoo) in in_reference and setting["reference"] != "R32":
                continue  # its models are in this setting's reference: no test of it
            rows = zoo_rows(zoo, counts)
            for view in VIEWS:
                s = summary(score(rows, nulls, setting["threshold"], view), setting["tau"])
                out["results"][f"{name}/{zoo_name(zoo)}/{view}"] = s
                if view == "all":
                    print(f"{name:8} {zoo_name(zoo):9}: AUC {s.get('auc', float('nan')):.3f} FPR {s['fpr']:.3f} "
                          f"TPR(right t) {s.get('tpr_right_target')} source|t {s.get('source_given_target')} "
                          f"flagged clean {s['clean_flagged']} missed {s.get('missed')}", file=sys.stderr)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
