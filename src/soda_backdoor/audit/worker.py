"""The audit's worker: one model file in, its detection (and repair) out.

The same function runs in a local worker process and in a Ray task. Each worker process loads
the clean data once and keeps the data context per dataset and attack for every later model:
from disk (local backend) or from the dataset the Ray object store holds (``datasets``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..detection import DetectionConfig
from ..detection.calibration import Calibration
from ..detection.errors import ErrorReference
from ..reconstruction import ReconstructionConfig
from ..repair import RepairConfig

logger = logging.getLogger(__name__)

CONTEXTS_PER_WORKER = 8


@dataclass(frozen=True, kw_only=True)
class AuditSettings:
    """How each model of an audit is read, detected and repaired (shared by the audit's
    configuration and each model's task).

    Attributes:
        data_dir: dataset folder or file (``None``: the standard place).
        attack: attack whose semantic samples are kept out of the clean data (``None``: each
            model's own, as ``soda detect`` does).
        attack_file: JSON file of attacks.
        arch: architecture of state_dicts without metadata.
        detection: detector settings.
        layer: analysis layer (``None``: the default).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: random seed.
        repair: reconstruct and repair the first flagged pair of every flagged model.
        reconstruction: reconstruction settings (with ``repair``).
        repair_config: repair settings (with ``repair``).
    """

    data_dir: str | None = None
    attack: str | None = None
    attack_file: str | None = None
    arch: str | None = None
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    layer: str | None = None
    device: str = "auto"
    seed: int = 0
    repair: bool = False
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    repair_config: RepairConfig = field(default_factory=RepairConfig)


@dataclass(frozen=True, kw_only=True)
class AuditTask(AuditSettings):
    """One model file to audit, with everything the worker needs (the rest in :class:`AuditSettings`).

    Attributes:
        path: the model file.
        sha256: its hash (the audit's key).
        dataset: dataset name.
        repair_dir: folder for the samples and the repaired model.
        calibration: P(backdoor) for the detection (``soda zoo calibrate``), loaded once by the
            parent and shipped with the task.
        reference: the confident-error reference (``None``: the shipped one), shipped the same way.
    """

    path: str
    sha256: str
    dataset: str
    repair_dir: str = ""
    calibration: Calibration | None = None
    reference: ErrorReference | None = None


@functools.lru_cache(maxsize=CONTEXTS_PER_WORKER)
def _disk_context(dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None):
    from .steps import load_context

    return load_context(dataset, data_dir, attack, attack_file)


_SHARED_CONTEXTS: dict[tuple[int, str | None, str | None], Any] = {}


def _shared_context(data: Any, attack: str | None, attack_file: str | None):
    from .steps import context_from_data

    key = (id(data), attack, attack_file)
    if key not in _SHARED_CONTEXTS:
        if len(_SHARED_CONTEXTS) >= CONTEXTS_PER_WORKER or any(k[0] != id(data) for k in _SHARED_CONTEXTS):
            _SHARED_CONTEXTS.clear()
        _SHARED_CONTEXTS[key] = context_from_data(data, attack, attack_file)
    return _SHARED_CONTEXTS[key]


def audit_model(task: AuditTask, datasets: dict[tuple[str, str], Any] | None = None) -> dict[str, Any]:
    """Detect (and with ``task.repair``, repair) one model file.

    Args:
        task: the model and the settings.
        datasets: clean datasets by ``(dataset, data_dir or "")``, when the backend shares them
            (Ray); otherwise each worker process loads them once from disk.

    Returns:
        ``detect`` (what ``soda detect --json`` writes), ``repair`` (with ``task.repair`` and
        a flagged pair), ``data_seconds`` (loading the data; 0 when this worker had it) and
        ``worker`` (the process id).
    """
    from ..executor import describe_error
    from ..utils import resolve_device
    from .steps import attack_for, detect_in_context, repair_pair

    start = time.perf_counter()
    attack = attack_for(task.path, task.attack, task.attack_file)
    data = (datasets or {}).get((task.dataset, task.data_dir or ""))
    if data is not None:
        ctx = _shared_context(data, attack, task.attack_file)
    else:
        ctx = _disk_context(task.dataset, task.data_dir, attack, task.attack_file)
    data_seconds = time.perf_counter() - start
    device = resolve_device(task.device)
    detect = detect_in_context(task.path, ctx, task.detection, task.layer, device, task.seed, task.arch,
                               task.calibration, task.reference)
    out: dict[str, Any] = {"detect": detect, "data_seconds": data_seconds, "worker": os.getpid(), "repair": None}
    if task.repair and detect["pairs"]:
        pair = detect["pairs"][0]
        t0 = time.perf_counter()
        try:
            out["repair"] = repair_pair(task.path, ctx, pair["source"], pair["target"], Path(task.repair_dir),
                                        task.reconstruction, task.repair_config, device, task.seed, task.arch,
                                        task.layer)
        except Exception as exc:  # noqa: BLE001 - a failed repair keeps the detection
            logger.debug("repair failed", exc_info=True)
            out["repair"] = {"error": describe_error(exc)}
        out["repair_seconds"] = time.perf_counter() - t0
    return out
