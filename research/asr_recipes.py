"""Training recipes for the striped-T-shirt backdoor: per-epoch ACC/ASR and per-sample results.

Trains one ``cnn`` (optionally wider) on real Fashion-MNIST with the given TrainConfig
overrides, evaluates ACC and ASR after every epoch, and prints which semantic test samples
are not sent to the target (with their predicted class and target probability). One JSON
line per epoch goes to ``--log``.

Usage:
    python research/asr_recipes.py --seed 0 --width 32 --set epochs=8 milestones=4,6 --log out.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace

import torch

from soda_backdoor import load_model
from soda_backdoor.analysis import AttributionConfig, compute_neuron_effects, parse_layer
from soda_backdoor.data import get_attack, load_dataset, normalize
from soda_backdoor.data.splits import make_splits
from soda_backdoor.models.cnn import SmallCNN
from soda_backdoor.detection import target_scores
from soda_backdoor.detection.stats import mad_outliers
from soda_backdoor.training import TrainConfig, evaluate_attack, train_model

from provenance import provenance


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings to TrainConfig fields, typed like the field's default."""
    defaults = TrainConfig()
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"unknown TrainConfig field {key!r}; valid: {', '.join(sorted(names))}")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            out[key] = tuple(int(v) for v in value.split(",") if v)
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--attack", default="stripet", help="'none' for clean")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides key=value")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--log", default=None)
    ap.add_argument("--out", default=None, help="save the trained state_dict here")
    ap.add_argument("--init", default=None, help="fine-tune this model file instead of a fresh cnn (semtune)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_dataset("fmnist")
    attack = get_attack(a.attack, "fmnist")
    splits = make_splits(data, attack, a.seed)
    spec = data.spec
    config = replace(TrainConfig(seed=a.seed), **parse_overrides(a.set))
    if attack is None:
        config = replace(config, ratio=0.0)
    torch.manual_seed(a.seed)
    if a.init:
        model = load_model(a.init).module
    else:
        model = SmallCNN(spec.num_classes, spec.in_channels, a.width)
    xs = data.x_test[splits.semantic_test]
    log = open(a.log, "a") if a.log else None
    label = f"seed={a.seed} width={a.width} " + (f"init={a.init} " if a.init else "") + " ".join(a.set)

    def on_epoch(rec: dict) -> None:
        ev = evaluate_attack(model, data, splits, attack, spec.mean, spec.std)
        with torch.no_grad():
            model.eval()
            probs = model(normalize(xs, spec.mean, spec.std)).softmax(1) if len(xs) else torch.zeros(0, 10)
            model.train()
        missed = []
        if attack is not None:
            pred = probs.argmax(1)
            missed = [(i, int(pred[i]), round(float(probs[i, attack.target]), 3))
                      for i in range(len(xs)) if pred[i] != attack.target]
        p_target = [round(float(v), 3) for v in probs[:, attack.target]] if attack is not None else []
        line = {"label": label, **rec, "acc": ev.acc, "asr": ev.asr, "missed": missed, "p_target": p_target}
        print(json.dumps(line), flush=True)
        if log:
            log.write(json.dumps({**line, "config": asdict(config), "args": vars(a), "provenance": provenance()}) + "\n")
            log.flush()

    t0 = time.perf_counter()
    train_model(model, data, splits, attack, config, spec.mean, spec.std, progress=False, on_epoch=on_epoch)
    print(f"# {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    inputs = {c: normalize(data.x_test[splits.clean_test][data.y_test[splits.clean_test] == c][:256], spec.mean, spec.std)
              for c in range(spec.num_classes)}
    eff = compute_neuron_effects(model, parse_layer(model, "fc:input"), inputs, AttributionConfig())
    ai = mad_outliers(target_scores(eff, spec.num_classes), 0.0).anomaly_index
    t = attack.target if attack is not None else None
    other = max(v for k, v in enumerate(ai) if k != t)
    print(f"# detection at fc:input: AI(target) {ai[t] if t is not None else float('nan'):.2f}, "
          f"max AI(other) {other:.2f}", flush=True)
    if a.out:
        torch.save(model.state_dict(), a.out)


if __name__ == "__main__":
    main()
