"""The zoos' models as research rows without the model files: from records kept in the repo.

A zoo build takes 15-65 minutes on the 2-core CPU and its files are not committed. What the
null-model research needs of a model is small and is committed: its confident-error counts
(`research/results/error_counts.jsonl`, written by `research/error_detector.py count` from the
built files), its recipe (the zoo spec under `zoo/`, whose entries hash to the same keys), and
whether it counts as backdoored (the full-audit record of `soda zoo repair`,
`research/results/zoo_repair_audit_errors_<zoo>.json`, holds every backdoored model that
`soda zoo score` kept: ASR >= 0.5 and accuracy within 2 points of its twin; the others were
excluded). A clean model with no confident error at all is the one that diverged (holdout2's
`lenet`, accuracy 0.10, docs/zoo.md) and is excluded as `soda zoo score` does.

``zoo_rows(arg, counts)`` takes a built zoo folder (with its manifest) or ``frozen:<name>``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from soda_backdoor.data import get_attack
from soda_backdoor.zoo.spec import load_zoo_spec, with_twins

ROOT = Path(__file__).resolve().parents[1]


def frozen_rows(name: str, counts: dict) -> list[dict]:
    spec = load_zoo_spec(ROOT / "zoo" / f"{name}.toml")
    audit_path = ROOT / "research" / "results" / f"zoo_repair_audit_errors_{name}.json"
    kept = {r["model"] for r in json.loads(audit_path.read_text())["rows"]} if audit_path.exists() else set()
    out = []
    for e in with_twins(spec.entries):
        c = counts.get(f"{name}/{e.key}")
        if c is None:
            raise KeyError(f"no counts for {name}/{e.key} ({e.arch} {e.attack} seed {e.train.seed})")
        row = {"key": e.key, "arch": e.arch, "attack": e.attack, "config": {"train": asdict(e.train)}, "c": c}
        if e.clean:
            row["role"] = "clean" if np.asarray(c["all@0.9"]["counts"]).sum() > 0 else "excluded"
        else:
            atk = get_attack(e.attack, spec.dataset, e.attack_file or None)
            row.update(source=atk.source, target=atk.target,
                       role="backdoored" if e.key in kept else "excluded")
        out.append(row)
    return [r for r in out if r["role"] != "excluded"]


def zoo_rows(arg: str, counts: dict) -> list[dict]:
    if arg.startswith("frozen:"):
        return frozen_rows(arg.split(":", 1)[1], counts)
    from error_detector import _rows
    return _rows(arg, counts)


def zoo_name(arg: str) -> str:
    return arg.split(":", 1)[1] if arg.startswith("frozen:") else Path(arg).name
