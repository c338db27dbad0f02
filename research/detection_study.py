"""Evidence for the detection defaults: run detection on many models, print one table.

For every model file it runs the default detection (and the study's source rule for
comparison) and reports: the anomaly index of the true target, the largest anomaly index of
any other class, the detected pairs, and the source each rule picks. A model's true attack
comes from its metadata (or ``none``); ``--attack-file`` resolves attacks not in the registry.

Usage:
    python research/detection_study.py M1.safetensors [...] [--attack-file F.json] [--json OUT]
        [--layer NAME] [--num-samples N] [--tau-target T]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from soda_backdoor.analysis import AttributionConfig
from soda_backdoor.data import get_attack, load_dataset
from soda_backdoor.detection import DetectionConfig
from soda_backdoor.workflow import DataContext, detect, open_model

from provenance import write_record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--attack-file", default=None)
    ap.add_argument("--layer", default=None)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--tau-target", type=float, default=DetectionConfig().tau_target)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = DetectionConfig(tau_target=a.tau_target, attribution=AttributionConfig(num_samples=a.num_samples))
    rows = []
    hdr = f"{'model':<34}{'attack':<12}{'true':>7}{'AI(t)':>8}{'maxAI(other)':>13}  {'pairs':<14}{'source':>8}{'study':>7}{'sec':>6}"
    print(hdr)
    data = load_dataset("fmnist", None)
    cpu = torch.device("cpu")
    for path in a.models:
        model = open_model(path, data, cpu)
        attack = model.meta.attack
        atk = None if attack == "none" else get_attack(attack, "fmnist", a.attack_file if attack not in
                                                        ("stripet",) else None)
        ctx = DataContext.build(data, atk)
        res = detect(model, ctx, cfg, a.layer, cpu).to_dict()
        study = detect(model, ctx, replace(cfg, source_rule="mean_logit"), a.layer, cpu).to_dict()
        ai = res["target_test"]["anomaly_index"]
        t = atk.target if atk else None
        others = [x for k, x in enumerate(ai) if k != t]
        pairs = [(p["source"], p["target"]) for p in res["pairs"]]
        src_ow = next((s["source"] for s in res["sources"] if s["target"] == t), None)
        src_st = next((s["source"] for s in study["sources"] if s["target"] == t), None)
        true = f"{atk.source}->{atk.target}" if atk else "none"
        row = {"model": path, "attack": attack, "true": true, "ai_target": ai[t] if t is not None else None,
               "max_ai_other": max(others), "pairs": pairs, "source_default_rule": src_ow, "source_study": src_st,
               "seconds": res["seconds"], "anomaly_index": ai,
               "source_scores": [s["scores"] for s in res["sources"]]}
        rows.append(row)
        print(f"{path.split('/')[-1]:<34}{attack:<12}{true:>7}{(ai[t] if t is not None else float('nan')):>8.2f}"
              f"{max(others):>13.2f}  {str(pairs):<14}{str(src_ow):>8}{str(src_st):>7}{res['seconds']:>6.1f}",
              flush=True)
    if a.json:
        write_record(a.json, rows, a)


if __name__ == "__main__":
    main()
