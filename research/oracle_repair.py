"""An upper bound for the repair: the attack's own training samples in place of the variations.

For every backdoored model of a built zoo (optionally one attack), on its true pair, the
default repair runs with the attack's semantic *training* samples (the real subgroup, which a
defender does not have) where the mined variations would go, so the reconstructed samples and
every other setting stay the defaults. ASR is measured, as always, on the attack's semantic
*test* samples, which the repair never sees. When even this leaves ASR above 0.10, the tuning
(not the samples) is the limit. A diagnostic for docs/repair.md, never a method.

Usage: python research/oracle_repair.py ZOO_DIR [--attack NAME] [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import soda_backdoor.workflow.steps as steps
from soda_backdoor.artifacts import SampleSet
from soda_backdoor.data import normalize
from soda_backdoor.repair import RepairConfig
from soda_backdoor.workflow import evaluate, load_context, open_model, reconstruct, repair
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.score import label_rows

from provenance import write_record  # research/provenance.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--attack")
    ap.add_argument("--tune-all", action="store_true", help="tune every layer (tune_from None)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.zoo)
    rows = [r for r in label_rows(list(read_manifest(root).values()))
            if r["role"] == "backdoored" and (args.attack is None or r["attack"] == args.attack)]
    out = []
    config = RepairConfig(tune_from=None) if args.tune_all else RepairConfig()
    for r in rows:
        seed = r["config"]["train"]["seed"]
        ctx = load_context(r["dataset"], None, r["attack"], None, seed)
        dev = torch.device("cpu")
        loaded = open_model(str(root / r["file"]), ctx.data, dev)
        a = ctx.attack
        oracle = normalize(ctx.data.x_train[list(a.train_indices)], loaded.meta.mean, loaded.meta.std)
        steps.mine_variations = lambda *_a, **_k: oracle  # the real subgroup where the variations go
        ev = evaluate(loaded, ctx, dev)
        rec = reconstruct(loaded, ctx, a.source, a.target, None, dev, seed)
        rep = repair(loaded, load_context(r["dataset"], None, r["attack"], None, seed), a.source, a.target,
                     SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint),
                     RepairConfig(**{**config.__dict__, "seed": seed}), None, dev, before=ev)
        row = {"model": r["key"][:8], "arch": r["arch"], "attack": r["attack"], "seed": seed,
               "blend": r["config"]["train"]["source_blend"], "n_oracle": len(oracle),
               "asr_before": ev.asr, "asr_after": rep.after.asr, "acc_loss_pt": 100 * (ev.acc - rep.after.acc)}
        print(row, flush=True)
        out.append(row)
    if args.json:
        write_record(args.json, out, args)


if __name__ == "__main__":
    main()
