"""`soda audit` against a shell loop of `soda detect`, on the same model files, in one run.

The loop is what a user without the audit writes: one `soda detect` process per model, one
after the other (Python, torch and the dataset loaded every time). The audit loads them once
per worker and runs ``--jobs`` workers, one thread each. Both run with one torch thread per
process, so the audit's gain is its parallelism times what it saves per model.

Models: the first N ``models/*.safetensors`` of a built zoo (``--zoo``); when it holds fewer,
seeded untrained models of ``--arch`` fill up to N (detection takes the same time on any
weights of an architecture; the JSON says how many of each were used).

Usage:
    python benchmarks/bench_audit.py [--zoo zoos/dev] [-n 10] [--jobs 2] [--dataset fmnist]
        [--data-dir DIR] [--arch cnn] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def collect_models(zoo: str | None, n: int, arch: str, folder: Path) -> tuple[list[Path], int]:
    """Up to ``n`` zoo models linked into ``folder``, filled with untrained ones; how many came from the zoo."""
    from soda_backdoor.data import get_dataset_spec
    from soda_backdoor.models import ModelMeta, create_model, save_model

    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(Path(zoo, "models").glob("*.safetensors"))[:n] if zoo else []
    paths = []
    for p in found:
        dst = folder / p.name
        shutil.copyfile(p, dst)
        paths.append(dst)
    spec = get_dataset_spec("fmnist")
    for seed in range(n - len(paths)):
        torch.manual_seed(1000 + seed)
        dst = folder / f"untrained-{arch}-{seed}.safetensors"
        save_model(dst, create_model(arch, spec.num_classes, spec.in_channels, spec.image_size),
                   ModelMeta(arch=arch, num_classes=spec.num_classes, in_channels=spec.in_channels,
                             input_size=spec.image_size, mean=spec.mean, std=spec.std, dataset=spec.name))
        paths.append(dst)
    return paths, len(found)


def _soda(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "soda_backdoor", *args]


def run_loop(models: list[Path], dataset: str, data_dir: str | None, out: Path) -> tuple[float, list[dict]]:
    """`soda detect` once per model, in sequence; wall seconds and each JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--data-dir", data_dir] if data_dir else []
    results = []
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        js = out / f"{i}.json"
        subprocess.run(_soda(["detect", "--model", str(m), "--dataset", dataset, *extra, "--device", "cpu", "--quiet",
                              "--json", str(js)]), check=True, stdout=subprocess.DEVNULL)
        results.append(json.loads(js.read_text()))
    return time.perf_counter() - t0, results


def run_audit_cli(folder: Path, dataset: str, data_dir: str | None, jobs: int, out: Path) -> tuple[float, dict]:
    """`soda audit` over the folder; wall seconds and its rows by file."""
    extra = ["--data-dir", data_dir] if data_dir else []
    t0 = time.perf_counter()
    subprocess.run(_soda(["audit", str(folder), "--dataset", dataset, *extra, "--out", str(out), "--jobs", str(jobs),
                          "--device", "cpu", "--quiet"]), check=True, stdout=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines() if line.strip()]
    return secs, {r["file"]: r for r in rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default=None, help="a built zoo folder (its models/*.safetensors)")
    p.add_argument("-n", "--num-models", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default="cnn", help="architecture of the untrained fill-up models")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # every process below: one torch thread
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_audit-"))
    try:
        models, from_zoo = collect_models(args.zoo, args.num_models, args.arch, work / "models")
        loop_s, loop = run_loop(models, args.dataset, args.data_dir, work / "loop")
        audit_s, rows = run_audit_cli(work / "models", args.dataset, args.data_dir, args.jobs, work / "audit")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    same = sum(rows[str(m)]["verdict"] == ("backdoor" if r["backdoor"] else "clean")
               and rows[str(m)]["pairs"] == [[q["source"], q["target"]] for q in r["pairs"]]
               for m, r in zip(models, loop))
    n = len(models)
    detect_in_process = [r["seconds"] for r in loop]
    res = {"models": n, "from_zoo": from_zoo, "untrained_fill": n - from_zoo, "jobs": args.jobs,
           "loop_seconds": loop_s, "audit_seconds": audit_s,
           "loop_models_per_min": 60 * n / loop_s, "audit_models_per_min": 60 * n / audit_s,
           "ratio": loop_s / audit_s, "verdicts_identical": same,
           "loop_seconds_per_model": loop_s / n,
           "detect_seconds_in_process": sum(detect_in_process) / n,
           "audit_worker_detect_seconds": sum(r["detect_seconds"] for r in rows.values()) / n,
           "audit_data_seconds_total": sum(r["data_seconds"] for r in rows.values()),
           "cpus": os.cpu_count(), "torch": torch.__version__}
    print(f"{n} models ({from_zoo} from the zoo, {n - from_zoo} untrained), {args.jobs} audit workers, "
          f"1 torch thread per process, {os.cpu_count()} CPUs")
    print(f"{'':<34}{'seconds':>9}{'models/min':>12}")
    print(f"{'shell loop of soda detect':<34}{loop_s:>9.1f}{res['loop_models_per_min']:>12.1f}")
    print(f"{f'soda audit --jobs {args.jobs}':<34}{audit_s:>9.1f}{res['audit_models_per_min']:>12.1f}")
    print(f"ratio (audit / loop throughput): {res['ratio']:.2f}x; identical verdicts: {same}/{n}")
    print(f"per model: loop {res['loop_seconds_per_model']:.2f}s wall ({res['detect_seconds_in_process']:.2f}s of it in "
          f"run_detect), audit worker {res['audit_worker_detect_seconds']:.2f}s detect "
          f"+ {res['audit_data_seconds_total']:.1f}s data loading in all")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
