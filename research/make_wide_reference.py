"""Write `zoo/reference_wide.toml`: clean reference models on recipes drawn at random.

The shipped confident-error reference (`zoo/reference.toml`, `zoo/reference_flip.toml`) is
the dev zoo's eight recipes on other seeds. A held-out zoo of other recipes (holdout2: a
3-epoch schedule with brightness jitter, a 30-epoch `lenet` with no augmentation and no
weight decay) showed that clean models of a recipe the reference has not seen confuse other
pairs, or the same pairs more often (docs/detection.md). A defender does not know the
recipe of the model they audit, so their reference should be a *sample of the recipe
space*: this script draws one recipe per model from a declared distribution over every
training setting `soda train` has (schedule, learning rate and its decay, batch, momentum,
weight decay, augmentation and its strength), with a fixed random seed, and a seed per
model that no other zoo uses.

Each model is a clean model of a recipe no other reference model shares, so every one of
them, scored against the others, is a clean model of an unseen recipe: a dev-side estimate
of the false-alarm rate (research/error_null_variants.py).

Usage: python research/make_wide_reference.py [--per-arch 10] [--seed 7] [--seed0 40] [--name NAME] [--wide] [OUT.toml]

A second draw (`zoo/reference_wide2.toml`, more models for a wider null):
    python research/make_wide_reference.py --seed 8 --seed0 60 --name reference_wide2 zoo/reference_wide2.toml

A third draw from a wider distribution (`--wide`, `zoo/reference_wide3.toml`; first session of
2026-12-02): holdout3's one false alarm was a clean model of a constant learning rate and
contrast jitter 0.5, both outside the distribution above, and a user's recipe may be anywhere.
`--wide` adds a constant learning rate, learning-rate milestones placed by the schedule's
length, plain SGD, batch 512 and stronger augmentation (rotation 30, brightness and contrast 0.5):
    python research/make_wide_reference.py --seed 9 --seed0 100 --name reference_wide3 --wide zoo/reference_wide3.toml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# The recipe distribution. Epoch ranges differ by architecture (lenet is small and is often
# trained longer); everything else is shared.
EPOCHS = {"cnn": (3, 14), "lenet": (4, 30)}
LR = (0.01, 0.12)  # log-uniform
BATCH = (32, 48, 64, 96, 128, 192, 256)
MOMENTUM = (0.5, 0.8, 0.9, 0.9, 0.95)
WEIGHT_DECAY = (0.0, 1e-4, 5e-4, 5e-4, 2e-3)
GAMMA = (0.1, 0.1, 0.3)
PLAIN_FINAL = (0, 2)
ROTATION = (0.0, 0.0, 10.0, 20.0)
BRIGHTNESS = (0.0, 0.0, 0.2, 0.4)
CONTRAST = (0.0, 0.0, 0.3)
# --wide: the same, plus these choices
WIDE = {"batch_size": BATCH + (512,), "momentum": MOMENTUM + (0.0,), "gamma": GAMMA + (1.0,),
        "rotation": ROTATION + (30.0,), "brightness": BRIGHTNESS + (0.5,), "contrast": CONTRAST + (0.5,)}
MILESTONES = ("default", "thirds", "late")  # `soda train`'s (E/2, 3E/4); (E/3, 2E/3); (2E/3,)
SEED0 = 40  # model seeds 40, 41, ...: no other clean model of another zoo uses them (the second draw: 60, ...)


def draw(rng: np.random.Generator, arch: str, wide: bool = False) -> dict:
    choices = {"batch_size": BATCH, "momentum": MOMENTUM, "gamma": GAMMA, "rotation": ROTATION,
               "brightness": BRIGHTNESS, "contrast": CONTRAST}
    if wide:
        choices = WIDE
    lo, hi = EPOCHS[arch]
    epochs = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    recipe = {"epochs": epochs, "lr": round(float(np.exp(rng.uniform(*np.log(LR)))), 4),
              "batch_size": int(rng.choice(choices["batch_size"])), "momentum": float(rng.choice(choices["momentum"])),
              "weight_decay": float(rng.choice(WEIGHT_DECAY)), "gamma": float(rng.choice(choices["gamma"])),
              "plain_final_epochs": min(int(rng.choice(PLAIN_FINAL)), epochs - 1),
              "augment_clean": bool(rng.integers(2))}
    if wide:
        style = str(rng.choice(MILESTONES))
        if style == "thirds":
            recipe["milestones"] = sorted({max(1, epochs // 3), max(1, 2 * epochs // 3)})
        elif style == "late":
            recipe["milestones"] = [max(1, 2 * epochs // 3)]
    # rotation, brightness and contrast apply to augmented samples only
    if recipe["augment_clean"]:
        recipe.update(rotation=float(rng.choice(choices["rotation"])),
                      brightness=float(rng.choice(choices["brightness"])),
                      contrast=float(rng.choice(choices["contrast"])))
    return recipe


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parents[1] / "zoo" / "reference_wide.toml"))
    p.add_argument("--per-arch", type=int, default=10)
    p.add_argument("--seed", type=int, default=7, help="seed of the recipe draws")
    p.add_argument("--seed0", type=int, default=SEED0, help="training seed of the first model")
    p.add_argument("--name", default="reference_wide", help="the zoo's name")
    p.add_argument("--wide", action="store_true", help="the wider distribution (module docstring)")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    lines = ["# A wide reference zoo: clean models only, one recipe each, drawn at random from the",
             "# distribution in research/make_wide_reference.py (written by it: do not edit by hand).",
             f"# python research/make_wide_reference.py --per-arch {args.per_arch} --seed {args.seed}"
             + (f" --seed0 {args.seed0} --name {args.name}" + (" --wide" if args.wide else "")
               + f" zoo/{Path(args.out).name}" if args.name != "reference_wide" else ""),
             "# Every model is a clean model of a recipe the others do not share (docs/detection.md).",
             f"# Build: soda zoo build zoo/{args.name}.toml --out zoos/{args.name} --jobs 2",
             f'name = "{args.name}"', 'dataset = "fmnist"']
    seed, epochs = args.seed0, 0
    for arch in ("cnn", "lenet"):
        for _ in range(args.per_arch):
            recipe = draw(rng, arch, args.wide)
            epochs += recipe["epochs"]
            lines += ["", "[[group]]", f'arch = "{arch}"', f"seed = {seed}", 'attack = "none"']
            lines += [f"{k} = {_toml(v)}" for k, v in recipe.items()]
            seed += 1
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {2 * args.per_arch} models, {epochs} epochs in all")


if __name__ == "__main__":
    main()
