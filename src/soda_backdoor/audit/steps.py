"""The audit's only link to the tool's steps (``cli.steps``): detect and repair one model file.

Kept in one small module so that these calls can be pointed at the workflow layer when it
replaces ``cli.steps``. Detection here is ``run_detect`` with the data context passed in instead
of loaded per call; ``tests/test_audit.py`` checks that both give the same result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..analysis import parse_layer
from ..cli.steps import DataContext, _attack_for, class_inputs, load_context, open_model, run_reconstruct, run_repair
from ..data import Dataset, get_attack
from ..data.splits import make_splits
from ..detection import DetectionConfig, detect_backdoor
from ..errors import UserInputError
from ..reconstruction import ReconstructionConfig
from ..repair import RepairConfig
from ..utils import seed_everything

__all__ = ["DataContext", "attack_for", "context_from_data", "detect_in_context", "load_context", "repair_pair"]


def attack_for(path: str, attack: str | None, attack_file: str | None) -> str | None:
    """The attack whose semantic samples ``soda detect`` keeps out of the clean data for this file."""
    return _attack_for(path, attack, attack_file)


def context_from_data(data: Dataset, attack: str | None, attack_file: str | None, seed: int = 0) -> DataContext:
    """``load_context`` on a dataset already in memory (Ray: fetched from the object store)."""
    atk = get_attack(attack, data.spec.name, attack_file)
    if atk is not None and atk.dataset != data.spec.name:
        raise UserInputError(f"attack {atk.name!r} is defined on {atk.dataset}, not {data.spec.name}")
    return DataContext(data, atk, make_splits(data, atk, seed))


def detect_in_context(path: str, ctx: DataContext, config: DetectionConfig, layer: str | None,
                      device: torch.device, seed: int = 0, arch: str | None = None) -> dict[str, Any]:
    """What ``run_detect`` returns for ``path``, with the data context given."""
    t0 = time.perf_counter()
    seed_everything(seed)
    loaded = open_model(path, ctx, device, arch)
    ref = parse_layer(loaded.module, layer)
    inputs = class_inputs(ctx, loaded.meta, config.attribution.num_samples, device)
    result, _ = detect_backdoor(loaded.module, ref, inputs, ctx.data.num_classes, config, False)
    out = result.to_dict()
    out["seconds"] = time.perf_counter() - t0
    out["analysis_seconds"] = result.seconds
    out["model"] = str(path)
    out["class_names"] = list(ctx.data.spec.class_names)
    out["arch"] = loaded.meta.arch
    return out


def repair_pair(path: str, dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
                source: int, target: int, out_dir: Path, recon: ReconstructionConfig, repair: RepairConfig,
                device: torch.device, seed: int = 0, arch: str | None = None,
                layer: str | None = None) -> dict[str, Any]:
    """``soda reconstruct`` then ``soda repair`` for one flagged pair; files go to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = out_dir / f"samples-{source}-{target}.npz"
    rec = run_reconstruct(path, dataset, data_dir, attack, attack_file, source, target, recon, str(samples), device,
                          seed, arch, progress=False)
    if rec["kept"] < 2:
        raise UserInputError(f"reconstruction kept {rec['kept']} sample(s) for {source} -> {target}; "
                             "repair needs at least 2")
    rep = run_repair(path, dataset, data_dir, attack, attack_file, source, target, str(samples), repair,
                     str(out_dir / "repaired.safetensors"), device, layer, arch=arch, progress=False)
    return {"reconstruct": rec, "repair": rep}
