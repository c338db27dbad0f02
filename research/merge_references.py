"""Merge detection references: every model's confident-error counts, and the largest variation rates.

`soda zoo reference DIR...` builds a reference from the zoos whose files are at hand. The
shipped reference keeps each of its models' counts (the per-pair null needs them) and the
variation rates' maximum, so a reference of more models is the union: the counts of every
model, pooled per architecture again, and the element-wise maximum of the variation rates
(exact: a maximum over the union of models). Used to widen the shipped reference with a new
zoo of clean random-recipe models (docs/detection.md, "A wider reference").

Usage:
    soda zoo reference zoos/reference_wide2 --out rw2.json --jobs 2
    python research/merge_references.py shipped rw2.json --out merged.json
("shipped" stands for the package's own reference.) The shipped files, counts and variation
rates apart (each file its own provenance):
    python research/merge_references.py shipped rw2.json \
        --out src/soda_backdoor/detection/error_reference.json \
        --variations-out src/soda_backdoor/detection/variation_reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace

import numpy as np

from soda_backdoor.detection.errors import ErrorCounts, ErrorReference, build_reference, shipped_reference
from soda_backdoor.detection.variations import VariationReference

from provenance import provenance  # research/provenance.py


def load(arg: str) -> ErrorReference:
    return shipped_reference() if arg == "shipped" else ErrorReference.load(arg)


def merge(refs: list[ErrorReference], names: list[str]) -> ErrorReference:
    if len({(r.dataset, r.threshold) for r in refs}) != 1:
        raise SystemExit("the references differ in dataset or threshold")
    models = []
    for r in refs:
        for e in r.entries:
            if not e.per_model:
                raise SystemExit(f"{e.arch} of a reference has no per-model counts: it cannot be merged")
            models += [(ErrorCounts(c, n, r.threshold), e.arch, m)
                       for c, n, m in zip(e.model_counts, e.model_totals, e.models)]
    keys = [m for _, _, m in models]
    if len(set(keys)) != len(keys):
        raise SystemExit("a model is in more than one reference")
    prov = {"merged_from": names, "parts": [r.provenance for r in refs], "num_models": len(models),
            "models_hash": hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()[:16],
            "zoos": sorted({z for r in refs for z in r.provenance.get("zoos", [])}), "built": provenance()}
    out = build_reference(models, refs[0].dataset, prov)
    vs = [r.variations for r in refs if r.variations is not None]
    if vs:
        if len({(v.copies, v.anchor) for v in vs}) != 1:
            raise SystemExit("the variation rates were measured with different settings")
        rate_max = np.max([np.asarray(v.rate_max) for v in vs], axis=0)
        out = replace(out, variations=VariationReference(
            vs[0].dataset, vs[0].copies, vs[0].anchor, tuple(tuple(float(x) for x in row) for row in rate_max),
            sum(v.num_models for v in vs),
            {"merged_from": names, "parts": [v.provenance for v in vs],
             "archs": sorted({a for v in vs for a in v.provenance.get("archs", [])})}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("refs", nargs="+", help="reference files, or 'shipped'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variations-out", default=None,
                    help="write the variation rates to this file (their own format) and the counts alone to --out")
    ap.add_argument("--errors-from", nargs="*", default=None,
                    help="take the confident-error counts from these of the refs only (default: all)")
    args = ap.parse_args()
    refs = [load(a) for a in args.refs]
    merged = merge(refs, args.refs)
    if args.errors_from is not None:  # the variation rates of all, the counts of some
        counts = merge([load(a) for a in args.errors_from], args.errors_from)
        merged = replace(counts, variations=merged.variations)
    v = merged.variations
    if args.variations_out and v is not None:
        v.save(args.variations_out)
        merged = replace(merged, variations=None)
    merged.save(args.out)
    print(f"{args.out}: {', '.join(f'{e.arch} {e.num_models}' for e in merged.entries)} models of counts; "
          f"variation rates of {v.num_models if v else 0}")


if __name__ == "__main__":
    main()
