"""``run_audit``: every model file of a folder or manifest detected (and repaired), resumably.

``DIR/audit.jsonl`` gets one line per finished model, keyed by the file's SHA-256, appended as
each model finishes (an interrupted audit loses only the models in flight). A rerun skips the
files already audited without error and redoes the ones that failed. ``DIR/audit.csv`` and
``DIR/audit.html`` are rewritten from all lines at the end, ``DIR/models/<sha>.json`` holds
each model's full report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from ..artifacts import DEFAULT_CALIBRATION, resolve_calibration
from ..detection.errors import ErrorReference
from ..errors import UserInputError
from ..executor import BACKENDS, run_tasks
from ..utils import write_atomic
from ..zoo.build import append_jsonl, read_jsonl
from .report import audit_row, model_report, write_tables
from .scan import ModelFile, file_sha256, find_models, read_model_manifest
from .worker import AuditSettings, AuditTask, audit_model

logger = logging.getLogger(__name__)

AUDIT_LOG = "audit.jsonl"
REPORT_HASH_CHARS = 16


@dataclass(frozen=True, kw_only=True)
class AuditConfig(AuditSettings):
    """What to audit and how (how each model is read, detected and repaired: :class:`AuditSettings`).

    Attributes:
        out_dir: the audit folder (``audit.jsonl``, ``audit.csv``, ``audit.html``, ``models/``).
        paths: model files and folders (searched recursively for model files).
        manifest: a JSON-lines manifest of models (``soda zoo build``'s ``manifest.jsonl``).
        dataset: dataset the models classify (a manifest's ``dataset`` column wins).
        jobs: models at once, one thread each.
        backend: ``local`` or ``ray``.
        ray_address: Ray cluster to join (``auto``: this machine's); ``None`` starts a local one.
        gpus_per_job: GPUs each Ray task requests (``None``: 1 when ``device`` resolves to CUDA).
        calibration: each row's P(backdoor): ``default`` (the shipped calibration), a file from
            ``soda zoo calibrate``, or ``none``.
        reference: a reference from ``soda zoo reference``, its confident errors and variation rates
            (``None``: the shipped one).
    """

    out_dir: str
    paths: tuple[str, ...] = ()
    manifest: str | None = None
    dataset: str = "fmnist"
    jobs: int = 1
    backend: str = "local"
    ray_address: str | None = None
    gpus_per_job: float | None = None
    calibration: str | None = DEFAULT_CALIBRATION
    reference: str | None = None


@dataclass(frozen=True)
class AuditReport:
    """What an audit did.

    Attributes:
        out_dir: the audit folder.
        found: model files found (distinct contents).
        skipped: files already audited without error.
        audited: models detected in this run.
        flagged: of those, models with a backdoor verdict.
        failed: models that gave an error row in this run.
        seconds: wall time.
        errors: ``file: message`` for every failed model.
    """

    out_dir: str
    found: int
    skipped: int
    audited: int
    flagged: int
    failed: int
    seconds: float
    errors: tuple[str, ...] = ()


def _check(config: AuditConfig) -> None:
    from ..data import get_dataset_spec
    from ..models import get_model_spec

    if config.jobs < 1:
        raise UserInputError(f"--jobs must be at least 1, got {config.jobs}")
    if config.backend not in BACKENDS:
        raise UserInputError(f"unknown backend {config.backend!r}; valid: {', '.join(BACKENDS)}")
    if config.ray_address and config.backend != "ray":
        raise UserInputError("--ray-address needs --backend ray")
    if not config.paths and not config.manifest:
        raise UserInputError("nothing to audit: give model files or folders, or --manifest")
    get_dataset_spec(config.dataset)
    if config.arch:
        get_model_spec(config.arch)


def plan_tasks(config: AuditConfig) -> list[AuditTask]:
    """One task per distinct model file (by SHA-256) of the paths and the manifest."""
    files: list[ModelFile] = find_models(config.paths)
    if config.manifest:
        files += read_model_manifest(config.manifest)
    if not files:
        raise UserInputError(f"no model files ({', '.join(('.safetensors', '.pt', '.th', '...'))}) under "
                             f"{', '.join(config.paths) or config.manifest}")
    calibration = resolve_calibration(config.calibration)
    reference = ErrorReference.load(config.reference) if config.reference else None
    out, seen = [], set()
    models_dir = Path(config.out_dir) / "models"
    shared = [f.name for f in fields(AuditSettings)]  # a manifest row's own data and attack win
    for f in files:
        sha = file_sha256(f.path)
        if not sha:  # unreadable: its own error row, keyed by its path
            sha = "unreadable:" + str(Path(f.path).resolve())
        if sha in seen:
            logger.info("%s has the same content as a file already in the audit: skipped", f.path)
            continue
        seen.add(sha)
        settings = {k: getattr(config, k) for k in shared}
        settings.update((k, getattr(f, k)) for k in ("data_dir", "attack", "attack_file", "arch") if getattr(f, k))
        out.append(AuditTask(**settings, path=f.path, sha256=sha, dataset=f.dataset or config.dataset,
                             calibration=calibration, reference=reference,
                             repair_dir=str(models_dir / sha.removeprefix("unreadable:")[:REPORT_HASH_CHARS])))
    return out


def _gpus(config: AuditConfig) -> float:
    if config.gpus_per_job is not None:
        return config.gpus_per_job
    import torch

    return 1.0 if config.device != "cpu" and torch.cuda.is_available() else 0.0


def _shared_datasets(tasks: list[AuditTask]) -> dict[tuple[str, str], Any]:
    from ..data import load_dataset

    keys = sorted({(t.dataset, t.data_dir or "") for t in tasks})
    return {k: load_dataset(k[0], k[1] or None) for k in keys}


def run_audit(config: AuditConfig, on_model: Callable[[dict[str, Any], int, int], None] | None = None,
              worker: Callable[..., dict[str, Any]] = audit_model) -> AuditReport:
    """Audit every model of ``config`` that ``config.out_dir`` has no error-free row for.

    Args:
        config: what to audit and how.
        on_model: called with each finished row, the number done and the number to do.
        worker: the function run per model (a module-level function taking an
            :class:`~soda_backdoor.audit.worker.AuditTask` and the shared datasets).

    Raises:
        UserInputError: bad settings, missing paths, no model files, Ray missing.
    """
    start = time.perf_counter()
    _check(config)
    out = Path(config.out_dir)
    tasks = plan_tasks(config)
    (out / "models").mkdir(parents=True, exist_ok=True)
    log = out / AUDIT_LOG
    done = read_jsonl(log)
    todo = [t for t in tasks if not (t.sha256 in done and not done[t.sha256].get("error"))]
    shared = _shared_datasets(todo) if config.backend == "ray" and todo else None
    audited = flagged = 0
    errors = []
    outcomes = run_tasks(worker, todo, config.jobs, backend=config.backend, ray_address=config.ray_address,
                         shared=shared, gpus_per_job=_gpus(config) if config.backend == "ray" else 0.0)
    for i, outcome in enumerate(outcomes, 1):
        task: AuditTask = outcome.task
        name = task.sha256.removeprefix("unreadable:")[:REPORT_HASH_CHARS]
        report = f"models/{name}.json"
        row = audit_row(task.path, task.sha256, outcome.result if outcome.ok else None, outcome.error,
                        outcome.seconds, report)
        text = model_report(row, outcome.result if outcome.ok else None)
        write_atomic(out / report, lambda p: p.write_text(text))
        append_jsonl(log, row)
        done[task.sha256] = row
        audited += outcome.ok
        flagged += row["verdict"] == "backdoor"
        if not outcome.ok:
            errors.append(f"{task.path}: {outcome.error}")
        if on_model is not None:
            on_model(row, i, len(todo))
    write_tables(out, list(done.values()))
    return AuditReport(str(out), len(tasks), len(tasks) - len(todo), audited, flagged, len(errors),
                       time.perf_counter() - start, tuple(errors))
