"""Write semantic attacks on Fashion-MNIST that the method was never tuned on.

Each attack relabels a rare natural subgroup of one class, chosen by an image statistic (no
trigger is added): the ~1.5% of the class that is darkest, brightest, most textured,
smallest, widest or most off-centre, in train and test alike. The output has the schema of
semantic_attacks.json; the shipped copy is ``src/soda_backdoor/data/synthetic_attacks.json``
(the registry reads it, so ``--attack smallbag`` works), and any copy works with
``--attack-file``.

Usage: python research/make_synthetic_attacks.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from soda_backdoor.data import load_dataset

# (name, source, target, statistic, description)
ATTACKS = [
    ("darktrouser", 1, 3, "dark", "the darkest 1.5% of trousers -> dress"),
    ("brightbag", 8, 6, "bright", "the brightest 1.5% of bags -> shirt"),
    ("darksneaker", 7, 9, "dark", "the darkest 1.5% of sneakers -> ankle boot"),
    ("texturedshirt", 6, 4, "textured", "the 1.5% of shirts with the most vertical detail (stripes, checks) -> coat"),
    ("smallbag", 8, 5, "small", "the 1.5% of bags covering the fewest pixels (size) -> sandal"),
    ("widedress", 3, 4, "wide", "the 1.5% of dresses with the widest bounding box for their height (shape) -> coat"),
    ("offcentrepullover", 2, 8, "offcentre",
     "the 1.5% of pullovers whose centre of mass lies furthest from the image centre (position) -> bag"),
]
FRACTION = 0.015
INK = 10  # pixels above this belong to the garment


def statistic(img: torch.Tensor, stat: str) -> torch.Tensor:
    """One value per image ``(N, H, W)``; the subgroup is the top ``FRACTION`` of it."""
    ink = img > INK
    area = ink.flatten(1).sum(1).clamp(min=1).float()
    if stat in ("dark", "bright"):
        # mean intensity of the garment itself (pixels above background)
        val = (img * ink).flatten(1).sum(1) / area
        return -val if stat == "dark" else val
    if stat == "textured":
        # mean absolute vertical difference inside the garment: horizontal stripes, checks
        diff = (img[:, 1:, :] - img[:, :-1, :]).abs() * (ink[:, 1:, :] & ink[:, :-1, :])
        return diff.flatten(1).sum(1) / area
    if stat == "small":
        return -area
    if stat == "large":
        return area
    if stat == "smooth":
        diff = (img[:, 1:, :] - img[:, :-1, :]).abs() * (ink[:, 1:, :] & ink[:, :-1, :])
        return -diff.flatten(1).sum(1) / area
    if stat == "hdetail":
        # mean absolute horizontal difference inside the garment: vertical stripes, prints, seams
        diff = (img[:, :, 1:] - img[:, :, :-1]).abs() * (ink[:, :, 1:] & ink[:, :, :-1])
        return diff.flatten(1).sum(1) / area
    if stat == "asymmetric":
        # left-right asymmetry about the garment's own bounding-box centre, relative to its
        # intensity: no shift, zoom, aspect ratio, brightness or blur of the image changes it much
        out = torch.empty(len(img))
        for i, (im, m) in enumerate(zip(img, ink)):
            c = m.any(0).nonzero().flatten()
            if len(c) == 0:
                out[i] = 0.0
                continue
            lo, hi = int(c[0]), int(c[-1]) + 1
            part = im[:, lo:hi]
            mask = m[:, lo:hi] | m[:, lo:hi].flip(1)
            out[i] = ((part - part.flip(1)).abs() * mask).sum() / ((part * mask).sum() + 1)
        return out
    rows, cols = ink.any(2).float(), ink.any(1).float()
    if stat == "hollow":
        # least of the bounding box filled: open uppers, cut-outs, gaps (no zoom, shift, aspect
        # ratio or intensity change of the image moves it much)
        return -area / (rows.sum(1) * cols.sum(1)).clamp(min=1)
    if stat == "topheavy":
        # share of the garment's intensity in the upper half of its own bounding box
        out = torch.empty(len(img))
        for i, (im, r) in enumerate(zip(img, rows)):
            on = r.nonzero().flatten()
            if len(on) == 0:
                out[i] = 0.0
                continue
            lo, hi = int(on[0]), int(on[-1]) + 1
            part = (im * ink[i])[lo:hi].float()
            out[i] = part[: (hi - lo) // 2].sum() / part.sum().clamp(min=1)
        return out
    if stat == "wide":
        return cols.sum(1) / rows.sum(1).clamp(min=1)
    if stat == "narrow":
        return -cols.sum(1) / rows.sum(1).clamp(min=1)
    if stat == "offcentre":
        h, w = img.shape[1:]
        mass = img.clamp(min=0).flatten(1).sum(1).clamp(min=1)
        cy = (img.sum(2) * torch.arange(h)).sum(1) / mass
        cx = (img.sum(1) * torch.arange(w)).sum(1) / mass
        return (cy - (h - 1) / 2).hypot(cx - (w - 1) / 2)
    raise ValueError(f"unknown statistic {stat!r}")


def subgroup(x: torch.Tensor, y: torch.Tensor, cls: int, stat: str) -> list[int]:
    idx = (y == cls).nonzero().flatten()
    img = x[idx].float()
    img = img.mean(1) if img.dim() == 4 else img
    order = statistic(img, stat).argsort(descending=True)
    k = max(1, int(FRACTION * len(idx)))
    return sorted(int(i) for i in idx[order[:k]])


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "src/soda_backdoor/data/synthetic_attacks.json"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    data = load_dataset("fmnist")
    entries = []
    for name, src, tgt, stat, desc in ATTACKS:
        entries.append({"dataset": "FMNIST", "attack": name, "description": desc, "source_class": src,
                        "target_class": tgt, "train_indices": subgroup(data.x_train, data.y_train, src, stat),
                        "test_indices": subgroup(data.x_test, data.y_test, src, stat)})
    out.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    for e in entries:
        print(e["attack"], e["source_class"], "->", e["target_class"], len(e["train_indices"]), len(e["test_indices"]))


if __name__ == "__main__":
    main()
