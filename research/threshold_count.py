"""The confidence threshold of the confident-error count, on backdoors poisoned at a realistic rate (research)

The default detector counts, per ordered class pair, the test samples given to the other
class with softmax >= 0.95 (docs/method.md §2.2b). On the held-out zoo `zoo/lowratio.toml`
(2 poisoned samples per batch instead of the study's third of every batch) it finds 4 of 7
backdoors: a backdoor learned from a few samples per batch sends its 15-18 test samples to
the target less often and less confidently, and the few errors it adds drown in the pair's
natural confusions. This script asks whether another threshold separates better, choosing on
the dev zoos (`dev`, `lowratio_dev`) and reporting on the others.

Phase ``count`` (per model, one thread per job): softmax on the test split, with the
batch-norm statistics as trained (``none``) and re-estimated on the defender's 5% clean
subset (``bn``, the product's default, :func:`soda_backdoor.utils.recalibrated_batchnorm`);
for each threshold of ``THRESHOLDS`` the count matrix. Rows go to a JSONL cache as they
finish. Phase ``analyse``: per setting and threshold, a reference of the ``--reference``
zoos' clean models counted the same way, the default verdict (nbpair null, tau 2.99, errors
only), and per zoo: clean models flagged, backdoors (ASR >= 0.5) flagged with the right
target and source, AUC of the model score.

Usage:
    python research/threshold_count.py count --zoos reference_wide reference_wide2 dev \\
        lowratio_dev test lowratio --cache research/results/threshold_counts.jsonl --jobs 2
    python research/threshold_count.py analyse --cache research/results/threshold_counts.jsonl --json research/results/threshold_count.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from soda_backdoor.data import load_dataset
from soda_backdoor.data.datasets import normalize
from soda_backdoor.detection.errors import ErrorConfig, ErrorCounts, build_reference, detect_errors
from soda_backdoor.models.io import load_model
from soda_backdoor.utils import inference_view, recalibrated_batchnorm

from anneal_count import ZOOS, _data, rows_of  # research/anneal_count.py: the zoos and the defender data
from provenance import write_record  # research/provenance.py

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)


@torch.no_grad()
def counts_at(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, list]:
    """The count matrix at every threshold of ``THRESHOLDS`` from one pass."""
    with inference_view(module) as fast:
        p = torch.cat([fast(x[i:i + 1000]).float().softmax(1) for i in range(0, len(x), 1000)])
    out = {}
    for th in THRESHOLDS:
        c = torch.zeros(k, k, dtype=torch.long).index_add_(0, y, (p >= th).long())
        c.fill_diagonal_(0)
        out[str(th)] = c.tolist()
    return out


def count_one(task: tuple[str, dict]) -> dict:
    torch.set_num_threads(1)
    zoo, row = task
    d = _data()
    data = d["data"]
    loaded = load_model(ZOOS / zoo / row["file"])
    meta = loaded.meta
    xt = normalize(data.x_test, meta.mean, meta.std)
    t0 = time.perf_counter()
    counts = {"none": counts_at(loaded.module, xt, data.y_test, data.num_classes),
              "bn": counts_at(recalibrated_batchnorm(loaded.module, normalize(d["xd"], meta.mean, meta.std)),
                              xt, data.y_test, data.num_classes)}
    return {"zoo": zoo, "key": row["key"], "arch": row["arch"], "attack": row["attack"], "source": row.get("source"),
            "target": row.get("target"), "asr": row["asr"], "acc": row["acc"], "ratio": row["config"]["train"]["ratio"],
            "counts": counts, "seconds": time.perf_counter() - t0}


def cmd_count(args) -> None:
    cache = Path(args.cache)
    done = set()
    if cache.exists():
        done = {(r["zoo"], r["key"]) for r in map(json.loads, cache.read_text().splitlines())}
    tasks = [(z, r) for z in args.zoos for r in rows_of(z) if (z, r["key"]) not in done]
    print(f"{len(tasks)} models to count ({len(done)} cached)", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool, cache.open("a") as fh:
        for i, rec in enumerate(pool.map(count_one, tasks), 1):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(f"[{i}/{len(tasks)}] {rec['zoo']:16} {rec['key'][:8]} {rec['arch']:5} {rec['attack']:18} "
                  f"{rec['seconds']:.1f}s", flush=True)


def _auc(y: list[int], s: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score
    return round(float(roc_auc_score(y, np.minimum(s, 1e6))), 3) if 0 < sum(y) < len(y) else None


def cmd_analyse(args) -> None:
    rows = [json.loads(line) for line in Path(args.cache).read_text().splitlines()]
    totals = tuple(int(v) for v in torch.bincount(load_dataset("fmnist").y_test, minlength=10))
    config = ErrorConfig(variation_tau=0.0)
    out, summary = [], []
    for setting in ("none", "bn"):
        for th in THRESHOLDS:
            def ec(r):
                return ErrorCounts(tuple(map(tuple, r["counts"][setting][str(th)])), totals, th)
            refs = [(ec(r), r["arch"], f"{r['zoo']}/{r['key']}") for r in rows
                    if r["zoo"] in args.reference and r["attack"] == "none"]
            ref = build_reference(refs, "fmnist")
            print(f"\n== {setting}, threshold {th}: reference of {len(refs)} clean models ({', '.join(args.reference)})")
            for zoo in [z for z in dict.fromkeys(r["zoo"] for r in rows) if z not in args.reference]:
                ys, ss, fp, nclean, hit, src, nbd, missed = [], [], [], 0, 0, 0, 0, []
                for r in (r for r in rows if r["zoo"] == zoo):
                    bd = r["attack"] != "none"
                    if bd and r["asr"] < args.min_asr:
                        continue
                    det = detect_errors(ec(r), ref.entry(r["arch"]), config)
                    ys.append(int(bd))
                    ss.append(det.score)
                    found = [s for s, t in det.pairs if t == r["target"]]
                    if bd:
                        nbd += 1
                        hit += bool(found)
                        src += bool(found) and found[0] == r["source"]
                        if not found:
                            missed.append(f"{r['key'][:8]} {r['arch']} {r['attack']} {det.class_scores[r['target']]:.1f}")
                    else:
                        nclean += 1
                        if det.backdoor:
                            fp.append(f"{r['key'][:8]} {r['arch']} {det.pairs[0]} {det.score:.1f}")
                    out.append({"setting": setting, "threshold": th, "zoo": zoo, "key": r["key"], "arch": r["arch"],
                                "attack": r["attack"], "asr": r["asr"], "score": det.score, "flagged": det.backdoor,
                                "pairs": det.pairs, "source": r["source"], "target": r["target"],
                                "target_score": None if not bd else det.class_scores[r["target"]]})
                line = {"setting": setting, "threshold": th, "zoo": zoo, "auc": _auc(ys, ss),
                        "clean_flagged": len(fp), "clean": nclean, "right_target": hit, "right_source": src,
                        "backdoored": nbd}
                summary.append(line)
                print(f"{zoo:16} AUC {line['auc']}  clean flagged {len(fp)}/{nclean}  right target {hit}/{nbd}  "
                      f"right source {src}/{hit}  | false alarms: {'; '.join(fp) or '-'} | missed: {'; '.join(missed) or '-'}")
    if args.json:
        write_record(args.json, {"summary": summary, "models": out}, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count")
    c.add_argument("--zoos", nargs="+", required=True)
    c.add_argument("--cache", required=True)
    c.add_argument("--jobs", type=int, default=2)
    a = sub.add_parser("analyse")
    a.add_argument("--cache", required=True)
    a.add_argument("--reference", nargs="+", default=["reference_wide", "reference_wide2"])
    a.add_argument("--min-asr", type=float, default=0.5, help="backdoors below this ASR do not count")
    a.add_argument("--json")
    args = ap.parse_args()
    cmd_count(args) if args.cmd == "count" else cmd_analyse(args)


if __name__ == "__main__":
    main()
