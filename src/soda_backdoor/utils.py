"""Small shared helpers: devices, seeding, atomic file writes."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import UserInputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]`` into a device, refusing CUDA when there is none."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA device is available; use auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserInputError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from exc


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    return write_atomic(path, lambda p: p.write_text(text))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


CPU_PASS_BATCH = 32
"""Rows per forward (and backward) pass on the CPU: small passes keep the intermediate maps in
the cache. MobileNetV2 infers 2-3x faster in passes of 32 than of 512, and its input gradient
6x faster; ResNet-18 1.3x; ``cnn`` is indifferent (docs/benchmarks.md)."""


def pass_batch(device: torch.device | str, cpu: int = CPU_PASS_BATCH, other: int = 1024) -> int:
    """Rows per forward or backward pass on ``device``: ``cpu`` on the CPU, ``other`` elsewhere."""
    return cpu if torch.device(device).type == "cpu" else other


def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` without gradients, in passes of :func:`pass_batch` rows (``x`` when empty).

    ``no_grad``, not ``inference_mode``, so the result can feed training steps; inside an
    ``inference_mode`` block it is an inference tensor as usual.
    """
    if len(x) == 0:
        return x
    b = pass_batch(x.device)
    with torch.no_grad():
        return torch.cat([fn(x[i:i + b]) for i in range(0, len(x), b)])


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` in eval mode and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Disable ``requires_grad`` on every parameter and restore it afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@contextmanager
def cpu_channels_last(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """On the CPU, hold 4-d weights in channels-last layout for the duration; restore them after.

    oneDNN convolutions and max-pooling are faster in channels-last on the CPU (timings:
    docs/benchmarks.md). On exit the original parameter tensors are put back, holding
    the current values (so updates made inside are kept); nothing changes for a model on
    another device or without 4-d weights.
    """
    params = [p for p in module.parameters() if p.dim() == 4 and p.device.type == "cpu"]
    saved = [p.data for p in params]
    try:
        for p in params:
            # empty_like + copy: .contiguous() keeps ambiguous strides (one input channel).
            p.data = torch.empty_like(p.data, memory_format=torch.channels_last).copy_(p.data)
        yield module
    finally:
        for p, data in zip(params, saved):
            data.copy_(p.data)
            p.data = data


@contextmanager
def inference_view(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module to run passes without gradients through: eval mode, channels-last weights
    on the CPU, and every batch norm that follows a convolution folded into it.

    The folding is ``torch.fx.experimental.optimization.fuse`` on a traced copy: the same
    function up to float rounding (about 1e-7), with a third fewer memory-bound passes
    (MobileNetV2: 1.7x the images per second on this CPU; docs/benchmarks.md). The module
    itself is used, unfolded, when it has no batch norm, carries forward hooks (an
    intervention must apply), or cannot be traced. The copy is dropped on exit; ``module``
    is never changed.
    """
    has_bn = has_batchnorm(module)
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    with eval_mode(module):
        view = module
        if has_bn and not hooked:
            with warnings.catch_warnings():  # its imports use torch.jit APIs deprecated in torch 2.x
                warnings.simplefilter("ignore", DeprecationWarning)
                from torch.fx.experimental.optimization import fuse
            try:
                view = fuse(module)  # a copy
            except Exception as exc:  # noqa: BLE001 - an untraceable model runs unfolded
                logging.getLogger(__name__).debug("inference without folding: %s", exc)
        with cpu_channels_last(view):
            yield view


def has_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a batch-norm layer."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def recalibrated_batchnorm(module: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.nn.Module:
    """A copy of ``module`` whose batch-norm running statistics are re-estimated on ``x``
    (their average over batches of at most ``batch_size``, as after weight averaging); the
    weights are unchanged. ``module`` itself is returned, unchanged, when it has no batch norm.

    A model's running statistics are a moving average over its last training batches: they
    carry whatever those batches held (augmentation, a third of poisoned samples, the noise of
    a large constant learning rate). Re-estimated on clean data, they describe the clean data
    (docs/detection.md, "Batch-norm statistics re-estimated on clean data").
    """
    if not has_batchnorm(module):
        return module
    if len(x) < 2:
        raise UserInputError(f"re-estimating batch-norm statistics needs at least 2 samples, got {len(x)}")
    copy_ = copy.deepcopy(module)
    norms = [m for m in copy_.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    copy_.train()
    # batches of near-equal size (the average weighs each batch alike), at least 2 samples each
    for chunk in torch.tensor_split(x, min(-(-len(x) // batch_size), len(x) // 2)):
        copy_(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return copy_.eval()


def environment() -> dict[str, str]:
    """Where a result was measured: the torch version, the machine and the processor."""
    import platform

    return {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor()}


def source_commit() -> str:
    """The git commit of this package's source (``-dirty`` with uncommitted changes), or ``""``."""
    here = str(Path(__file__).resolve().parent)
    try:
        run = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if commit and run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""
