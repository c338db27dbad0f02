"""The audit's link to the workflow layer: detect and repair one model file.

Detection here is exactly `soda detect` on the file (the same data context, the same
:func:`soda_backdoor.workflow.detect`), with the data context loaded once per worker instead
of once per model; ``tests/test_audit.py`` checks that both give the same result.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..artifacts import SampleSet, save_reconstruction
from ..data import Dataset, get_attack
from ..detection import DetectionConfig
from ..detection.calibration import Calibration
from ..detection.errors import ErrorReference
from ..errors import UserInputError
from ..models import save_model
from ..reconstruction import ReconstructionConfig
from ..repair import RepairConfig
from ..workflow import DataContext, detect, load_context, open_model, reconstruct, repair

__all__ = ["DataContext", "attack_for", "context_from_data", "detect_in_context", "load_context", "repair_pair"]


def attack_for(path: str, attack: str | None, attack_file: str | None) -> str | None:
    """The attack whose semantic samples `soda detect` keeps out of the clean data for this file.

    Given, else the one its metadata names when the registry knows it (as
    :func:`soda_backdoor.workflow.resolve_attack` does for detection: an unknown one is
    treated as clean, with a warning).
    """
    if attack is not None or attack_file is not None:
        return attack
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            name = json.loads((fh.metadata() or {}).get("soda_backdoor", "{}")).get("attack")
    except Exception:  # noqa: BLE001 - no readable metadata: nothing to keep out
        return None
    if not name or str(name).lower() in ("none", "clean"):
        return None
    try:
        get_attack(name)
    except UserInputError:
        warnings.warn(f"{path}: the metadata names attack {name!r}, which is not in the registry; its semantic "
                      "samples cannot be kept out of the clean data", stacklevel=2)
        return None
    return name


def context_from_data(data: Dataset, attack: str | None, attack_file: str | None, seed: int = 0) -> DataContext:
    """``load_context`` on a dataset already in memory (Ray: fetched from the object store)."""
    return DataContext.build(data, get_attack(attack, data.spec.name, attack_file), seed)


def detect_in_context(path: str, ctx: DataContext, config: DetectionConfig, layer: str | None,
                      device: torch.device, seed: int = 0, arch: str | None = None,
                      calibration: Calibration | None = None,
                      reference: ErrorReference | None = None) -> dict[str, Any]:
    """What `soda detect --json` writes for ``path``, with the data context given."""
    loaded = open_model(path, ctx.data, device, arch)
    out = detect(loaded, ctx, config, layer, device, seed, calibration=calibration, reference=reference).to_dict()
    out["model"] = str(path)
    out["arch"] = loaded.meta.arch
    return out


def repair_pair(path: str, ctx: DataContext, source: int, target: int, out_dir: Path, recon: ReconstructionConfig,
                repair_config: RepairConfig, device: torch.device, seed: int = 0, arch: str | None = None,
                layer: str | None = None) -> dict[str, Any]:
    """`soda reconstruct` then `soda repair` for one flagged pair; files go to ``out_dir``.

    ``ctx`` is the worker's data context of the detection (the dataset it already holds, from
    disk or Ray's object store); the two steps divide it with their own seeds, as the commands do.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = DataContext.build(ctx.data, ctx.attack, seed)
    loaded = open_model(path, ctx.data, device, arch)
    rec = reconstruct(loaded, ctx, source, target, recon, device, seed)
    samples = out_dir / f"samples-{source}-{target}.npz"
    save_reconstruction(samples, rec.reconstruction, rec.fingerprint)
    if rec.reconstruction.kept < 2:
        raise UserInputError(f"reconstruction kept {rec.reconstruction.kept} sample(s) for {source} -> {target}; "
                             "repair needs at least 2")
    ctx = DataContext.build(ctx.data, ctx.attack, repair_config.seed)
    rep = repair(loaded, ctx, source, target, SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint),
                 repair_config, layer, device)
    save_model(out_dir / "repaired.safetensors", rep.model.module, rep.model.meta)
    rec_dict = {**rec.to_dict(), "samples": str(samples)}
    return {"reconstruct": rec_dict, "repair": {**rep.to_dict(), "model": str(out_dir / "repaired.safetensors")}}
