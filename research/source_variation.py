"""Which class is the source of a flagged target: the confident errors, the variations, or both (research)

The detector's source is the class with the largest confident-error evidence into the flagged
target, ``argmax_s E[s, t]`` (docs/method.md §2.2b). It is wrong where the backdoor also adds
errors from a class that clean models already confuse with the target: the wider dresses
(dress -> coat) read as shirt -> coat on two test models, and a reading of the same counts does
not fix it (`source_excess.py`). The variation evidence ``V[s, t]`` (natural variations of
ordinary samples of ``s`` reaching ``t``, over the largest rate of clean reference models) is
computed per source too, from other samples than the errors; this script asks whether it
names the source better, alone or with the errors:

- ``E``: the default, the largest evidence;
- ``V``: the largest variation excess;
- ``V>=v``: the largest variation excess when it reaches ``v``, else ``E``;
- ``E|V>=f``: the largest evidence among the sources whose excess is at least ``f`` of the
  largest (every source when the largest is not positive);
- ``flagging``: the largest ``E`` where the errors flag the target (``E`` above their
  threshold), the largest ``V`` where the variations flag it alone;
- ``rank``: the smallest sum of the two ranks, ties to ``E``.

``detect`` runs the product's detector (``workflow.detect``, default settings, exactly as
``soda zoo score`` does) on every model of the zoos and caches ``E`` and ``V``; ``analyse``
scores each rule on every backdoored model whose target is flagged, chooses on ``--dev`` and
reports the rest.

Usage:
    python research/source_variation.py detect /work/zoos/dev /work/zoos/test --jobs 2 --cache research/results/source_variation.jsonl
    python research/source_variation.py analyse --cache research/results/source_variation.jsonl --dev dev lowratio_dev --json research/results/source_variation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from provenance import write_record  # research/provenance.py

V_LEVELS = (0.02, 0.05, 0.1, 0.2)
TAU = 2.99  # ErrorConfig().tau, the errors' threshold
FRACTIONS = (0.25, 0.5, 0.75)


def detect_one(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from soda_backdoor.workflow import detect
    from soda_backdoor.zoo.score import _open

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded, ctx, device = _open({**task, "device": "cpu"})
    rep = detect(loaded, ctx, None, None, device, calibration=None)
    err = rep.errors
    return {**task, "pairs": [list(p) for p in rep.pairs], "backdoor": bool(rep.backdoor),
            "E": err.evidence if err else None, "V": err.variation_excess if err else None,
            "n": err.counts.counts if err else None, "seconds": time.perf_counter() - t0}


def cmd_detect(args) -> None:
    from concurrent.futures import ProcessPoolExecutor

    cache = Path(args.cache)
    done = set()
    if cache.exists():
        done = {(r["zoo"], r["key"]) for r in map(json.loads, cache.read_text().splitlines())}
    tasks = []
    for z in map(Path, args.zoos):
        for line in (z / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            if (z.name, r["key"]) in done:
                continue
            tasks.append({"zoo": z.name, "key": r["key"], "path": str(z / r["file"]), "dataset": r["dataset"],
                          "data_dir": r.get("data_dir", ""), "attack": r["attack"],
                          "attack_file": r.get("attack_file", ""), "arch": r["arch"], "asr": r["asr"],
                          "source": r.get("source"), "target": r.get("target"), "twin": r.get("twin")})
    print(f"{len(tasks)} models to detect ({len(done)} cached)", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool, cache.open("a") as fh:
        for i, rec in enumerate(pool.map(detect_one, tasks), 1):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(f"[{i}/{len(tasks)}] {rec['zoo']:14} {rec['key'][:8]} {rec['arch']:5} {rec['attack']:18} "
                  f"pairs {rec['pairs']}  {rec['seconds']:.1f}s", flush=True)


def _argmax(v: np.ndarray, others: list[int]) -> int:
    return max(others, key=lambda s: (v[s], -s))


def rules() -> dict[str, Callable[[np.ndarray, np.ndarray, list[int]], int]]:
    out: dict[str, Callable] = {"E": lambda e, v, o: _argmax(e, o), "V": lambda e, v, o: _argmax(v, o)}
    for lvl in V_LEVELS:
        out[f"V>={lvl}"] = lambda e, v, o, lvl=lvl: _argmax(v, o) if max(v[s] for s in o) >= lvl else _argmax(e, o)
    for f in FRACTIONS:
        def among(e, v, o, f=f):
            top = max(v[s] for s in o)
            keep = [s for s in o if v[s] >= f * top] if top > 0 else o
            return _argmax(e, keep)
        out[f"E|V>={f}"] = among

    # the source from the evidence that flagged the target: the errors where they reach their
    # threshold, the variations where the target is flagged by them alone
    out["flagging"] = lambda e, v, o: _argmax(e, o) if max(e[s] for s in o) > TAU else _argmax(v, o)

    def rank(e, v, o):
        re = {s: i for i, s in enumerate(sorted(o, key=lambda s: -e[s]))}
        rv = {s: i for i, s in enumerate(sorted(o, key=lambda s: -v[s]))}
        return min(o, key=lambda s: (re[s] + rv[s], re[s]))
    out["rank"] = rank
    return out


def cmd_analyse(args) -> None:
    recs = [json.loads(line) for line in Path(args.cache).read_text().splitlines()]
    rs = rules()
    table: dict[str, dict[str, list[int]]] = {}
    rows = []
    for r in recs:
        if r["attack"] == "none" or r["asr"] < args.min_asr or r["E"] is None or r["V"] is None:
            continue
        t, s = r["target"], r["source"]
        if t not in [p[1] for p in r["pairs"]]:
            continue
        e, v = np.asarray(r["E"])[:, t], np.asarray(r["V"])[:, t]
        others = [c for c in range(len(e)) if c != t]
        picks = {name: fn(e, v, others) for name, fn in rs.items()}
        rows.append({"zoo": r["zoo"], "key": r["key"], "arch": r["arch"], "attack": r["attack"], "source": s,
                     "target": t, "E": [round(float(x), 3) for x in e], "V": [round(float(x), 4) for x in v],
                     "picks": picks})
        for name, p in picks.items():
            cell = table.setdefault(name, {}).setdefault(r["zoo"], [0, 0])
            cell[0] += p == s
            cell[1] += 1
    zoos = sorted({r["zoo"] for r in rows}, key=lambda z: (z not in args.dev, z))
    dev_total = {name: sum(table[name].get(z, [0, 0])[0] for z in args.dev) for name in rs}
    best = max(dev_total.values()) if dev_total else 0
    print("right sources of the flagged backdoors (chosen on " + ", ".join(args.dev) + ")")
    print(f"{'rule':10} " + " ".join(f"{z:>14}" for z in zoos) + "   dev total")
    for name in rs:
        cells = [table[name].get(z, [0, 0]) for z in zoos]
        print(f"{name:10} " + " ".join(f"{c[0]:>8} of {c[1]:<3}" for c in cells)
              + f"   {dev_total[name]}{'  <- best on dev' if dev_total[name] == best else ''}")
    print("\nmodels where any rule disagrees with E:")
    for r in rows:
        if len(set(r["picks"].values())) > 1 or r["picks"]["E"] != r["source"]:
            t = r["target"]
            print(f"  {r['zoo']:12} {r['key'][:8]} {r['arch']:5} {r['attack']:18} true {r['source']}->{t}  "
                  f"E {r['E'][r['source']]:.2f} (top {int(np.argmax(r['E']))}: {max(r['E']):.2f})  "
                  f"V {r['V'][r['source']]:.3f} (top {int(np.argmax(r['V']))}: {max(r['V']):.3f})  "
                  + " ".join(f"{k}:{p}" for k, p in r["picks"].items()))
    if args.json:
        write_record(args.json, {"table": table, "rows": rows}, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("detect")
    d.add_argument("zoos", nargs="+")
    d.add_argument("--jobs", type=int, default=2)
    d.add_argument("--cache", required=True)
    a = sub.add_parser("analyse")
    a.add_argument("--cache", required=True)
    a.add_argument("--dev", nargs="+", default=["dev", "lowratio_dev"])
    a.add_argument("--min-asr", type=float, default=0.5)
    a.add_argument("--json")
    args = ap.parse_args()
    {"detect": cmd_detect, "analyse": cmd_analyse}[args.cmd](args)


if __name__ == "__main__":
    main()
