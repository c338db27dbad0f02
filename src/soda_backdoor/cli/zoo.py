"""``soda zoo build`` and ``soda zoo score``: populations of models, and a detector scored on them."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict

ZOO_EXAMPLES = """examples:
  soda zoo build zoo/dev.toml --out zoos/dev --jobs 2
  soda zoo build zoo/dev.toml --out /shared/zoos/dev --jobs 40 --backend ray --ray-address auto
  soda zoo score zoos/dev --json zoos/dev/score.json
  soda zoo score zoos/dev --tau-target 3.5 --json s35.json     # any `soda detect` option
  soda zoo score zoos/dev --detector nc                         # the Neural Cleanse baseline
  soda zoo repair zoos/dev --methods soda finetune fineprune nad anp --json repair.json
"""


def add_zoo_parser(sub, parser_class, common, detect_args) -> None:
    """Register ``soda zoo`` with its two verbs."""
    p = sub.add_parser("zoo", help="build a population of models and score a detector on it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ZOO_EXAMPLES)
    verbs = p.add_subparsers(dest="zoo_command", required=True, parser_class=parser_class)
    b = verbs.add_parser("build", help="train every model of a zoo spec (resumable, parallel)")
    b.add_argument("spec", help="zoo spec (TOML; see docs/zoo.md)")
    b.add_argument("--out", required=True, help="zoo folder (models/, manifest.jsonl)")
    b.add_argument("--jobs", type=int, default=1, help="trainings at once, one thread each (default 1)")
    b.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local process pool, or Ray tasks (pip install 'soda-backdoor[ray]')")
    b.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto': this machine's); "
                   "default: start a local Ray with --jobs CPUs")
    common(b, data=False)
    b.set_defaults(func=_cmd_zoo_build)
    s = verbs.add_parser("score", help="run a detector on every model of a built zoo and score it")
    s.add_argument("dir", help="a folder written by `soda zoo build`")
    s.add_argument("--detector", default="soda", choices=["soda", "nc"],
                   help="detector to score: soda (default), or nc (Neural Cleanse, the trigger-inversion baseline)")
    s.add_argument("--jobs", type=int, default=1, help="detections at once, one thread each (default 1)")
    s.add_argument("--roc", default=None, help="ROC curve PNG (default DIR/roc-<detector>.png)")
    common(s, data=False)
    detect_args(s)
    s.set_defaults(func=_cmd_zoo_score)
    r = verbs.add_parser("repair", help="repair every working backdoor of a built zoo with each method")
    r.add_argument("dir", help="a folder written by `soda zoo build`")
    r.add_argument("--methods", nargs="+", default=["soda"],
                   help="repair methods: soda (detect, reconstruct, repair), finetune, fineprune, nad, anp "
                        "(default soda)")
    r.add_argument("--jobs", type=int, default=1, help="repairs at once, one thread each (default 1)")
    common(r, data=False)
    r.set_defaults(func=_cmd_zoo_repair)


def _check_jobs(jobs: int) -> None:
    from ..errors import UserInputError

    if jobs < 1:
        raise UserInputError(f"--jobs must be at least 1, got {jobs}")


def _cmd_zoo_build(args) -> int:
    from ..zoo import build_zoo, load_zoo_spec

    _check_jobs(args.jobs)
    if args.ray_address and args.backend != "ray":
        from ..errors import UserInputError

        raise UserInputError("--ray-address needs --backend ray")
    spec = load_zoo_spec(args.spec)

    def progress(row, done, total):
        if args.quiet:
            return
        what = (f"acc {row['acc']:.4f} asr {row['asr']:.3f} in {row['train_seconds']:.0f}s" if "error" not in row
                else f"FAILED: {row['error']}")
        print(f"[{done}/{total}] {row['arch']} {row['attack']} {row['key']}: {what}", file=sys.stderr, flush=True)

    rep = build_zoo(spec, args.out, args.jobs, args.device, progress, args.backend, args.ray_address)
    if args.json:
        from ..utils import write_json

        write_json(args.json, rep.to_dict())
    print(f"zoo {spec.name}: {rep.planned} models ({rep.skipped} already built, {rep.trained} trained, "
          f"{rep.failed} failed) in {rep.seconds:.0f}s -> {rep.out_dir}/manifest.jsonl")
    for e in rep.errors:
        print(f"  failed: {e}", file=sys.stderr)
    return 1 if rep.failed else 0


def _cmd_zoo_score(args) -> int:
    from pathlib import Path

    from ..utils import write_json
    from ..zoo.score import format_score, plot_roc, score_zoo
    from .main import _detection_config

    _check_jobs(args.jobs)
    if args.detector == "nc":
        from ..detection import NeuralCleanseConfig

        config = NeuralCleanseConfig(seed=args.seed)
    else:
        config = _detection_config(args)
    key = hashlib.sha256(json.dumps([asdict(config), args.layer], sort_keys=True).encode()).hexdigest()[:12]

    def progress(row, done, total):
        if not args.quiet:
            what = f"score {row['score']:.2f}" if "error" not in row else f"FAILED: {row['error']}"
            print(f"[{done}/{total}] {row['key']}: {what}", file=sys.stderr, flush=True)

    score = score_zoo(args.dir, args.detector, config, args.layer, args.jobs, args.device, key, progress)
    roc = args.roc or str(Path(args.dir) / f"roc-{args.detector}.png")
    plot_roc(score, roc)
    if args.json:
        write_json(args.json, {**score.to_dict(), "roc_png": roc})
    print(format_score(score))
    print(f"ROC curve: {roc}")
    return 0


def _cmd_zoo_repair(args) -> int:
    from ..utils import write_json
    from ..zoo.repair import format_repair, repair_zoo

    _check_jobs(args.jobs)

    def progress(row, done, total):
        if not args.quiet:
            what = (f"ASR {row['asr_before']:.2f} -> {row['asr_after']:.2f}, acc {row['acc_before']:.4f} -> "
                    f"{row['acc_after']:.4f}" if "error" not in row else f"FAILED: {row['error']}")
            print(f"[{done}/{total}] {row['key']}: {what}", file=sys.stderr, flush=True)

    result = repair_zoo(args.dir, tuple(args.methods), args.jobs, args.device, args.seed, progress)
    if args.json:
        write_json(args.json, result)
    print(format_repair(result))
    return 1 if result["errors"] else 0
