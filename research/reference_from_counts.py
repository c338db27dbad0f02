"""Write a confident-error reference from the committed count records, without the model files.

`soda zoo reference DIR...` counts the clean models of built zoos and pools them per
architecture. The zoos' files are not committed (a build takes 15-65 minutes on the 2-core
CPU), but their counts are (`research/results/error_counts.jsonl`, written by
`research/error_detector.py count` with the product's own counting). This writes the same
reference from those records, with the same provenance (zoos, number of models, hash of
their keys), plus where the counts came from. Checked: it reproduces the shipped reference
of stop 17 count for count (`--check`).

Usage:
    python research/reference_from_counts.py --zoos reference reference_flip reference_wide \\
        --out src/soda_backdoor/detection/error_reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_detector import _meta, _read  # noqa: E402
from frozen_zoo import ROOT, frozen_rows  # noqa: E402

from soda_backdoor.detection.errors import ErrorCounts, ErrorReference, build_reference  # noqa: E402
from soda_backdoor.zoo.spec import load_zoo_spec  # noqa: E402


def reference(zoos: list[str], counts: dict, threshold: float) -> ErrorReference:
    rows = sorted(((z, r) for z in zoos for r in frozen_rows(z, counts) if r["role"] == "clean"),
                  key=lambda zr: (zr[0], zr[1]["key"]))
    models = []
    for z, r in rows:
        d = r["c"][f"all@{threshold}"]
        models.append((ErrorCounts(tuple(map(tuple, d["counts"])), tuple(d["totals"]), threshold), r["arch"],
                       f"{z}/{r['key']}"))
    # the clean models of the specs that frozen_rows left out (training failed)
    kept = {(z, r["key"]) for z, r in rows}
    failed = sorted(f"{z}/{e.key}" for z in zoos for e in load_zoo_spec(ROOT / "zoo" / f"{z}.toml").entries
                    if e.clean and (z, e.key) not in kept)
    meta = _meta()
    provenance = {"zoos": sorted(set(zoos)), "num_models": len(rows),
                  "models_hash": hashlib.sha256(json.dumps([r["key"] for _, r in rows]).encode()).hexdigest()[:16],
                  "commit": meta["commit"], "torch": sorted({r["c"]["torch"] for _, r in rows}) [0],
                  "machine": meta["machine"], "left_out_failed_training": failed,
                  "counted_from": "research/results/error_counts.jsonl"}
    return build_reference(models, "fmnist", provenance)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="research/results/error_counts.jsonl")
    ap.add_argument("--zoos", nargs="+", required=True)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--out")
    ap.add_argument("--check", help="a reference file whose counts and models must be reproduced")
    args = ap.parse_args()
    counts = {r["id"]: r for r in _read(Path(args.counts))}
    ref = reference(args.zoos, counts, args.threshold)
    if args.check:
        old = ErrorReference.load(args.check)
        same = all(a.counts == b.counts and a.totals == b.totals and a.models == b.models
                   for a, b in zip(old.entries, ref.entries)) and old.archs == ref.archs
        same = same and old.provenance.get("models_hash") == ref.provenance["models_hash"]
        print(f"reproduces {args.check}: {same}")
        if not same:
            sys.exit(1)
    if args.out:
        ref.save(args.out)
        print(f"wrote {args.out}: {ref.provenance['num_models']} models, "
              + ", ".join(f"{e.arch} {e.num_models}" for e in ref.entries))


if __name__ == "__main__":
    main()
