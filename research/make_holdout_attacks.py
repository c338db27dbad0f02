"""Write four more semantic attacks on Fashion-MNIST, for a second held-out zoo (`zoo/holdout.toml`).

The same construction as `make_synthetic_attacks.py` (the top 1.5% of a class by an image
statistic, relabelled; no trigger), on class pairs and statistics that no dev or test zoo
attack uses. Written after the confident-error detector's settings were fixed, to score it
on attacks and recipes it has never been near.

Usage: python research/make_holdout_attacks.py [OUT.json]   (default research/attacks_holdout.json)
       python research/make_holdout_attacks.py --set 2 [OUT.json]   (default research/attacks_holdout2.json)

Set 2 (`zoo/holdout2.toml`) was written after the third detector change was fixed on dev
(docs/detection.md), on pairs that no earlier zoo uses; one of them (pullover -> shirt) is a
pair that clean models already confuse, the hardest case for evidence made of errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from make_synthetic_attacks import subgroup
from soda_backdoor.data import load_dataset

ATTACKS = [
    ("brightpullover", 2, 0, "bright", "the brightest 1.5% of pullovers -> T-shirt"),
    ("smallboot", 9, 5, "small", "the 1.5% of ankle boots covering the fewest pixels (size) -> sandal"),
    ("darkcoat", 4, 8, "dark", "the darkest 1.5% of coats -> bag"),
    ("texturedtshirt", 0, 3, "textured", "the 1.5% of T-shirts with the most vertical detail -> dress"),
]
ATTACKS_2 = [
    ("darkpullover", 2, 6, "dark", "the darkest 1.5% of pullovers -> shirt"),
    ("widesandal", 5, 9, "wide", "the 1.5% of sandals with the widest bounding box for their height -> ankle boot"),
    ("smalldress", 3, 1, "small", "the 1.5% of dresses covering the fewest pixels (size) -> trouser"),
    ("brightshirt", 6, 8, "bright", "the brightest 1.5% of shirts -> bag"),
]


def main() -> None:
    args = sys.argv[1:]
    second = args[:2] == ["--set", "2"]
    args = args[2:] if second else args
    attacks = ATTACKS_2 if second else ATTACKS
    default = "attacks_holdout2.json" if second else "attacks_holdout.json"
    out = Path(args[0]) if args else Path(__file__).resolve().parent / default
    data = load_dataset("fmnist")
    entries = [{"dataset": "FMNIST", "attack": name, "description": desc, "source_class": src, "target_class": tgt,
                "train_indices": subgroup(data.x_train, data.y_train, src, stat),
                "test_indices": subgroup(data.x_test, data.y_test, src, stat)} for name, src, tgt, stat, desc in attacks]
    out.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    for e in entries:
        print(e["attack"], e["source_class"], "->", e["target_class"], len(e["train_indices"]), len(e["test_indices"]))


if __name__ == "__main__":
    main()
