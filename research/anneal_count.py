"""Anneal, then count: do a clean model's confident-error pile-ups melt under a short low-lr fine-tune? (research)

The confident-error evidence's false alarms on held-out zoos are mostly clean models trained
*without learning-rate decay* (docs/detection.md, "Recipes without learning-rate decay"):
an undecayed model sits at a noisy point of its training, and its confident errors pile onto
one natural confusion (66 shirts -> T-shirt). A semantic backdoor is a mapping learned from
relabelled training data; fine-tuning on clean data at a small learning rate is known not to
remove it (the `finetune` baseline, 10 epochs at lr 0.01, removes 2 of 16 on test:
docs/baselines.md). So a short anneal on the defender's clean data should lower an
undecayed model's pile-up (it is what decay would have done) and leave a backdoor's errors.

A second reading of the first results: on `cnn` (batch-norm) the anneal sharpened backdoors,
on `lenet` (none) it blurred them; setting ``bn`` only re-estimates the batch-norm statistics
on the defender data, ``LR:EPOCHS:frozen`` anneals the weights with batch-norm frozen.

Phase ``count`` (per model, one thread per job): the confident errors (softmax >= 0.95) per
ordered pair on the test split, before and after each anneal setting ``LR:EPOCHS`` (SGD,
momentum 0.9, weight decay 5e-4, batch 64, batch-norm in train mode, on the seeded 5% of
the train split that the repair uses as defender data). Rows go to a JSONL cache as they
finish (nothing lost on interruption). Phase ``analyse``: for every setting (and "none", no
anneal), a reference built from the same setting's counts of the ``--reference`` zoos' clean
models, the default error verdict (nbpair null, tau 2.99, errors only), and per zoo the
clean models flagged, backdoors found with the right target, and AUC; also for ``min:LR:EPOCHS``,
each pair's count the smaller of before and after (an error pile-up must be there before the
anneal and survive it).

Usage:
    python research/anneal_count.py count --zoos reference_wide reference_wide2 dev --cache R/anneal.jsonl --jobs 2
    python research/anneal_count.py analyse --cache R/anneal.jsonl --reference reference_wide reference_wide2 \\
        --json research/results/anneal_count.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from soda_backdoor.data import load_dataset
from soda_backdoor.data.datasets import normalize
from soda_backdoor.data.splits import make_splits
from soda_backdoor.detection.errors import (ErrorConfig, ErrorCounts, build_reference, confident_errors, detect_errors,
                                           shipped_reference)
from soda_backdoor.models.io import load_model

from provenance import write_record  # research/provenance.py

ZOOS = Path("/work/zoos")
THRESHOLD = 0.95
_DATA = {}


def rows_of(zoo: str) -> list[dict]:
    return [json.loads(line) for line in (ZOOS / zoo / "manifest.jsonl").read_text().splitlines()]


def _data():
    if not _DATA:
        data = load_dataset("fmnist")
        idx = make_splits(data, None, seed=0).defender
        _DATA.update(data=data, xd=data.x_train[idx], yd=data.y_train[idx])
    return _DATA


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Batch-norm running statistics re-estimated on ``x`` (cumulative average), no weight changes."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(x), 64):
        model(x[i:i + 64])
    model.eval()


def anneal(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, epochs: int, seed: int = 0,
           bn_train: bool = True) -> None:
    """SGD at a small constant ``lr`` for ``epochs`` passes over ``(x, y)``, batch-norm in train
    mode (or frozen in eval mode with ``bn_train=False``)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train(bn_train)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            if len(b) < 2:
                continue
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def count_one(task: tuple[str, dict, list[str]]) -> dict:
    torch.set_num_threads(1)
    zoo, row, settings = task
    d = _data()
    data = d["data"]
    loaded = load_model(ZOOS / zoo / row["file"])
    meta = loaded.meta
    xt = normalize(data.x_test, meta.mean, meta.std)
    xd = normalize(d["xd"], meta.mean, meta.std)
    out = {"zoo": zoo, "key": row["key"], "arch": row["arch"], "attack": row["attack"], "source": row.get("source"),
           "target": row.get("target"), "asr": row["asr"], "acc": row["acc"],
           "gamma": row["config"]["train"]["gamma"], "counts": {}}
    out["counts"]["none"] = confident_errors(loaded.module, xt, data.y_test, data.num_classes, THRESHOLD).counts
    t0 = time.perf_counter()
    for s in settings:
        m = copy.deepcopy(loaded.module)
        if s == "bn":
            recalibrate_bn(m, xd)
        else:
            lr, ep, *mode = s.split(":")
            anneal(m, xd, d["yd"], float(lr), int(ep), bn_train=mode != ["frozen"])
        out["counts"][s] = confident_errors(m, xt, data.y_test, data.num_classes, THRESHOLD).counts
    out["anneal_seconds"] = time.perf_counter() - t0
    return out


def cmd_count(args) -> None:
    cache = Path(args.cache)
    done = set()
    if cache.exists():
        done = {(r["zoo"], r["key"]) for r in map(json.loads, cache.read_text().splitlines())}
    tasks = [(z, r, args.settings) for z in args.zoos for r in rows_of(z) if (z, r["key"]) not in done]
    print(f"{len(tasks)} models to count ({len(done)} cached)", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool, cache.open("a") as fh:
        for i, rec in enumerate(pool.map(count_one, tasks), 1):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            top = {s: int(np.max(c)) for s, c in rec["counts"].items()}
            print(f"[{i}/{len(tasks)}] {rec['zoo']:16} {rec['key'][:8]} {rec['arch']:5} {rec['attack']:18} "
                  f"gamma {rec['gamma']:<4} top {top}  {rec['anneal_seconds']:.1f}s", flush=True)


def _auc(y: list[int], s: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, np.minimum(s, 1e6))) if 0 < sum(y) < len(y) else None


def cmd_analyse(args) -> None:
    merged: dict[tuple[str, str], dict] = {}
    for cache in args.cache:
        for r in map(json.loads, Path(cache).read_text().splitlines()):
            merged.setdefault((r["zoo"], r["key"]), r)["counts"].update(r["counts"])
    rows = list(merged.values())
    totals = tuple(int(v) for v in torch.bincount(load_dataset("fmnist").y_test, minlength=10))
    for r in rows:  # min(before, after): what survives the anneal and was there before it
        for k in [k for k in r["counts"] if k != "none" and not k.startswith("min:")]:
            r["counts"][f"min:{k}"] = np.minimum(r["counts"]["none"], r["counts"][k]).tolist()
    settings = list(rows[0]["counts"])
    config = ErrorConfig(variation_tau=0.0)
    out = []
    for s in settings:
        def ec(r):
            return ErrorCounts(tuple(map(tuple, r["counts"][s])), totals, THRESHOLD)
        refs = [(ec(r), r["arch"], f"{r['zoo']}/{r['key']}") for r in rows
                if r["zoo"] in args.reference and r["attack"] == "none"]
        ref = shipped_reference() if args.shipped else build_reference(refs, "fmnist")
        print(f"\n== anneal {s}: reference of "
              + ("the shipped reference (counts without anneal)" if args.shipped else
                 f"{len(refs)} clean models ({', '.join(args.reference)}), same setting"))
        for zoo in [z for z in dict.fromkeys(r["zoo"] for r in rows) if z not in args.reference]:
            ys, ss, fp, nclean, hit, nbd = [], [], [], 0, 0, 0
            for r in rows:
                if r["zoo"] != zoo or s not in r["counts"]:
                    continue
                det = detect_errors(ec(r), ref.entry(r["arch"]), config)
                bd = r["attack"] != "none"
                if bd and r["asr"] < args.min_asr:
                    continue
                ys.append(int(bd))
                ss.append(det.score)
                pair = det.pairs[0] if det.pairs else None
                if bd:
                    nbd += 1
                    hit += int(det.backdoor and any(t == r["target"] for _, t in det.pairs))
                else:
                    nclean += 1
                    if det.backdoor:
                        fp.append(f"{r['key'][:8]} {r['arch']} g{r['gamma']} {pair} {det.score:.1f}")
                out.append({"setting": s, "zoo": zoo, "key": r["key"], "arch": r["arch"], "attack": r["attack"],
                            "gamma": r["gamma"], "asr": r["asr"], "score": det.score, "flagged": det.backdoor,
                            "pairs": det.pairs, "target": r["target"]})
            print(f"{zoo:16} AUC {_auc(ys, ss) if _auc(ys, ss) is None else round(_auc(ys, ss), 3)}  "
                  f"clean flagged {len(fp)}/{nclean}  right target {hit}/{nbd}  {'; '.join(fp)}")
    if args.json:
        write_record(args.json, out, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count")
    c.add_argument("--zoos", nargs="+", required=True)
    c.add_argument("--settings", nargs="+", default=["0.002:1", "0.01:1", "0.01:3"], help="LR:EPOCHS, LR:EPOCHS:frozen (batch-norm in eval mode), or bn (batch-norm statistics "
                   "re-estimated on the defender data, no weight change)")
    c.add_argument("--cache", required=True)
    c.add_argument("--jobs", type=int, default=2)
    a = sub.add_parser("analyse")
    a.add_argument("--cache", nargs="+", required=True, help="count caches, merged per model")
    a.add_argument("--reference", nargs="+", default=["reference_wide", "reference_wide2"])
    a.add_argument("--shipped", action="store_true", help="score against the shipped reference instead")
    a.add_argument("--min-asr", type=float, default=0.5, help="backdoors below this ASR do not count")
    a.add_argument("--json")
    args = ap.parse_args()
    cmd_count(args) if args.cmd == "count" else cmd_analyse(args)


if __name__ == "__main__":
    main()
