"""``soda audit``: scan folders (or a manifest) of model files for semantic backdoors."""

from __future__ import annotations

import argparse
import sys

from .main import CALIBRATION_HELP, DEFAULT_CALIBRATION

AUDIT_EXAMPLES = """examples:
  soda audit zoos/dev/models --dataset fmnist --out audits/dev --jobs 2
  soda audit --manifest zoos/dev/manifest.jsonl --out audits/dev      # columns: file, arch, dataset, ...
  soda audit hub/ --arch cnn --dataset fmnist --out audits/hub --backend ray --ray-address auto
  soda audit hub/ --dataset fmnist --out audits/hub --repair          # also repair every flagged model
Rerunning the same command audits only the files not yet in OUT/audit.jsonl (and retries failures).
"""


def add_audit_parser(sub, parser_class, common, detect_args, recon_args, repair_args) -> None:
    """Register ``soda audit``."""
    p = sub.add_parser("audit", help="scan a folder (or manifest) of models for semantic backdoors",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=AUDIT_EXAMPLES)
    p.add_argument("paths", nargs="*", metavar="PATH", help="model files, or folders searched for them")
    g = p.add_argument_group("audit")
    g.add_argument("--manifest", default=None, help="JSON-lines list of models (a zoo's manifest.jsonl): "
                   "'file' and optionally 'arch', 'dataset', 'data_dir', 'attack', 'attack_file'")
    g.add_argument("--out", required=True, help="audit folder: audit.jsonl, audit.csv, audit.html, models/")
    g.add_argument("--arch", default=None, help="architecture of state_dicts without metadata")
    g.add_argument("--jobs", type=int, default=1, help="models at once, one thread each (default 1)")
    g.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local process pool, or Ray tasks (pip install 'soda-backdoor[ray]')")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto': this machine's); "
                   "default: start a local Ray with --jobs CPUs")
    g.add_argument("--gpus-per-job", type=float, default=None, help="GPUs per Ray task (default: 1 with CUDA)")
    g.add_argument("--repair", action="store_true", help="reconstruct and repair every flagged model")
    g.add_argument("--calibration", default=DEFAULT_CALIBRATION, help="each model's P(backdoor) in the "
                   f"probability column (models already audited keep their row): {CALIBRATION_HELP}")
    common(p)
    detect_args(p)
    recon_args(p)
    repair_args(p)
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args) -> int:
    from ..audit import AuditConfig, run_audit
    from ..errors import UserInputError
    from ..utils import write_json
    from .main import _detection_config, _recon_config, _repair_config

    if args.effects:
        raise UserInputError("--effects is per model; the audit writes each model's report to OUT/models/")
    config = AuditConfig(out_dir=args.out, paths=tuple(args.paths), manifest=args.manifest, dataset=args.dataset,
                         data_dir=args.data_dir, attack=args.attack, attack_file=args.attack_file, arch=args.arch,
                         detection=_detection_config(args), layer=args.layer, jobs=args.jobs, backend=args.backend,
                         ray_address=args.ray_address, gpus_per_job=args.gpus_per_job, device=args.device,
                         seed=args.seed, repair=args.repair, reconstruction=_recon_config(args),
                         repair_config=_repair_config(args), calibration=args.calibration,
                         reference=args.reference)

    def progress(row, done, total):
        if args.quiet:
            return
        what = {"backdoor": "BACKDOOR " + ", ".join(f"{s} -> {t}" for s, t in row["pairs"]),
                "clean": "clean", "error": f"ERROR: {row['error']}"}[row["verdict"]]
        mx = f" (score {row['score']:.2f}, {row['evidence']})" if row.get("score") is not None else ""
        print(f"[{done}/{total}] {row['file']}: {what}{mx} in {row['seconds']:.1f}s", file=sys.stderr, flush=True)

    rep = run_audit(config, progress)
    if args.json:
        from dataclasses import asdict

        write_json(args.json, asdict(rep))
    print(f"audit: {rep.found} models ({rep.skipped} already audited, {rep.audited} audited, {rep.flagged} flagged, "
          f"{rep.failed} errors) in {rep.seconds:.0f}s -> {rep.out_dir}/audit.html")
    return 0
