"""Fine-tune every layer, or only the layers after a cut? The repair alone, on the zoos (issues 17, 19).

For every working backdoor of each zoo, ``soda zoo repair --given-pair`` reconstructs the true
(source, target) pair and repairs it with each setting below, so the repair is measured apart
from the detection. The default (``tune_from="auto"``, docs/repair.md) was chosen on dev; test
is reported. Every row of a setting comes from the same code of the repair; the
cache is keyed by the full settings. Results are cached in each zoo's ``repairs/`` folder, so a rerun only computes
what is missing; the record has the provenance and every per-model row.

Usage: python research/repair_tune_from.py zoos/dev zoos/test --out research/results/repair_tune_from.json
"""

from __future__ import annotations

import argparse

from provenance import write_record

from soda_backdoor.zoo.repair import format_repair, repair_zoo

SETTINGS = {"every layer, 5 epochs (the default before)": {"tune_from": None, "epochs": 5},
            "after the auto cut, 5 epochs": {"tune_from": "auto", "epochs": 5},
            "after the auto cut, 10 epochs (the default)": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), help="names from SETTINGS")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = []
    for zoo in a.zoos:
        for name in a.settings:
            res = repair_zoo(zoo, ("soda",), a.jobs, given_pair=True, soda_config=SETTINGS[name])
            print(f"== {zoo}: {name}\n{format_repair(res)}", flush=True)
            out.append({"zoo": zoo, "setting": name, **res})
    write_record(a.out, out, a)


if __name__ == "__main__":
    main()
