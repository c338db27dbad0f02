"""How far a zoo's verdicts and repairs move when the same spec is trained again (docs/zoo.md).

Two builds of one spec give the same model keys (a key is the hash of the training config), so
their records can be set side by side model by model. Given the ``soda zoo score`` records of
two builds (and, optionally, the ``soda zoo repair`` records), this prints, for every model,
accuracy, ASR, detection score and verdict of each build, then the repair's ASR after and
accuracy loss per method, and counts how many verdicts and repair outcomes changed.

    python research/rebuild_compare.py --score OLD.json NEW.json [--repair OLD.json NEW.json] \\
        --out research/results/rebuild_compare_test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from provenance import write_record


def _verdict(row: dict[str, Any]) -> str:
    if not row.get("flagged"):
        return "none"
    return ", ".join(f"{s}->{t}" for s, t in row.get("pairs") or [])


def _score_rows(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    by_key = {r["key"]: r for r in old["rows"]}
    rows = []
    for r in new["rows"]:
        o = by_key.get(r["key"])
        if o is None:
            continue
        truth = "none" if r.get("role") == "clean" else f"{r.get('source')}->{r.get('target')}"
        rows.append({"key": r["key"], "arch": r["arch"], "attack": r["attack"], "role": r.get("role"),
                     "truth": truth, "acc": [o["acc"], r["acc"]], "asr": [o["asr"], r["asr"]],
                     "score": [o.get("score"), r.get("score")], "verdict": [_verdict(o), _verdict(r)],
                     "probability": [o.get("probability"), r.get("probability")]})
    return rows


def _repair_rows(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    by_key = {(r["method"], r["model"]): r for r in old["rows"]}
    rows = []
    for r in new["rows"]:
        o = by_key.get((r["method"], r["model"]))
        if o is None or "asr_after" not in r or "asr_after" not in o:
            continue
        rows.append({"method": r["method"], "model": r["model"], "arch": r["arch"], "attack": r["attack"],
                     "asr_after": [o["asr_after"], r["asr_after"]],
                     "acc_loss": [o["acc_before"] - o["acc_after"], r["acc_before"] - r["acc_after"]]})
    return rows


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--score", nargs=2, required=True, metavar=("OLD", "NEW"), help="two `soda zoo score` records")
    ap.add_argument("--repair", nargs=2, metavar=("OLD", "NEW"), help="two `soda zoo repair` records")
    ap.add_argument("--asr-ok", type=float, default=0.10, help="a repair counts as removing at ASR <= this")
    ap.add_argument("--out", help="write the rows here (with provenance)")
    args = ap.parse_args()

    old, new = (json.loads(Path(p).read_text()) for p in args.score)
    rows = _score_rows(old, new)
    print(f"{'key':16} {'arch':5} {'attack':12} {'truth':5} {'acc old/new':>13} {'asr old/new':>11} "
          f"{'score old/new':>15}  verdict old / new")
    for r in rows:
        print(f"{r['key']:16} {r['arch']:5} {r['attack']:12} {r['truth']:5} "
              f"{_fmt(r['acc'][0], '.4f')}/{_fmt(r['acc'][1], '.4f')} {_fmt(r['asr'][0], '.2f')}/{_fmt(r['asr'][1], '.2f')} "
              f"{_fmt(r['score'][0], '7.2f')}/{_fmt(r['score'][1], '7.2f')}  {r['verdict'][0]} / {r['verdict'][1]}")
    changed = sum(r["verdict"][0] != r["verdict"][1] for r in rows)
    print(f"{len(rows)} models in both builds; the verdict changed on {changed}")

    repair = []
    if args.repair:
        old_r, new_r = (json.loads(Path(p).read_text()) for p in args.repair)
        repair = _repair_rows(old_r, new_r)
        print(f"\n{'method':9} {'model':16} {'arch':5} {'attack':12} {'ASR after old/new':>18} {'loss pt old/new':>16}")
        for r in repair:
            print(f"{r['method']:9} {r['model']:16} {r['arch']:5} {r['attack']:12} "
                  f"{r['asr_after'][0]:8.3f}/{r['asr_after'][1]:.3f} "
                  f"{100 * r['acc_loss'][0]:7.2f}/{100 * r['acc_loss'][1]:.2f}")
        for method in dict.fromkeys(r["method"] for r in repair):
            mine = [r for r in repair if r["method"] == method]
            ok = [sum(r["asr_after"][i] <= args.asr_ok for r in mine) for i in (0, 1)]
            flips = sum((r["asr_after"][0] <= args.asr_ok) != (r["asr_after"][1] <= args.asr_ok) for r in mine)
            print(f"{method}: ASR <= {args.asr_ok} on {ok[0]} / {ok[1]} of {len(mine)}; outcome changed on {flips}")

    if args.out:
        write_record(args.out, {"score": rows, "repair": repair}, args)


if __name__ == "__main__":
    main()
