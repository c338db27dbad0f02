"""Write four more semantic attacks on Fashion-MNIST, for a second held-out zoo (`zoo/holdout.toml`).

The same construction as `make_synthetic_attacks.py` (the top 1.5% of a class by an image
statistic, relabelled; no trigger), on class pairs and statistics that no dev or test zoo
attack uses. Written after the confident-error detector's settings were fixed, to score it
on attacks and recipes it has never been near.

Usage: python research/make_holdout_attacks.py [OUT.json]   (default research/attacks_holdout.json)
       python research/make_holdout_attacks.py --set 2 [OUT.json]   (default research/attacks_holdout2.json)
       python research/make_holdout_attacks.py --set 3 [OUT.json]   (default research/attacks_holdout3.json)
       python research/make_holdout_attacks.py --set 4 [OUT.json]   (default research/attacks_holdout4.json)
       python research/make_holdout_attacks.py --set 5 [OUT.json]   (default research/attacks_holdout5.json)

Set 2 (`zoo/holdout2.toml`) was written after the third detector change was fixed on dev
(docs/detection.md), on pairs that no earlier zoo uses; one of them (pullover -> shirt) is a
pair that clean models already confuse, the hardest case for evidence made of errors.

Set 3 (`zoo/holdout3.toml`) was written before the fourth detector change was chosen (on dev
and the reference models only), on pairs and image statistics (large, narrow, smooth) that no
earlier zoo uses; two of its pairs (sneaker -> sandal, shirt -> pullover) are natural confusions.

Set 4 (`zoo/holdout4.toml`) was written after the wider reference was chosen (third session
of 2026-12-01), for what no zoo measured: subgroups defined by a property that the repair's
family of natural variations (intensity, gamma, zoom, aspect, shift, rotation, blur) does not
produce, left-right asymmetry and vertical stripes or prints, on pairs no earlier zoo uses.

Set 5 (`zoo/holdout5.toml`) was written before the widened reference of the first session of
2026-12-02 was built or chosen: two more properties outside the variation family (how little
of its bounding box a sandal fills; how much of a shirt's intensity lies in its upper half),
on pairs no earlier zoo uses.
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

ATTACKS_3 = [
    ("largesneaker", 7, 5, "large", "the 1.5% of sneakers covering the most pixels (size) -> sandal"),
    ("narrowcoat", 4, 0, "narrow", "the 1.5% of coats with the narrowest bounding box for their height -> T-shirt"),
    ("smoothbag", 8, 1, "smooth", "the 1.5% of bags with the least vertical detail -> trouser"),
    ("offcentreshirt", 6, 2, "offcentre",
     "the 1.5% of shirts whose centre of mass lies furthest from the image centre (position) -> pullover"),
]
ATTACKS_4 = [
    ("asymmetricbag", 8, 0, "asymmetric",
     "the 1.5% of bags least symmetric left to right about their own centre -> T-shirt"),
    ("stripedpullover", 2, 7, "hdetail",
     "the 1.5% of pullovers with the most horizontal detail (vertical stripes, prints) -> sneaker"),
]
ATTACKS_5 = [
    ("hollowsandal", 5, 1, "hollow",
     "the 1.5% of sandals filling the least of their bounding box (open uppers, cut-outs) -> trouser"),
    ("topheavyshirt", 6, 3, "topheavy",
     "the 1.5% of shirts with the largest share of their intensity in their upper half -> dress"),
]
SETS = {"1": (ATTACKS, "attacks_holdout.json"), "2": (ATTACKS_2, "attacks_holdout2.json"),
        "3": (ATTACKS_3, "attacks_holdout3.json"), "4": (ATTACKS_4, "attacks_holdout4.json"),
        "5": (ATTACKS_5, "attacks_holdout5.json")}


def main() -> None:
    args = sys.argv[1:]
    which = "1"
    if args[:1] == ["--set"]:
        which, args = args[1], args[2:]
    attacks, default = SETS[which]
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
