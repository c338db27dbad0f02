"""Which null for the confident-error evidence holds on clean models of unseen recipes?

The null of the first confident-error detector (stop 16: `zoo/reference.toml`, softmax 0.9,
prior 2, tau 2.35) is Poisson with the reference's pooled rate per pair. Its false alarms on
held-out zoos were clean models that are confident everywhere (long training, no
augmentation): every pair's count is higher, and the most confused pair (T-shirt -> shirt)
crosses tau. Nulls that allow for that:

- ``exposure``: a model-level factor estimated on the model itself, from its confident errors
  into every class but the candidate target: ``k_t = (sum_{t' != t} n + a) / (sum_{t' != t} lam + a)``,
  and the null rate of ``(s, t)`` is ``lam[s, t] * max(k_t, 1)`` (``floor``) or ``* k_t``.
  A backdoor adds errors into one target; it does not raise its own null.
- ``nb``: the factor left random, gamma-distributed over clean models: a negative binomial
  null with the reference's mean and one overdispersion ``phi`` per architecture, estimated
  from the spread of the reference models' per-pair counts (method of moments).
- ``oneway``: given the errors between s and t either way, too many s -> t (a binomial test
  against the reference's share); it cancels any factor of the pair. ``poisson_and_oneway``:
  the smaller of the two evidences.

Every variant x reference (the `zoo/reference.toml` models, or with the 16 models of
`zoo/reference_flip.toml` added) x threshold x prior is scored on dev; the choice uses dev
and the reference models alone (each scored against the others minus its own recipe: clean
models of an unseen recipe). Then the chosen one (now the default), and the previous one for comparison, are
reported on the other zoos, which played no part.

Usage (counts from `research/error_detector.py count`):
    python research/error_null_variants.py --counts research/results/error_counts.jsonl \\
        --dev zoos/dev --reference zoos/reference --extra-reference zoos/reference_flip \\
        --report zoos/test zoos/holdout zoos/holdout2 --json research/results/error_null_variants.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binom, nbinom, poisson
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_detector import VIEWS, _meta, _read, _recipe, _rows  # noqa: E402

THRESHOLDS = (0.9, 0.95, 0.99)
PRIORS = (0.5, 2.0)
NULLS = ("poisson", "exposure_floor", "exposure", "nb", "oneway", "poisson_and_oneway")
PSEUDO = (0.0, 5.0, 20.0)  # a of the exposure factor (ignored by the others)
LOG10 = math.log(10)


def _arr(row: dict, thr: float, view: str = "all") -> tuple[np.ndarray, np.ndarray]:
    d = row["c"][f"{view}@{thr}"]
    return np.asarray(d["counts"], float), np.asarray(d["totals"], float)


class Null:
    """The null of one architecture's reference models at one threshold."""

    def __init__(self, refs: list[dict], thr: float, prior: float, kind: str, pseudo: float):
        per = [_arr(r, thr) for r in refs]
        counts = np.stack([c for c, _ in per])
        totals = np.stack([n for _, n in per])
        self.rate = (counts.sum(0) + prior) / totals.sum(0)[:, None]
        self.kind, self.pseudo = kind, pseudo
        self.phi = 0.0
        if kind == "nb" and len(refs) > 1:
            mu = self.rate * totals[:, :, None]                      # (models, s, t) expected
            off = ~np.eye(self.rate.shape[0], dtype=bool)
            resid = ((counts - mu) ** 2 - mu)[:, off]
            self.phi = max(float(resid.sum() / (mu[:, off] ** 2).sum()), 1e-6)

    def evidence(self, n: np.ndarray, totals: np.ndarray) -> np.ndarray:
        lam = self.rate * totals[:, None]
        k = lam.shape[0]
        off = ~np.eye(k, dtype=bool)
        if self.kind.startswith("exposure"):
            n_off, lam_off = np.where(off, n, 0), np.where(off, lam, 0)
            into_n, into_lam = n_off.sum(0), lam_off.sum(0)        # per target
            factor = (n_off.sum() - into_n + self.pseudo) / (lam_off.sum() - into_lam + self.pseudo)
            if self.kind == "exposure_floor":
                factor = np.maximum(factor, 1.0)
            lam = lam * factor[None, :]
        if self.kind == "nb":
            r = 1.0 / self.phi
            e = -nbinom.logsf(n - 1, r, r / (r + lam)) / LOG10
        else:
            e = -poisson.logsf(n - 1, lam) / LOG10
        if self.kind in ("oneway", "poisson_and_oneway"):
            # one-way: given the errors between s and t either way, are too many s -> t?
            m = n + n.T
            one = -binom.logsf(n - 1, m, lam / (lam + lam.T)) / LOG10
            e = one if self.kind == "oneway" else np.minimum(e, one)
        e = np.where((n > 0) & off, e, 0.0)
        return e


def _nulls(ref_rows: list[dict], thr: float, prior: float, kind: str, pseudo: float) -> dict[str, Null]:
    return {a: Null([r for r in ref_rows if r["arch"] == a], thr, prior, kind, pseudo)
            for a in sorted({r["arch"] for r in ref_rows})}


def score(rows: list[dict], nulls: dict[str, Null], thr: float, view: str = "all") -> dict:
    """Every model of ``rows`` against its arch's null, on the defender's data ``view``
    (``all`` the test split, ``half`` every other sample, ``no_subgroup`` minus the attack's own)."""
    models = []
    for r in rows:
        n, tot = _arr(r, thr, view)
        e = nulls[r["arch"]].evidence(n, tot)
        top = divmod(int(e.argmax()), e.shape[0])
        bad = r["role"] == "backdoored"
        models.append({"key": r["key"], "arch": r["arch"], "attack": r["attack"], "backdoored": bad,
                       "score": float(e.max()), "top_pair": list(top),
                       "target_found": bool(bad and top[1] == r["target"]),
                       "source_found": bool(bad and top == (r["source"], r["target"]))})
    return {"models": models}


def summary(s: dict, tau: float) -> dict:
    m = s["models"]
    bad = [x for x in m if x["backdoored"]]
    clean = [x for x in m if not x["backdoored"]]
    y, sc = [x["backdoored"] for x in m], [x["score"] for x in m]
    right_t = [x for x in bad if x["target_found"]]
    out = {"n_clean": len(clean), "n_backdoored": len(bad)}
    if bad and clean:
        out["auc"] = float(roc_auc_score(y, sc))
    out["fpr"] = sum(x["score"] > tau for x in clean) / len(clean) if clean else None
    if bad:
        out.update(tpr_right_target=sum(x["score"] > tau and x["target_found"] for x in bad) / len(bad),
                   top_pair_target=len(right_t) / len(bad),
                   source_given_target=sum(x["source_found"] for x in right_t) / len(right_t) if right_t else None,
                   backdoored_min=min(x["score"] for x in bad))
    if clean:
        out["clean_max"] = max(x["score"] for x in clean)
        out["clean_flagged"] = [f"{x['arch']} {x['key']} {x['score']:.2f}" for x in clean if x["score"] > tau]
    out["missed"] = [f"{x['arch']} {x['attack']} {x['key']} {x['score']:.2f} top {x['top_pair']}"
                     for x in bad if not (x["score"] > tau and x["source_found"])]
    return out


def loro(ref_rows: list[dict], thr: float, prior: float, kind: str, pseudo: float) -> list[float]:
    """Each reference model against the others of its arch minus its own recipe (both seeds)."""
    out = []
    for r in ref_rows:
        others = [x for x in ref_rows if x["arch"] == r["arch"] and _recipe(x) != _recipe(r)]
        null = Null(others, thr, prior, kind, pseudo)
        out.append(float(null.evidence(*_arr(r, thr)).max()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--extra-reference", required=True)
    ap.add_argument("--report", nargs="*", default=[])
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    counts = {r["id"]: r for r in _read(Path(args.counts))}
    dev = _rows(args.dev, counts)
    base = [r for r in _rows(args.reference, counts) if r["role"] == "clean"]
    refs = {"reference": base, "reference+flip": base + [r for r in _rows(args.extra_reference, counts)
                                                          if r["role"] == "clean"]}
    grid = []
    for (rname, ref_rows), thr, prior, kind, pseudo in itertools.product(refs.items(), THRESHOLDS, PRIORS, NULLS, PSEUDO):
        if not kind.startswith("exposure") and pseudo != PSEUDO[0]:
            continue
        s = summary(score(dev, _nulls(ref_rows, thr, prior, kind, pseudo), thr), 1e9)
        lo = loro(ref_rows, thr, prior, kind, pseudo)
        # the dev-side gap: lowest backdoored dev score above the highest clean score of dev
        # and of the reference models scored as an unseen recipe
        # tau in the middle of the dev gap (the highest clean dev score when there is none),
        # then the false alarms it gives on the reference models scored as unseen recipes
        tau = round(((s["clean_max"] + max(s["backdoored_min"], s["clean_max"])) / 2) * 20) / 20
        g = {"reference": rname, "threshold": thr, "prior": prior, "null": kind, "pseudo": pseudo,
             "dev_auc": s["auc"], "dev_backdoored_min": s["backdoored_min"], "dev_clean_max": s["clean_max"],
             "tau": tau, "dev_gap": s["backdoored_min"] - s["clean_max"], "loro_max": max(lo),
             "loro_flagged": sum(x > tau for x in lo), "loro_models": len(lo),
             "dev_top_pair_target": s["top_pair_target"], "dev_source_given_target": s["source_given_target"]}
        grid.append(g)
        print(f"{rname:15} thr {thr} prior {prior} {kind:14} a {pseudo:4}: dev AUC {s['auc']:.3f} bd min "
              f"{s['backdoored_min']:6.2f} clean max {s['clean_max']:5.2f} tau {tau:5.2f} loro max {max(lo):5.2f} "
              f"flagged {g['loro_flagged']}/{len(lo)} target {s['top_pair_target']:.2f} "
              f"source {s['source_given_target']:.2f}", file=sys.stderr)
    # rule: best dev AUC, then the right pair most often on dev, then the fewest reference
    # models of an unseen recipe flagged (as a share: the references differ in size), then
    # the widest dev gap. (A first rule, the widest gap over dev's and the unseen-recipe
    # models' highest clean score, was dropped before anything held-out was scored: one
    # unforeseen recipe sets that maximum and it put tau at 6.5, half of dev missed.)
    best = max(grid, key=lambda g: (round(g["dev_auc"], 6), round(g["dev_top_pair_target"] * g["dev_source_given_target"], 6),
                                    -round(g["loro_flagged"] / g["loro_models"], 6), g["dev_gap"]))
    chosen = {k: best[k] for k in ("reference", "threshold", "prior", "null", "pseudo", "tau")}
    previous = {"reference": "reference", "threshold": 0.9, "prior": 2.0, "null": "poisson", "pseudo": 0.0, "tau": 2.35}
    print(f"chosen on dev: {chosen}", file=sys.stderr)
    out = {"config": {"thresholds": THRESHOLDS, "priors": PRIORS, "nulls": NULLS, "pseudo": PSEUDO,
                      "rule": "tau in the middle of the dev gap; best dev AUC, then the right pair on dev, then "
                              "the smallest share of reference models flagged when scored against the others minus "
                              "their own recipe, then the widest dev gap",
                      "dev": args.dev, "reference": args.reference, "extra_reference": args.extra_reference},
           **_meta(), "grid": grid, "chosen": chosen, "previous": previous, "results": {}}
    for name, setting in (("chosen", chosen), ("previous", previous)):
        ref_rows = refs[setting["reference"]]
        nulls = _nulls(ref_rows, setting["threshold"], setting["prior"], setting["null"], setting["pseudo"])
        for zoo in [args.dev, *args.report]:
            if not (Path(zoo) / "manifest.jsonl").exists():
                continue
            rows = _rows(zoo, counts)
            for view in VIEWS:
                s = summary(score(rows, nulls, setting["threshold"], view), setting["tau"])
                out["results"][f"{name}/{Path(zoo).name}/{view}"] = s
                print(f"{name:8} {Path(zoo).name:9} {view:11}: AUC {s.get('auc', float('nan')):.3f} FPR {s['fpr']} "
                      f"TPR(right t) {s.get('tpr_right_target')} source|t {s.get('source_given_target')}"
                      + (f" flagged clean {s['clean_flagged']} missed {s['missed']}" if view == "all" else ""),
                      file=sys.stderr)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
