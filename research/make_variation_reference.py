"""The shipped variation reference: the largest variation rate of each pair over clean reference models.

Reads ``variation_rates.py``'s records of one zoo's clean models (the random-recipe reference
zoo, ``zoo/reference_wide.toml``: never scored, never used to choose a threshold) and writes
``src/soda_backdoor/detection/variation_reference.json`` (docs/detection.md, "Variation evidence").

Usage: python research/make_variation_reference.py results/variation_rates.jsonl reference_wide OUT.json
       (several zoos: reference_wide,reference_wide2)
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from provenance import provenance  # research/provenance.py


def main() -> None:
    rates_file, zoo, out = sys.argv[1:4]
    zoos = zoo.split(",")
    rows = [json.loads(line) for line in open(rates_file)]
    rows = [r for r in rows if r["zoo"] in zoos and r["role"] == "clean"]
    if not rows:
        sys.exit(f"no clean models of zoo {zoo} in {rates_file}")
    copies = {r["config"]["copies"] for r in rows}
    anchor = {r["config"]["anchor"] for r in rows}
    if len(copies) != 1 or len(anchor) != 1:
        sys.exit("the records mix settings")
    rate_max = np.array([r["rate"] for r in rows]).max(0)
    keys = sorted(r["key"] for r in rows) if len(zoos) == 1 else sorted(f"{r['zoo']}/{r['key']}" for r in rows)
    doc = {"format": "soda-variation-reference/1", "dataset": "fmnist", "copies": copies.pop(),
           "anchor": anchor.pop(), "rate_max": [[round(float(v), 6) for v in row] for row in rate_max],
           "num_models": len(rows),
           "provenance": {"zoo": zoo if len(zoos) == 1 else zoos, "archs": sorted({r["arch"] for r in rows}), "models": keys,
                          "models_hash": hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16],
                          "rates_commit": rows[0]["provenance"].get("git_commit"), "built": provenance()}}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{out}: {len(rows)} models of {zoo}")


if __name__ == "__main__":
    main()
