"""Feature samples behind an accuracy guard: remove more without paying it on natural confusions (issue 17).

docs/repair.md ("Infected samples reconstructed in feature space"): adding 100 feature samples
moved to softmax 0.99 removed 28 of 42 dev backdoors against 20 with the default, but cost
more than 2 points on every textured shirt (shirt -> coat, a natural confusion), so it was not
adopted. A defender can see that cost before keeping a repair: its own held-out clean data
says how much accuracy the repair took. The rule measured here: repair with the feature
samples; keep that repair when it loses at most ``G`` points on the guard half of the clean
test split, else fall back to the default repair. The decision sees only the guard half (the
even clean test samples); the loss reported is on the other half (the odd ones) and on the
whole split, so the choice is not graded on the samples it was made on. ASR is on the attack's
semantic test samples, which neither half contains and the guard never looks at.

For every backdoored model of each zoo, the full audit (detect -> reconstruct -> repair) runs
with the defaults and with the feature samples (``soda zoo repair``'s code, cached in the zoo's
``repairs/``), the repaired models are read back and predicted on the clean test split. ``G`` is
chosen on dev zoos; the record has the provenance, each model's row and the table per ``G``.

Usage:
    python research/feature_guard.py zoos/dev --jobs 2 --out research/results/feature_guard_dev.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

import torch

from provenance import write_record

from soda_backdoor.data import get_attack
from soda_backdoor.data.datasets import load_dataset
from soda_backdoor.training.train import predict
from soda_backdoor.workflow import open_model
from soda_backdoor.workflow.context import DataContext
from soda_backdoor.zoo.build import read_manifest
from soda_backdoor.zoo.repair import GOOD_ASR, repair_zoo

FEATURES = {"feature_samples": 100, "feature_threshold": 0.99}
GUARDS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def soda_tag(effective: dict) -> str:
    """The cache tag `repair_zoo` gives its soda results (and the repaired model files)."""
    return "soda-" + hashlib.sha256(json.dumps(effective, sort_keys=True).encode()).hexdigest()[:10]


def halves_loss(zoo: Path, rows: dict[str, dict], tags: dict[str, str], data) -> dict[str, dict]:
    """Per model and setting: accuracy loss (points) on the guard half, the report half, and all."""
    manifest = read_manifest(zoo)
    out = {}
    for key, by_setting in rows.items():
        entry = manifest[key]
        ctx = DataContext.build(data, get_attack(entry["attack"], data.spec.name, entry.get("attack_file") or None), 0)
        idx = ctx.splits.clean_test
        x, y = data.x_test[idx], data.y_test[idx]
        before = open_model(str(zoo / entry["file"]), data, torch.device("cpu"))
        preds = {"before": predict(before.module, x, before.meta.mean, before.meta.std)}
        for setting, row in by_setting.items():
            path = zoo / "repairs" / f"{key}-{tags[setting]}.safetensors"
            if row.get("repaired") and path.exists():
                m = open_model(str(path), data, torch.device("cpu"))
                preds[setting] = predict(m.module, x, m.meta.mean, m.meta.std)
            else:
                preds[setting] = preds["before"]
        ok = {s: (p == y).float() for s, p in preds.items()}
        out[key] = {s: {part: round(100 * (ok["before"][sl].mean() - ok[s][sl].mean()).item(), 3)
                        for part, sl in (("guard", slice(0, None, 2)), ("report", slice(1, None, 2)),
                                         ("all", slice(None)))}
                    for s in by_setting}
    return out


def pooled(rows: list[dict], part: str) -> dict:
    loss = [r[f"loss_{part}"] for r in rows]
    return {"n": len(rows), "removed": sum(r["asr_after"] <= GOOD_ASR for r in rows),
            "median_asr_after": statistics.median(r["asr_after"] for r in rows),
            "median_loss_pt": statistics.median(loss), "max_loss_pt": max(loss),
            "over_2pt": sum(v > 2.0 for v in loss), "features_kept": sum(r["setting"] == "features" for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    settings = {"default": {}, "features": FEATURES}
    per_model = []
    for zoo in map(Path, a.zoos):
        results = {s: repair_zoo(zoo, ("soda",), a.jobs, soda_config=cfg) for s, cfg in settings.items()}
        tags = {s: soda_tag(r["soda_config"]) for s, r in results.items()}
        rows: dict[str, dict] = {}
        for s, r in results.items():
            for row in r["rows"]:
                rows.setdefault(row["model"], {})[s] = row
        data = load_dataset(json.loads((zoo / "spec.json").read_text())["dataset"])
        losses = halves_loss(zoo, rows, tags, data)
        for key, by_setting in rows.items():
            base = by_setting["default"]
            per_model.append({"zoo": zoo.name, "model": key, "arch": base["arch"], "attack": base["attack"],
                              "source_blend": base["train"]["source_blend"], "pair": [base["source"], base["target"]],
                              "asr_before": base["asr_before"],
                              **{s: {"detected": r["detected"], "asr_after": r["asr_after"],
                                     "loss": losses[key][s], "repaired": r["repaired"]}
                                 for s, r in by_setting.items()}})
    table = []
    rules = [("default", None), ("features", None)] + [(f"guard {g}", g) for g in GUARDS]
    for zoo in sorted({m["zoo"] for m in per_model}):
        mine = [m for m in per_model if m["zoo"] == zoo]
        for name, g in rules:
            chosen = []
            for m in mine:
                s = name if g is None else ("features" if m["features"]["loss"]["guard"] <= g else "default")
                chosen.append({"setting": s, "asr_after": m[s]["asr_after"],
                               **{f"loss_{p}": m[s]["loss"][p] for p in ("guard", "report", "all")}})
            table.append({"zoo": zoo, "rule": name, "report_half": pooled(chosen, "report"),
                          "all": pooled(chosen, "all")})
    print(f"{'zoo':14} {'rule':10} {'removed':>9} {'features':>8} {'med/max loss (report half)':>27} "
          f"{'med/max loss (all)':>19} >2pt")
    for t in table:
        r, al = t["report_half"], t["all"]
        print(f"{t['zoo']:14} {t['rule']:10} {r['removed']:>4} of {r['n']:<2} {r['features_kept']:>8} "
              f"{r['median_loss_pt']:13.2f} / {r['max_loss_pt']:5.2f} pt {al['median_loss_pt']:8.2f} / "
              f"{al['max_loss_pt']:5.2f} pt {r['over_2pt']:>3}")
    write_record(a.out, {"table": table, "models": per_model, "features": FEATURES, "guards": GUARDS}, a)


if __name__ == "__main__":
    main()
