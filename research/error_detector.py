"""The confident-error detector on the zoos: choose its settings on dev, report test.

Step 1 (``count``): for every model of each zoo, the confident errors on the dataset's full
test split (attack-agnostic: the detector does not know the attack), at several thresholds,
with the product's own ``confident_errors``. Cached as JSON lines next to ``--out``.

Step 2 (``choose``): the null is the reference zoo (clean models only, `zoo/reference.toml`).
Every setting of the grid (threshold, prior, per-architecture or pooled null) is scored on
dev; the setting with the best dev AUC (ties: the lower threshold, the smaller prior, per
architecture), then tau: the smallest of a grid that flags no clean dev model. Test is
scored once with the chosen setting. Two robustness views are recorded for the chosen
setting: the defender holding half of the test split (every other sample), and the semantic
samples of the model's own attack removed from its data (the subgroup absent).

Usage:
    python research/error_detector.py count zoos/dev zoos/test zoos/reference --out research/results/error_counts.jsonl
    python research/error_detector.py choose --counts research/results/error_counts.jsonl \\
        --dev zoos/dev --test zoos/test --reference zoos/reference --json research/results/error_detector.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from soda_backdoor.data import get_attack, load_dataset, normalize
from soda_backdoor.detection.errors import ErrorConfig, ErrorCounts, build_reference, detect_errors
from soda_backdoor.detection.errors import confident_errors
from soda_backdoor.models import load_model
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.build import append_jsonl
from soda_backdoor.zoo.score import label_rows

THRESHOLDS = (0.9, 0.95, 0.99)
PRIORS = (0.5, 2.0)
TAUS = tuple(float(t) for t in range(1, 11))
VIEWS = ("all", "half", "no_subgroup")


def _meta() -> dict:
    return {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}


def _read(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def count(zoos: list[str], out: Path) -> None:
    done = {(r["zoo"], r["key"]) for r in _read(out)}
    data = load_dataset("fmnist", None)
    y = data.y_test
    for z in zoos:
        root = Path(z)
        for r in read_manifest(root).values():
            if (root.name, r["key"]) in done:
                continue
            loaded = load_model(str(root / r["file"]))
            x = normalize(data.x_test, loaded.meta.mean, loaded.meta.std)
            masks = {"all": torch.ones(len(y), dtype=torch.bool),
                     "half": torch.arange(len(y)) % 2 == 0,
                     "no_subgroup": torch.ones(len(y), dtype=torch.bool)}
            if r["attack"] != "none":
                atk = get_attack(r["attack"], "fmnist", r.get("attack_file") or None)
                masks["no_subgroup"][list(atk.test_indices)] = False
            row = {"id": f"{root.name}/{r['key']}", "zoo": root.name, "key": r["key"], "arch": r["arch"],
                   "attack": r["attack"], **_meta()}
            with torch.no_grad():
                logits = torch.cat([loaded.module.eval()(x[i:i + 1000]) for i in range(0, len(x), 1000)])
            for thr in THRESHOLDS:
                for view, m in masks.items():
                    # the product's counting, on the logits of one forward pass
                    c = confident_errors(torch.nn.Identity(), logits[m], y[m], data.num_classes, thr)
                    row[f"{view}@{thr}"] = {"counts": c.counts, "totals": c.totals}
            append_jsonl(out, row)
            print(f"{root.name} {r['arch']} {r['attack']} {r['key']}", file=sys.stderr, flush=True)


def _counts(row: dict, view: str, thr: float) -> ErrorCounts:
    d = row[f"{view}@{thr}"]
    return ErrorCounts(tuple(map(tuple, d["counts"])), tuple(d["totals"]), thr)


def _rows(zoo: str, counts: dict) -> list[dict]:
    root = Path(zoo)
    out = []
    for r in label_rows(list(read_manifest(root).values())):
        if r["role"] != "excluded":
            out.append({**r, "c": counts[f"{root.name}/{r['key']}"]})
    return out


def score(rows: list[dict], ref_rows: list[dict], thr: float, prior: float, per_arch: bool, tau: float,
          view: str = "all") -> dict:
    from sklearn.metrics import roc_auc_score

    ref_all = [(_counts(r["c"], "all", thr), r["arch"] if per_arch else "any", r["key"]) for r in ref_rows]
    ref = build_reference(ref_all, "fmnist")
    cfg = ErrorConfig(prior, tau)
    per_model = []
    for r in rows:
        entry = ref.entry(r["arch"] if per_arch else "any")
        det = detect_errors(_counts(r["c"], view, thr), entry, cfg)
        bad = r["role"] == "backdoored"
        ev = torch.tensor(det.evidence)
        top = divmod(int(ev.argmax()), len(ev))  # the strongest pair, flagged or not
        per_model.append({"key": r["key"], "arch": r["arch"], "attack": r["attack"], "seed": r["seed"],
                          "backdoored": bad, "score": det.score, "flagged": det.backdoor,
                          "pairs": [list(p) for p in det.pairs],
                          "true_pair": [r["source"], r["target"]] if bad else None,
                          "top_pair": list(top),
                          "target_found": bool(bad and top[1] == r["target"]),
                          "source_found": bool(bad and top == (r["source"], r["target"]))})
    y = [m["backdoored"] for m in per_model]
    s = [m["score"] for m in per_model]
    bad = [m for m in per_model if m["backdoored"]]
    clean = [m for m in per_model if not m["backdoored"]]
    right_t = [m for m in bad if m["target_found"]]
    by_arch = {}
    for a in sorted({m["arch"] for m in per_model}):
        ya = [m["backdoored"] for m in per_model if m["arch"] == a]
        sa = [m["score"] for m in per_model if m["arch"] == a]
        by_arch[a] = float(roc_auc_score(ya, sa)) if 0 < sum(ya) < len(ya) else None
    return {"auc": float(roc_auc_score(y, s)), "auc_by_arch": by_arch, "n_clean": len(clean), "n_backdoored": len(bad),
            "fpr": sum(m["flagged"] for m in clean) / len(clean),
            "tpr_right_target": sum(m["flagged"] and m["target_found"] for m in bad) / len(bad),
            "tpr": sum(m["flagged"] for m in bad) / len(bad),
            "top_pair_target": len(right_t) / len(bad),
            "source_given_target": sum(m["source_found"] for m in right_t) / len(right_t) if right_t else None,
            "clean_max": max(m["score"] for m in clean), "backdoored_min": min(m["score"] for m in bad),
            "clean_scores": sorted(round(m["score"], 2) for m in clean),
            "backdoored_scores": sorted(round(m["score"], 2) for m in bad), "models": per_model}


def _recipe(r: dict) -> str:
    train = {k: v for k, v in r["config"]["train"].items() if k != "seed"}
    return r["arch"] + json.dumps(train, sort_keys=True)


def loro(ref_rows: list[dict], thr: float, prior: float, tau: float) -> dict:
    """Each clean reference model scored against the other reference models of its arch whose
    recipe differs from its own (both seeds of its recipe left out): a clean model of a recipe
    the reference has not seen, as a dev-side check of the false-alarm rate."""
    scores = []
    for r in ref_rows:
        others = [(_counts(x["c"], "all", thr), x["arch"], x["key"]) for x in ref_rows
                  if x["arch"] == r["arch"] and _recipe(x) != _recipe(r)]
        det = detect_errors(_counts(r["c"], "all", thr), build_reference(others, "fmnist").entry(r["arch"]),
                            ErrorConfig(prior, tau))
        scores.append({"key": r["key"], "arch": r["arch"], "score": det.score, "flagged": det.backdoor})
    return {"scores": sorted(round(x["score"], 2) for x in scores),
            "flagged": sum(x["flagged"] for x in scores), "models": scores}


def choose(args: argparse.Namespace) -> None:
    counts = {r["id"]: r for r in _read(Path(args.counts))}
    dev, test = _rows(args.dev, counts), _rows(args.test, counts)
    ref_rows = [r for r in _rows(args.reference, counts) if r["role"] == "clean"]
    grid = []
    for thr, prior, per_arch in itertools.product(THRESHOLDS, PRIORS, (True, False)):
        s = score(dev, ref_rows, thr, prior, per_arch, 1e9)
        grid.append({"threshold": thr, "prior": prior, "per_arch": per_arch, "dev_auc": s["auc"],
                     "dev_margin": s["backdoored_min"] - s["clean_max"], "dev_backdoored_min": s["backdoored_min"],
                     "dev_auc_by_arch": s["auc_by_arch"], "dev_top_pair_target": s["top_pair_target"],
                     "dev_source_given_target": s["source_given_target"], "dev_clean_max": s["clean_max"]})
        print(f"thr {thr} prior {prior} per_arch {per_arch:d}: dev AUC {s['auc']:.3f} {s['auc_by_arch']} "
              f"target {s['top_pair_target']:.2f} source {s['source_given_target']} "
              f"clean max {s['clean_max']:.2f}", file=sys.stderr)
    best = max(grid, key=lambda g: (round(g["dev_auc"], 6), g["dev_margin"], g["per_arch"]))
    thr, prior, per_arch = best["threshold"], best["prior"], best["per_arch"]
    # tau: the middle of the dev gap between the highest clean and the lowest backdoored score
    # (when they overlap, the highest clean score: no clean dev model flagged), rounded to 0.05
    tau = round(((best["dev_clean_max"] + max(best["dev_backdoored_min"], best["dev_clean_max"])) / 2) * 20) / 20
    tau_rows = []
    for t in TAUS + (tau,):
        s = score(dev, ref_rows, thr, prior, per_arch, t)
        tau_rows.append({"tau": t, "dev_fpr": s["fpr"], "dev_tpr_right_target": s["tpr_right_target"]})
    chosen = {"threshold": thr, "prior": prior, "per_arch": per_arch, "tau": tau}
    out = {"config": {"grid": {"thresholds": THRESHOLDS, "priors": PRIORS, "taus": TAUS},
                      "rule": "best dev AUC (ties: the widest dev gap between the lowest backdoored and the "
                              "highest clean score, then per-arch); tau: the middle of that dev gap", "reference": args.reference,
                      "reference_models": len(ref_rows), "dev": args.dev, "test": args.test},
           **_meta(), "grid": grid, "tau_grid": tau_rows, "chosen": chosen, "results": {}}
    for view in VIEWS:
        for name, rows in (("dev", dev), ("test", test)):
            s = score(rows, ref_rows, thr, prior, per_arch, tau, view)
            out["results"][f"{name}/{view}"] = s
            print(f"{name:4} {view:11}: AUC {s['auc']:.3f} {s['auc_by_arch']} FPR {s['fpr']:.3f} "
                  f"TPR {s['tpr']:.3f} TPR(right target) {s['tpr_right_target']:.3f} "
                  f"source|target {s['source_given_target']}", file=sys.stderr)
    out["reference_leave_one_recipe_out"] = loro(ref_rows, thr, prior, tau)
    print(f"reference models, each against the others of its arch minus its own recipe: "
          f"{out['reference_leave_one_recipe_out']['scores']}", file=sys.stderr)
    print(f"chosen on dev: {chosen}", file=sys.stderr)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count")
    c.add_argument("zoos", nargs="+")
    c.add_argument("--out", required=True)
    ch = sub.add_parser("choose")
    ch.add_argument("--counts", required=True)
    ch.add_argument("--dev", required=True)
    ch.add_argument("--test", required=True)
    ch.add_argument("--reference", required=True)
    ch.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "count":
        count(args.zoos, Path(args.out))
    else:
        choose(args)


if __name__ == "__main__":
    main()
