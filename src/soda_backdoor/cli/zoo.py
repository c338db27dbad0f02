"""``soda zoo build``, ``score``, ``calibrate`` and ``repair``: populations of models, and a detector scored on them."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .main import CALIBRATION_HELP, DEFAULT_CALIBRATION

ZOO_EXAMPLES = """examples:
  soda zoo build zoo/dev.toml --out zoos/dev --jobs 2
  soda zoo build zoo/dev.toml --out /shared/zoos/dev --jobs 40 --backend ray --ray-address auto
  soda zoo score zoos/dev --json zoos/dev/score.json
  soda zoo score zoos/dev --tau-target 3.5 --json s35.json     # any `soda detect` option
  soda zoo score zoos/dev --detector nc                         # the Neural Cleanse baseline
  soda zoo reference zoos/reference --out ref.json              # the confident-error null from clean models
  soda zoo calibrate zoos/dev --out calib.json                  # P(backdoor) fitted on dev's scores
  soda zoo calibrate zoos/dev zoos/lowratio_dev --out calib.json  # ... on two dev zoos' models together
  soda zoo score zoos/test --calibration calib.json             # its log loss and Brier on test
  soda zoo repair zoos/dev --methods soda finetune fineprune nad anp --json repair.json
"""


def add_zoo_parser(sub, parser_class, common, detect_args) -> None:
    """Register ``soda zoo`` with its verbs."""
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
    s.add_argument("--calibration", default=DEFAULT_CALIBRATION, help="add each model's P(backdoor), its log loss "
                   f"and Brier score, and a reliability plot: {CALIBRATION_HELP} (the default applies to --detector "
                   "soda with the settings it was fitted on)")
    s.add_argument("--reliability", default=None, help="reliability plot PNG (default: reliability-<detector>.png "
                   "next to the ROC curve)")
    common(s, data=False)
    detect_args(s)
    s.set_defaults(func=_cmd_zoo_score)
    c = verbs.add_parser("calibrate", help="fit P(backdoor) and P(class is the target) to zoos' scores",
                         description="Score the zoos as `soda zoo score` does (cached), then fit a logistic map "
                                     "(Platt scaling, regularised) from the detector's scores to probabilities over "
                                     "all their models, per architecture where they hold enough models of it, "
                                     "pooled otherwise. Fit on dev zoos; measure with `soda zoo score TEST "
                                     "--calibration` (docs/zoo.md).")
    c.add_argument("dirs", nargs="+", metavar="dir", help="folders written by `soda zoo build` (dev zoos; their "
                   "models are fitted together)")
    c.add_argument("--out", required=True, help="the calibration (JSON), for `soda detect --calibration`")
    c.add_argument("--detector", default="soda", choices=["soda", "nc"], help="whose scores: soda (default) or nc")
    c.add_argument("--jobs", type=int, default=1, help="detections at once, one thread each (default 1)")
    c.add_argument("--min-models", type=int, default=4, help="clean and backdoored models an architecture needs "
                   "for its own fit; with fewer it uses the fit over every model (default 4)")
    c.add_argument("--pooled", action="store_true", help="one fit over every model for every architecture")
    c.add_argument("--transform", default=None, choices=["log", "identity"],
                   help="how the maps read a score: log, sign(s) log(1 + |s|) (default; the evidence has a heavy "
                        "tail), or identity (the raw score, as calibrations before 2026-12-02)")
    common(c, data=False)
    detect_args(c)
    c.set_defaults(func=_cmd_zoo_calibrate)
    f = verbs.add_parser("reference", help="measure the clean models of zoos: the null of the detection's "
                         "evidence (confident errors and variation rates)",
                         description="For every clean model of the zoos (backdoored ones are left out), count the "
                                     "samples of each class that it gives another class with softmax >= "
                                     "--threshold on the dataset's test split, pooled per architecture, and "
                                     "measure its variation rates on the defender's data (the largest of each "
                                     "pair is kept). `soda detect --reference F` compares a model with both "
                                     "(docs/detection.md). Build it from your own clean models, never from the "
                                     "models you evaluate.")
    f.add_argument("dirs", nargs="+", help="folders written by `soda zoo build` (one dataset)")
    f.add_argument("--out", required=True, help="the reference (JSON), for `soda detect --reference`")
    f.add_argument("--threshold", type=float, default=None, help="confidence from which an error counts "
                   "(default 0.95)")
    f.add_argument("--variation-copies", type=int, default=None, help="varied copies of each defender sample "
                   "for the variation rates (default 10, as the detection; 0: leave them out)")
    f.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="count each model's errors with its batch-norm statistics re-estimated on the defender's "
                        "data (default: yes, as the detection; use the detection's setting)")
    f.add_argument("--jobs", type=int, default=1, help="models at once, one thread each (default 1)")
    common(f, data=False)
    f.set_defaults(func=_cmd_zoo_reference)
    r = verbs.add_parser("repair", help="repair every working backdoor of a built zoo with each method")
    r.add_argument("dir", help="a folder written by `soda zoo build`")
    r.add_argument("--methods", nargs="+", default=["soda"],
                   help="repair methods: soda (detect, reconstruct, repair), finetune, fineprune, nad, anp "
                        "(default soda)")
    r.add_argument("--jobs", type=int, default=1, help="repairs at once, one thread each (default 1)")
    r.add_argument("--given-pair", action="store_true", help="soda repairs the true (source, target) pair of each "
                   "model instead of the detected one: the repair measured apart from the detection")
    r.add_argument("--repair-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a RepairConfig setting for soda, e.g. tune_from=auto or epochs=3 (repeatable; research)")
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


def _scored_zoo(args, zoo_dir: str | None = None):
    """Score the zoo ``zoo_dir`` (default ``args.dir``) as ``soda zoo score`` does (the same
    config, cache and progress lines)."""
    from ..zoo.score import score_zoo, settings_key
    from .main import _detection_config

    _check_jobs(args.jobs)
    if args.detector == "nc":
        from ..detection import NeuralCleanseConfig

        config = NeuralCleanseConfig(seed=args.seed)
        reference = None
    else:
        from ..detection.errors import shipped_reference
        from .main import _reference

        config = _detection_config(args)
        reference = (_reference(args) or shipped_reference()) if config.evidence == "errors" else None
    key = settings_key(config, args.layer, reference)

    def progress(row, done, total):
        if not args.quiet:
            what = f"score {row['score']:.2f}" if "error" not in row else f"FAILED: {row['error']}"
            print(f"[{done}/{total}] {row['key']}: {what}", file=sys.stderr, flush=True)

    return score_zoo(zoo_dir or args.dir, args.detector, config, args.layer, args.jobs, args.device, key, progress,
                     reference), key


def _cmd_zoo_score(args) -> int:
    from ..utils import write_json
    from ..zoo.score import apply_calibration, format_score, plot_reliability, plot_roc

    from ..artifacts import resolve_calibration
    from ..errors import UserInputError

    default = args.calibration == DEFAULT_CALIBRATION
    calibration = resolve_calibration(args.calibration) if not default or args.detector == "soda" else None
    if calibration is not None and calibration.detector != args.detector:
        raise UserInputError(f"{args.calibration} calibrates detector {calibration.detector}, not "
                             f"{args.detector} (--detector)")
    score, key = _scored_zoo(args)
    roc = args.roc or str(Path(args.dir) / f"roc-{args.detector}.png")
    plot_roc(score, roc)
    extra = {"roc_png": roc}
    if calibration is not None and calibration.detector_settings and calibration.detector_settings != key:
        why = f"the calibration was fitted on scores of other detector settings ({calibration.detector_settings}, " \
              f"these are {key})"
        if calibration.shipped:
            print(f"no probabilities: {why}; fit one with `soda zoo calibrate` and pass --calibration",
                  file=sys.stderr)
            calibration = None
        else:
            import warnings

            warnings.warn(why, stacklevel=1)
    if calibration is not None:
        score = apply_calibration(score, calibration)
        extra["reliability_png"] = args.reliability or str(Path(roc).with_name(f"reliability-{args.detector}.png"))
        plot_reliability(score, extra["reliability_png"])
        extra["calibration_file"] = str(args.calibration)
    if args.json:
        write_json(args.json, {**score.to_dict(), **extra, "run": _run_record(args)})
    print(format_score(score))
    print(f"ROC curve: {roc}")
    if "reliability_png" in extra:
        print(f"reliability plot: {extra['reliability_png']}")
    return 0


def _run_record(args) -> dict[str, object]:
    """What a JSON result needs to be rerun and compared: the command, the source commit, the
    torch version and threads, the machine and the time."""
    import datetime

    import torch

    from ..utils import environment, source_commit

    jobs = getattr(args, "jobs", 1) or 1
    return {"command": "soda " + " ".join(sys.argv[1:]), "commit": source_commit(), **environment(),
            "threads": 1 if jobs > 1 else torch.get_num_threads(), "jobs": jobs,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def _zoo_spec(root: Path, keys: list[str]) -> dict[str, str]:
    """The zoo's name and spec path (from DIR/spec.json) and a hash of its model keys."""
    spec = {}
    if (root / "spec.json").is_file():
        try:
            spec = json.loads((root / "spec.json").read_text())
        except (OSError, json.JSONDecodeError):
            spec = {}
    return {"name": str(spec.get("name", root.name)), "path": str(spec.get("path", "")),
            "hash": hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()[:16]}


def _cmd_zoo_calibrate(args) -> int:
    import torch

    from ..utils import source_commit

    from ..artifacts import save_calibration
    from ..detection import fit_calibration
    from ..detection.calibration import DEFAULT_TRANSFORM
    from ..errors import UserInputError
    from ..utils import write_json

    if args.min_models < 1:
        raise UserInputError(f"--min-models must be at least 1, got {args.min_models}")
    if len({Path(d).resolve() for d in args.dirs}) < len(args.dirs):
        raise UserInputError(f"a zoo is given twice: {' '.join(args.dirs)}")
    transform = args.transform or DEFAULT_TRANSFORM
    scored = [_scored_zoo(args, d) for d in args.dirs]
    key, score = scored[0][1], scored[0][0]  # one key: the same settings score every zoo
    specs = [_zoo_spec(Path(d), [r["key"] for r in s.rows]) for d, (s, _) in zip(args.dirs, scored)]
    spec = specs[0] if len(specs) == 1 else {
        "name": " + ".join(x["name"] for x in specs), "path": ", ".join(x["path"] for x in specs),
        "hash": hashlib.sha256(json.dumps([x["hash"] for x in specs]).encode()).hexdigest()[:16]}
    cal = fit_calibration([r for s, _ in scored for r in s.rows], args.detector, min_clean=args.min_models,
                          min_backdoored=args.min_models, pooled=args.pooled, transform=transform,
                          zoo=", ".join(map(str, args.dirs)),
                          zoo_spec=spec, detector_settings=key, settings=score.config, torch=torch.__version__,
                          commit=source_commit())
    save_calibration(args.out, cal)
    if args.json:
        write_json(args.json, cal.to_dict())
    print(f"calibration of {cal.describe()}")
    x = "log(1+{})" if transform == "log" else "{}"
    heads = (f"P(backdoor) = s(a*{x.format('score')} + b)", f"P(class = target) = s(a*{x.format('class score')} + b)")
    print(f"{'arch':<10}{'clean':>6}{'bd':>5}  {heads[0]:<40}{heads[1]:<34}")
    for a in cal.archs:
        maps = "".join(f"{f'a {m.slope:.3f}, b {m.intercept:.3f}' + (' (a<0->0)' if m.clamped else ''):<40}"
                       for m in (a.model, a.target))
        print(f"{a.arch:<10}{a.num_clean:>6}{a.num_backdoored:>5}  {maps}{'pooled' if a.pooled else ''}".rstrip())
    for note in cal.notes:
        print(f"  note: {note}")
    print(f"-> {args.out}")
    return 0


def _cmd_zoo_reference(args) -> int:
    from ..detection.errors import DEFAULT_THRESHOLD, ErrorConfig
    from ..zoo.reference import VARIATION_COPIES, build_zoo_reference

    _check_jobs(args.jobs)

    def progress(row, done, total):
        if not args.quiet:
            print(f"[{done}/{total}] {row['key']}: {sum(map(sum, row['counts']))} confident errors "
                  f"({row['seconds']:.1f}s)", file=sys.stderr, flush=True)

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    copies = VARIATION_COPIES if args.variation_copies is None else args.variation_copies
    recalibrate = ErrorConfig.recalibrate_bn if args.recalibrate_bn is None else args.recalibrate_bn
    ref = build_zoo_reference(args.dirs, threshold, args.jobs, args.device, progress, copies,
                              recalibrate_bn=recalibrate)
    ref.save(args.out)
    if args.json:
        from ..utils import write_json

        write_json(args.json, ref.to_dict())
    print(f"confident-error reference on {ref.dataset} at softmax >= {ref.threshold:g}:")
    for e in ref.entries:
        n = sum(map(sum, e.counts))
        print(f"  {e.arch}: {e.num_models} clean model(s), {n} confident errors in {sum(e.totals)} samples")
    v = ref.variations
    if v is not None:
        top = max((r, s, t) for s, row in enumerate(v.rate_max) for t, r in enumerate(row) if s != t)
        print(f"  variation rates: the largest of {v.num_models} clean model(s), {v.copies} copies at anchor "
              f"{v.anchor:g} (highest: {top[1]} -> {top[2]}, {top[0]:.3f})")
    failed = ref.provenance.get("left_out_failed_training", [])
    if failed:
        print(f"  left out: {len(failed)} clean model(s) whose training failed (accuracy < 0.5): {', '.join(failed)}")
    print(f"-> {args.out}")
    return 0


def _repair_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as RepairConfig fields, each value parsed as JSON when it parses (3, 0.5, null)."""
    import dataclasses
    import json

    from ..errors import UserInputError
    from ..repair import RepairConfig

    fields = {f.name for f in dataclasses.fields(RepairConfig)} - {"seed"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UserInputError(f"bad --repair-option {item!r}: use KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_zoo_repair(args) -> int:
    from ..utils import write_json
    from ..zoo.repair import format_repair, repair_zoo

    _check_jobs(args.jobs)

    def progress(row, done, total):
        if not args.quiet:
            what = (f"ASR {row['asr_before']:.2f} -> {row['asr_after']:.2f}, acc {row['acc_before']:.4f} -> "
                    f"{row['acc_after']:.4f}" if "error" not in row else f"FAILED: {row['error']}")
            print(f"[{done}/{total}] {row['key']}: {what}", file=sys.stderr, flush=True)

    result = repair_zoo(args.dir, tuple(args.methods), args.jobs, args.device, args.seed, progress,
                        args.given_pair, _repair_options(args.repair_option))
    if args.json:
        write_json(args.json, {**result, "run": _run_record(args)})
    print(format_repair(result))
    return 1 if result["errors"] else 0
