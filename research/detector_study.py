"""Compare model-level detection scores on zoos, from the evidence of zoo_features.py.

Each candidate turns a model's per-class evidence into per-class scores; the model-level
score is the maximum. Candidates with fitted parts (reference nulls, a logistic regression)
are fitted on the dev zoo only: on dev they are scored leave-one-model-out, on test they use
everything fitted on dev. Prints, per candidate and zoo: ROC-AUC, the rate of backdoored
models whose highest-scoring class is the true target, and the largest clean score against
the smallest backdoored one.

Usage: python research/detector_study.py DEV_ZOO [TEST_ZOO] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from soda_backdoor.detection.stats import mad_outliers
from soda_backdoor.zoo import label_rows, read_manifest
from soda_backdoor.zoo.build import read_jsonl


def load(zoo: str) -> list[dict]:
    root = Path(zoo)
    feats = read_jsonl(root / "features.jsonl")
    rows = [r for r in label_rows(list(read_manifest(root).values())) if r["role"] != "excluded" and r["key"] in feats]
    for r in rows:
        f = feats[r["key"]]
        r["f"] = {k: np.asarray(f[k], dtype=float) for k in ("s_w", "ai_w", "s_act", "ai_act", "logits", "dist")}
    return rows


def ai(v: np.ndarray) -> np.ndarray:
    return np.asarray(mad_outliers(torch.as_tensor(v, dtype=torch.double), 1.0).anomaly_index)


def asym_scores(f: dict) -> np.ndarray:
    """Per class k: the largest one-way asymmetry of any class c into k (close c -> k, far k -> c)."""
    d = np.maximum(f["dist"], 1e-6)
    k = len(d)
    return np.array([max(np.log(d[t, c] / d[c, t]) for c in range(k) if c != t) for t in range(k)])


def speed_scores(f: dict) -> np.ndarray:
    """Per class k: how much closer its closest class is than its typical one (log ratio)."""
    d = np.maximum(f["dist"], 1e-6)
    k = len(d)
    return np.array([np.log(np.median([d[c, t] for c in range(k) if c != t]) / min(d[c, t] for c in range(k) if c != t))
                     for t in range(k)])


BASE = {
    "ai_w (current)": lambda f: f["ai_w"],
    "ai_act": lambda f: f["ai_act"],
    "ai(asym)": lambda f: ai(asym_scores(f)),
    "ai(speed)": lambda f: ai(speed_scores(f)),
    "ai_w + ai(asym)": lambda f: f["ai_w"] + ai(asym_scores(f)),
    "ai_act + ai(asym)": lambda f: f["ai_act"] + ai(asym_scores(f)),
}


def class_features(f: dict) -> np.ndarray:
    """(K, d) per-class features for the fitted candidates."""
    return np.stack([f["ai_w"], f["ai_act"], ai(asym_scores(f)), ai(speed_scores(f))], 1)


def ref_null(rows: list[dict], arch: str, exclude: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-class mean and sd of the features over the clean reference models of an architecture."""
    ref = [class_features(r["f"]) for r in rows if r["role"] == "clean" and r["arch"] == arch and r["key"] != exclude]
    if len(ref) < 2:
        return None
    a = np.stack(ref)
    return a.mean(0), a.std(0) + 0.5


def with_null(r: dict, null) -> np.ndarray:
    x = class_features(r["f"])
    if null is None:
        return np.concatenate([x, np.zeros_like(x)], 1)
    return np.concatenate([x, (x - null[0]) / null[1]], 1)


def labels(r: dict, k: int) -> np.ndarray:
    y = np.zeros(k)
    if r["role"] == "backdoored":
        y[r["target"]] = 1
    return y


def fit(train: list[dict], nulls: dict, cols: list[int]) -> LogisticRegression:
    x = np.concatenate([with_null(r, nulls(r))[:, cols] for r in train])
    y = np.concatenate([labels(r, len(r["f"]["ai_w"])) for r in train])
    return LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(x, y)


FITTED = {"LR(ai_w, ai_act, asym, speed)": [0, 1, 2, 3], "LR(+ reference null)": list(range(8)),
          "LR(reference null only)": [4, 5, 6, 7], "LR(ai_w, asym)": [0, 2]}


def evaluate(name: str, rows: list[dict], scores: list[np.ndarray]) -> dict:
    y = [1 if r["role"] == "backdoored" else 0 for r in rows]
    top = [float(s.max()) for s in scores]
    bad = [(r, s) for r, s in zip(rows, scores) if r["role"] == "backdoored"]
    hit = [int(np.argmax(s)) == r["target"] for r, s in bad]
    clean_max = max(t for t, v in zip(top, y) if v == 0)
    bad_min = min(t for t, v in zip(top, y) if v == 1)
    by_arch = {}
    for arch in sorted({r["arch"] for r in rows}):
        ya = [v for r, v in zip(rows, y) if r["arch"] == arch]
        ta = [t for r, t in zip(rows, top) if r["arch"] == arch]
        by_arch[arch] = roc_auc_score(ya, ta) if 0 < sum(ya) < len(ya) else None
    return {"candidate": name, "auc": roc_auc_score(y, top) if 0 < sum(y) < len(y) else None, "auc_by_arch": by_arch,
            "top_is_target": sum(hit) / len(hit), "clean_max": clean_max, "backdoored_min": bad_min,
            "n_clean": len(y) - sum(y), "n_backdoored": sum(y)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dev")
    ap.add_argument("test", nargs="?")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = load(args.dev)
    zoos = {"dev": dev}
    if args.test:
        zoos["test"] = load(args.test)
    results = []
    for zname, rows in zoos.items():
        for name, fn in BASE.items():
            results.append({"zoo": zname, **evaluate(name, rows, [fn(r["f"]) for r in rows])})
        for name, cols in FITTED.items():
            scores = []
            for r in rows:
                if zname == "dev":  # leave this model out of the fit and of the reference null
                    train = [q for q in dev if q["key"] != r["key"]]
                    model = fit(train, lambda q, k=r["key"]: ref_null(dev, q["arch"], k if q["key"] != k else q["key"]),
                                cols)
                    null = ref_null(dev, r["arch"], r["key"])
                else:
                    model = fit(dev, lambda q: ref_null(dev, q["arch"], q["key"]), cols)
                    null = ref_null(dev, r["arch"], "")
                scores.append(model.predict_proba(with_null(r, null)[:, cols])[:, 1])
            results.append({"zoo": zname, **evaluate(name, rows, scores)})
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    archs = sorted({a for r in results for a in r["auc_by_arch"]})
    print(f"{'zoo':<6}{'candidate':<34}{'AUC':>7}" + "".join(f"{'AUC ' + a:>11}" for a in archs)
          + f"{'top=target':>12}{'clean max':>11}{'bd min':>9}{'n':>8}")
    for r in results:
        print(f"{r['zoo']:<6}{r['candidate']:<34}{fmt(r['auc']):>7}"
              + "".join(f"{fmt(r['auc_by_arch'].get(a)):>11}" for a in archs)
              + f"{r['top_is_target']:>12.3f}{r['clean_max']:>11.3f}{r['backdoored_min']:>9.3f}"
                f"{r['n_clean']:>4}/{r['n_backdoored']:<3}")
    if args.json:
        meta = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "torch": torch.__version__, "argv": sys.argv[1:]}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
