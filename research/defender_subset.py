"""Does the verdict on a model depend on whether its file names the attack? (issue 16)

The detection re-estimates batch-norm statistics and the repair tunes on a defender subset of
the clean train split (5%, drawn with a seed). The attack's own train samples are kept out of
it, so the subset of a model whose metadata names its attack is drawn from a smaller pool
than that of the same file without the name (or scanned with ``--attack none``). A user does
not know the attack, and the zoo's scores should be those a user gets.

For every backdoored model of each zoo, ``detect`` runs twice with the zoo's settings: with
the attack's data context (as ``soda zoo score`` does) and with none (as a user's scan of a
file without metadata). The record has both verdicts per model and how many agree, so the
effect of a change to how the subset is drawn can be measured before and after it.

Usage: python research/defender_subset.py zoos/test --out research/results/defender_subset_test.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from provenance import write_record

from soda_backdoor.workflow import detect, load_context, open_model
from soda_backdoor.zoo import read_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    rows = []
    for zoo in a.zoos:
        for m in read_manifest(Path(zoo)).values():
            if m["attack"] == "none":
                continue
            got = {}
            for name, attack in (("with_attack", m["attack"]), ("without", None)):
                ctx = load_context(m["dataset"], m.get("data_dir") or None, attack, m.get("attack_file") or None)
                rep = detect(open_model(str(Path(zoo) / m["file"]), ctx.data, dev), ctx, None, None, dev)
                got[name] = {"pairs": [list(p) for p in rep.pairs], "defender": int(len(ctx.splits.defender)),
                             "first": int(ctx.splits.defender[0])}
            row = {"zoo": Path(zoo).name, "key": m["key"][:8], "arch": m["arch"], "attack": m["attack"],
                   "true_pair": [m["source"], m["target"]], **got,
                   "same": got["with_attack"]["pairs"] == got["without"]["pairs"]}
            rows.append(row)
            print(row, flush=True)
    n = len(rows)
    print(f"same verdict with and without the attack's name: {sum(r['same'] for r in rows)} of {n}")
    write_record(a.out, rows, a)


if __name__ == "__main__":
    main()
