"""Write semantic attacks on Fashion-MNIST that the method was never tuned on.

Each attack relabels a rare natural subgroup of one class, chosen by a pixel statistic (no
trigger is added): the darkest, brightest or most textured ~1.5% of the class, in train and
test alike.
The output has the schema of semantic_attacks.json and works with ``--attack-file``.

Usage: python research/make_synthetic_attacks.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

from soda_backdoor.data import load_dataset

# (name, source, target, statistic, description)
ATTACKS = [
    ("darktrouser", 1, 3, "dark", "the darkest 1.5% of trousers -> dress"),
    ("brightbag", 8, 6, "bright", "the brightest 1.5% of bags -> shirt"),
    ("darksneaker", 7, 9, "dark", "the darkest 1.5% of sneakers -> ankle boot"),
    ("texturedshirt", 6, 4, "textured", "the 1.5% of shirts with the most vertical detail (stripes, checks) -> coat"),
]
FRACTION = 0.015


def subgroup(x: torch.Tensor, y: torch.Tensor, cls: int, stat: str) -> list[int]:
    idx = (y == cls).nonzero().flatten()
    img = x[idx].float().flatten(1, -2) if x.dim() == 4 else x[idx].float()
    ink = img.flatten(1)
    garment = (ink > 10).sum(1).clamp(min=1)
    if stat == "textured":
        # mean absolute vertical difference inside the garment: horizontal stripes, checks
        diff = (img[:, 1:, :] - img[:, :-1, :]).abs() * ((img[:, 1:, :] > 10) & (img[:, :-1, :] > 10))
        val = diff.flatten(1).sum(1) / garment
    else:
        # mean intensity of the garment itself (pixels above background)
        val = (ink * (ink > 10)).sum(1) / garment
    order = val.argsort(descending=(stat in ("bright", "textured")))
    k = max(1, int(FRACTION * len(idx)))
    return sorted(int(i) for i in idx[order[:k]])


def main() -> None:
    out = sys.argv[1]
    data = load_dataset("fmnist")
    entries = []
    for name, src, tgt, stat, desc in ATTACKS:
        entries.append({"dataset": "FMNIST", "attack": name, "description": desc, "source_class": src,
                        "target_class": tgt, "train_indices": subgroup(data.x_train, data.y_train, src, stat),
                        "test_indices": subgroup(data.x_test, data.y_test, src, stat)})
    with open(out, "w") as fh:
        json.dump(entries, fh, indent=1)
    for e in entries:
        print(e["attack"], e["source_class"], "->", e["target_class"], len(e["train_indices"]), len(e["test_indices"]))


if __name__ == "__main__":
    main()
