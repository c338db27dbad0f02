"""Variation rates: how often a model sends natural variations of one class to another.

For every model of the given built zoos: ``V`` varied copies (``natural_variation``, the
repair's family) of each defender clean sample of each class whose original the model gives
its class with softmax >= 0.95 (the repair's anchor), classified; ``rate[s, t]`` is the
fraction of class ``s``'s copies sent to ``t``. A backdoor that generalises along the family
sends many (the repair's mined samples); the question for docs/detection.md is whether clean
models of other recipes send as many on their natural confusions. One JSON line per model.

Usage: python research/variation_rates.py ZOO_DIR... --out results/variation_rates.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from soda_backdoor.data import normalize
from soda_backdoor.data.augment import natural_variation
from soda_backdoor.utils import inference_view
from soda_backdoor.workflow import load_context, open_model
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.score import label_rows

from provenance import provenance  # research/provenance.py


def rates(module, ctx, mean, std, copies: int, anchor: float, seed: int) -> tuple[list, list]:
    d = ctx.splits.defender
    x, y = ctx.data.x_train[d], ctx.data.y_train[d]
    k = ctx.data.num_classes
    out, anchored = torch.zeros(k, k), []
    gen = torch.Generator().manual_seed(seed)
    with inference_view(module) as fast, torch.inference_mode():
        for s in range(k):
            xs = x[y == s].float() / 255
            keep = fast(normalize(xs, mean, std)).softmax(1)[:, s] >= anchor
            xs = xs[keep]
            anchored.append(int(keep.sum()))
            if len(xs) == 0:
                continue
            varied = torch.cat([natural_variation(xs, gen) for _ in range(copies)])
            pred = torch.cat([fast(normalize(varied[i:i + 1024], mean, std)).argmax(1)
                              for i in range(0, len(varied), 1024)])
            out[s] = torch.bincount(pred, minlength=k).float() / len(varied)
    return out.tolist(), anchored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--anchor", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prov = provenance()
    done = set()
    if Path(args.out).exists():
        done = {(r["zoo"], r["key"]) for r in map(json.loads, Path(args.out).read_text().splitlines())}
    with open(args.out, "a") as f:
        for z in args.zoos:
            root = Path(z)
            rows = label_rows(list(read_manifest(root).values()))
            ctxs: dict = {}
            for r in rows:
                if (root.name, r["key"]) in done or r["role"] not in ("clean", "backdoored"):
                    continue
                af = r.get("attack_file") or None
                ck = (r["dataset"], r["attack"], af)
                if ck not in ctxs:  # the attack's semantic samples stay out of the defender's data
                    ctxs[ck] = load_context(r["dataset"], None, None if r["attack"] == "none" else r["attack"], af, 0)
                ctx = ctxs[ck]
                m = open_model(str(root / r["file"]), ctx.data, torch.device("cpu"))
                rate, anchored = rates(m.module.eval(), ctx, m.meta.mean, m.meta.std, args.copies, args.anchor,
                                       args.seed)
                src = tgt = None
                if r["role"] == "backdoored":
                    src, tgt = ctx.attack.source, ctx.attack.target
                rec = {"zoo": root.name, "key": r["key"], "arch": r["arch"], "role": r["role"], "attack": r["attack"],
                       "source": src, "target": tgt, "train": r["config"]["train"], "acc": r["acc"], "asr": r["asr"],
                       "anchored": anchored, "rate": rate, "config": vars(args), "provenance": prov}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(root.name, r["key"][:8], r["role"], r["attack"], flush=True)


if __name__ == "__main__":
    main()
