"""How many samples per class the ``fastest`` source rule needs: source accuracy and seconds.

For every working backdoor of a built zoo (ASR >= 0.5), the source rule runs for the true
target with ``source_samples`` in ``--samples``; the record has the chosen source and the
seconds per model and setting. The default is chosen on the dev zoo; test is reported.
Why: the rule's cost is samples x steps forward and backward passes, which dominates
detection on large models (docs/benchmarks.md).

Usage: python research/source_samples.py ZOO_DIR [ZOO_DIR ...] --out research/results/source_samples.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from soda_backdoor.detection import DetectionConfig
from soda_backdoor.detection.detector import SourceEvidence, get_source_rule, mean_logits
from soda_backdoor.workflow import class_inputs, open_model
from soda_backdoor.zoo import read_manifest
from soda_backdoor.zoo.build import worker_context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rule", default="fastest")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for zoo in a.zoos:
        for m in read_manifest(Path(zoo)).values():
            if m["attack"] == "none" or m["asr"] < 0.5:
                continue
            ctx = worker_context(m["dataset"], m.get("data_dir") or None, m["attack"], m.get("attack_file") or None)
            model = open_model(str(Path(zoo) / m["file"]), ctx.data, torch.device("cpu"))
            base = DetectionConfig(source_rule=a.rule)
            inputs = class_inputs(ctx, model.meta, base.attribution.num_samples, torch.device("cpu"))
            e = mean_logits(model.module, inputs, ctx.data.num_classes)
            row = {"zoo": Path(zoo).name, "key": m["key"], "arch": m["arch"], "attack": m["attack"],
                   "source": m["source"], "target": m["target"], "by_samples": {}}
            for n in a.samples:
                cfg = replace(base, source_samples=n)
                t0 = time.perf_counter()
                scores, _, _ = get_source_rule(a.rule)(SourceEvidence(model.module, inputs, m["target"],
                                                                      ctx.data.num_classes, e, cfg))
                scores[m["target"]] = -float("inf")
                row["by_samples"][n] = {"source": int(scores.argmax()), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(row["zoo"], row["arch"], row["attack"], row["source"],
                  {n: v["source"] for n, v in row["by_samples"].items()}, flush=True)
    summary = {}
    for zoo in sorted({r["zoo"] for r in rows}):
        rz = [r for r in rows if r["zoo"] == zoo]
        summary[zoo] = {n: {"right": sum(r["by_samples"][n]["source"] == r["source"] for r in rz), "of": len(rz),
                            "median_s": sorted(r["by_samples"][n]["seconds"] for r in rz)[len(rz) // 2]}
                        for n in a.samples}
    print(json.dumps(summary, indent=1))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(a.out).write_text(json.dumps({"config": vars(a), "summary": summary, "rows": rows, "commit": commit,
                                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "machine": platform.machine()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
