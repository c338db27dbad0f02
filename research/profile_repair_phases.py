"""Where the time of `soda repair` goes on one of the study's architectures (docs/benchmarks.md).

Times each phase of ``workflow.repair`` (the test passes before and after, measured together
since 2026-12-07 when the repair tuned only the tail; R-ASR, the mask's
attribution, the natural variations, the frozen part's single pass, the cut of the target's
links, the tuning) on the briefly trained state_dict of ``benchmarks/bench_study_archs.py``
(the same cache), after our reconstruction of 100 samples. Nothing is changed: each phase's
function is wrapped with a timer.

    python research/profile_repair_phases.py --arch resnet18 --out research/results/profile_repair_r18.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_study_archs import BRIEF, brief_model  # noqa: E402
from provenance import write_record  # noqa: E402

import soda_backdoor.repair.repair as repair_mod  # noqa: E402
import soda_backdoor.workflow.steps as steps_mod  # noqa: E402
from soda_backdoor.artifacts import SampleSet  # noqa: E402
from soda_backdoor.reconstruction import ReconstructionConfig  # noqa: E402
from soda_backdoor.repair import RepairConfig  # noqa: E402
from soda_backdoor.workflow import load_context, open_model  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def _timed(module, name: str, label: str) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - t0)

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--model", default=None, help="a state_dict (default: the benchmark's brief training)")
    ap.add_argument("--cache", default="runs/bench_study")
    ap.add_argument("--recon-steps", type=int, default=2000, help="the reconstruction's step budget")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ctx = load_context("fmnist", None, "stripet", None)
    n, epochs = BRIEF.get(a.arch, (20000, 1))
    path = a.model or str(brief_model(a.arch, ctx, n, epochs, Path(a.cache)))
    model = open_model(path, ctx.data, torch.device("cpu"), arch=a.arch)
    src, tgt = ctx.attack.source, ctx.attack.target
    t0 = time.perf_counter()
    rec = steps_mod.reconstruct(model, ctx, src, tgt, ReconstructionConfig(num_keep=100, steps=a.recon_steps))
    recon_s = time.perf_counter() - t0
    samples = SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint)

    for name, label in (("evaluate", "test pass (evaluate)"),
                        ("evaluate_attack_shared", "test passes before and after, the frozen part once"),
                        ("rasr", "R-ASR"),
                        ("compute_neuron_effects", "mask attribution"), ("class_inputs", "mask inputs"),
                        ("mine_variations", "natural variations"), ("repair_model", "repair_model (all)")):
        _timed(steps_mod, name, label)
    for name, label in (("run_batched", "frozen part, one pass"), ("cut_target_links", "cut target links"),
                        ("_tuned_part", "find the cut"), ("_feature_samples", "feature samples")):
        _timed(repair_mod, name, label)
    t0 = time.perf_counter()
    rep = steps_mod.repair(model, ctx, src, tgt, samples, RepairConfig())
    total = time.perf_counter() - t0
    phases = {k: sum(v) for k, v in TIMES.items()}
    inner = sum(v for k, v in phases.items() if k in ("frozen part, one pass", "cut target links", "find the cut",
                                                        "feature samples"))
    phases["tuning epochs (repair_model less the above)"] = phases.get("repair_model (all)", 0.0) - inner
    print(f"{a.arch}: reconstruct {recon_s:.1f} s; repair {total:.1f} s "
          f"(ASR {rep.before.asr:.3f} -> {rep.after.asr:.3f}, ACC {rep.before.acc:.4f} -> {rep.after.acc:.4f}; "
          f"{torch.get_num_threads()} threads)")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        calls = len(TIMES.get(k, [])) or ""
        print(f"  {k:<45}{v:8.1f} s {100 * v / total:5.1f}%  {calls}")
    if a.out:
        write_record(a.out, {"arch": a.arch, "model": path, "reconstruct_s": recon_s, "repair_s": total,
                             "phases_s": phases, "calls": {k: len(v) for k, v in TIMES.items()},
                             "before": {"acc": rep.before.acc, "asr": rep.before.asr},
                             "after": {"acc": rep.after.acc, "asr": rep.after.asr},
                             "tuned_from": rep.result.tuned_from, "n_varied": rep.n_varied}, a)


if __name__ == "__main__":
    main()
