"""How far the natural variations reach a zoo's backdoors, before and after the repair.

For every backdoored model of a built zoo, on its true pair: how many varied copies of the
defender's clean source samples the model sends to the target (anchored as the repair does),
with one generation of variations and with a second generation (variations of the first
generation's hits), and the same counts on the model repaired with the default settings
(``soda zoo repair DIR --given-pair``, read from ``DIR/repairs``). A diagnostic for
docs/repair.md, not a default.

Usage: python research/variation_probe.py ZOO_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from soda_backdoor.data import normalize
from soda_backdoor.data.augment import natural_variation
from soda_backdoor.repair import RepairConfig
from soda_backdoor.workflow import load_context, open_model
from soda_backdoor.zoo.score import label_rows
from soda_backdoor.zoo import read_manifest

from provenance import write_record  # research/provenance.py


def hits(module, x01, source, target, mean, std, gen, copies, anchor=0.95):
    """Variations of ``x01`` sent to ``target`` (anchored originals), and the per-sample p_target."""
    with torch.inference_mode():
        p0 = module(normalize(x01, mean, std)).softmax(1)
        keep = x01[p0[:, source] >= anchor]
        varied = torch.cat([natural_variation(keep, gen) for _ in range(copies)])
        p = module(normalize(varied, mean, std)).softmax(1)
    hit = p.argmax(1) == target
    return varied[hit], len(varied), float(p[:, target].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.zoo)
    rows = [r for r in label_rows(list(read_manifest(root).values())) if r["role"] == "backdoored"]
    eff = asdict(RepairConfig())
    eff.pop("seed")
    tag = "soda-" + hashlib.sha256(json.dumps(eff, sort_keys=True).encode()).hexdigest()[:10]
    out = []
    for r in rows:
        ctx = load_context(r["dataset"], None, r["attack"], None, 0)
        m = open_model(str(root / r["file"]), ctx.data, torch.device("cpu"))
        rep_path = root / "repairs" / f"{r['key']}-{tag}-given.safetensors"
        src, tgt = ctx.attack.source, ctx.attack.target
        dfd = ctx.splits.defender
        x = ctx.data.x_train[dfd][ctx.data.y_train[dfd] == src].float() / 255
        mean, std = m.meta.mean, m.meta.std
        sem = normalize(ctx.data.x_test[list(ctx.attack.test_indices)].float() / 255, mean, std)
        row = {"model": r["key"][:8], "arch": r["arch"], "attack": r["attack"], "seed": r["config"]["train"]["seed"],
               "blend": r["config"]["train"]["source_blend"]}
        for name, path in (("before", None), ("after", rep_path)):
            mod = m.module if path is None else open_model(str(path), ctx.data, torch.device("cpu")).module
            mod.eval()
            gen = torch.Generator().manual_seed(0)
            h1, n1, pt1 = hits(mod, x, src, tgt, mean, std, gen, 10)
            h2, n2, _ = hits(mod, h1, src, tgt, mean, std, gen, 10, anchor=0.0) if len(h1) else (h1, 0, 0)
            with torch.inference_mode():
                asr = float((mod(sem).argmax(1) == tgt).float().mean())
            row[name] = {"asr": asr, "gen1_hits": len(h1), "gen1_tried": n1, "gen1_mean_p_target": pt1,
                         "gen2_hits": len(h2), "gen2_tried": n2}
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.json:
        write_record(args.json, out, {**vars(args), "repair_tag": tag})


if __name__ == "__main__":
    main()
