"""Reconstruction of infected samples (docs/method.md §2.4).

Starting from clean samples of the source class, each input ``x`` is optimised with SGD
(momentum, weight decay) on ``-f(x)_t + reg * mean(x^2)`` until ``softmax(f(x))_t >=
threshold`` or ``steps`` are spent; it is kept if ``argmax f(x) = t``.

All starts optimise at once: the loss is a sum of per-sample losses, so each row gets its own
gradient, and the SGD update is applied row by row, only to samples still running (a sample
that reached the threshold stops changing). The result equals the one-at-a-time procedure
(:func:`reconstruct_one_by_one`, the reference used in tests and benchmarks).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..analysis.optimize import loss_per_sample as _loss
from ..analysis.optimize import optimize_batch
from ..utils import cpu_channels_last, eval_mode, frozen, pass_batch
from ..errors import check_at_least, check_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of the input optimisation.

    Attributes:
        steps: maximum optimisation steps per sample (the study's ``--epoch``).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        reg: weight of ``mean(x^2)`` (the study's ``--reg``).
        threshold: stop a sample once its target probability reaches this (above 1: never
            stop early, every sample runs all ``steps``).
        num_keep: samples to keep (the study's ``--num_sample``).
        batch_size: starts optimised together.
        stop_when_kept: stop the starts still running once as many starts of the batch as
            are still needed have reached ``threshold``. The study runs every start to its
            budget, one at a time, so a start that never gets there costs ``steps`` passes;
            those few starts were most of the time on MobileNetV2 (docs/benchmarks.md). A
            start stopped early is kept if the model already sends it to the target, like
            any start at the end of its budget. ``False``: every start runs to the end, as
            in the study.
        max_tries: at most this many starts are tried, even if fewer than ``num_keep``
            reached the target (``None``: every source sample given, until ``num_keep`` are
            kept). On a weak backdoor most starts run the whole budget, so the cost grows
            with the source pool: on a ResNet-18 with ASR 0.22, 2,000 steps ran more than 11
            minutes (docs/benchmarks.md). A bound on the cost, not a default.
    """

    steps: int = 2000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: float = 0.9
    threshold: float = 0.99
    num_keep: int = 100
    batch_size: int = 128
    stop_when_kept: bool = True
    max_tries: int | None = None

    def __post_init__(self) -> None:
        check_at_least("steps", self.steps, 1)
        if self.max_tries is not None:
            check_at_least("max_tries", self.max_tries, 1)
        check_finite("lr", self.lr, positive=True)
        check_finite("momentum", self.momentum)
        check_finite("weight_decay", self.weight_decay)
        check_finite("reg", self.reg)
        check_finite("threshold", self.threshold, positive=True)
        check_at_least("num_keep", self.num_keep, 1)
        check_at_least("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class Reconstruction:
    """Reconstructed infected samples.

    Shape:
        samples: ``(M, C, H, W)`` kept samples in the model's normalised input space;
        starts: ``(M, C, H, W)`` their starting images (same space);
        start_indices, target_prob, steps: ``(M,)``.
    """

    samples: Tensor
    starts: Tensor
    start_indices: Tensor
    target_prob: Tensor
    steps: Tensor
    source: int
    target: int
    tried: int
    config: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    seconds: float = 0.0

    @property
    def kept(self) -> int:
        return len(self.samples)

    def split(self) -> tuple[Tensor, Tensor]:
        """(repair half, held-out half) of the kept samples (:func:`split_samples`)."""
        return split_samples(self.samples)


def split_samples(samples: Tensor) -> tuple[Tensor, Tensor]:
    """(repair half, held-out half): every other sample, so both halves are alike (docs/method.md §2.4)."""
    return samples[0::2], samples[1::2]


def reconstruct_inputs(model: nn.Module, starts: Tensor, start_indices: Tensor, source: int, target: int,
                       config: ReconstructionConfig | None = None, progress: bool = False) -> Reconstruction:
    """Reconstruct up to ``config.num_keep`` infected samples from source-class ``starts``.

    Args:
        model: the classifier (eval mode and frozen weights for the duration).
        starts: normalised clean samples of the source class, in the order they are tried.
        start_indices: their indices in the training split (recorded in the result).
        source: source class.
        target: target class.
        config: optimisation settings.
        progress: progress bars.

    Shape:
        starts: ``(N, C, H, W)``.
    """
    config = config or ReconstructionConfig()
    t0 = time.perf_counter()
    kept_x, kept_s, kept_i, kept_p, kept_n = [], [], [], [], []
    tried, n_kept = 0, 0
    with eval_mode(model), frozen(model), cpu_channels_last(model):
        pos = 0
        limit = len(starts) if config.max_tries is None else min(len(starts), config.max_tries)
        while n_kept < config.num_keep and pos < limit:
            need = config.num_keep - n_kept
            size = min(limit - pos, max(config.batch_size, need))
            x0 = starts[pos:pos + size]
            stop = _enough_crossed(need, config.steps) if config.stop_when_kept else None
            res = optimize_batch(model, x0, target, config, progress, stop=stop)
            x, steps, prob = res.x, res.steps, res.prob
            with torch.no_grad():
                b = pass_batch(x.device)
                pred = torch.cat([model(x[i:i + b]).argmax(1) for i in range(0, len(x), b)])
            ok = (pred == target).nonzero().flatten()
            # Like the sequential procedure: starts are tried in order until enough are kept.
            if len(ok) > need:
                tried += int(ok[need - 1]) + 1
                ok = ok[:need]
            else:
                tried += size
            kept_x.append(x[ok].detach())
            kept_s.append(x0[ok])
            kept_i.append(start_indices[pos:pos + size][ok.cpu()])
            kept_p.append(prob[ok])
            kept_n.append(steps[ok])
            n_kept += len(ok)
            pos += size
            logger.info("reconstruction: %d/%d kept after %d tries", n_kept, config.num_keep, tried)
    shape = (0, *starts.shape[1:])
    cat = lambda parts, like: torch.cat(parts) if parts else like  # noqa: E731
    return Reconstruction(
        samples=cat(kept_x, starts.new_zeros(shape)).cpu(), starts=cat(kept_s, starts.new_zeros(shape)).cpu(),
        start_indices=cat(kept_i, torch.zeros(0, dtype=torch.long)).cpu(),
        target_prob=cat(kept_p, torch.zeros(0)).cpu(), steps=cat(kept_n, torch.zeros(0, dtype=torch.long)).cpu(),
        source=source, target=target, tried=tried, config=config, seconds=time.perf_counter() - t0)


def _enough_crossed(need: int, budget: int):
    """Row stop for :func:`optimize_batch`: every running row, once ``need`` rows have crossed."""
    def stop(taken: int, crossing: Tensor, active: Tensor) -> Tensor:
        crossed = (~active) & (crossing < budget)
        return active if int(crossed.sum()) >= need else torch.zeros_like(active)
    return stop


def reconstruct_one_by_one(model: nn.Module, starts: Tensor, target: int,
                           config: ReconstructionConfig) -> tuple[list[Tensor], list[int], list[bool]]:
    """Reference: the study's procedure, one sample at a time with ``torch.optim.SGD``.

    Returns:
        final inputs, steps taken, and whether each was kept (argmax == target).
    """
    xs, steps, kept = [], [], []
    with eval_mode(model), frozen(model), cpu_channels_last(model):
        for x0 in starts:
            x = x0.unsqueeze(0).clone().requires_grad_(True)
            opt = torch.optim.SGD([x], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
            n = 0
            for _ in range(config.steps):
                logits = model(x)
                if logits.softmax(1)[0, target] >= config.threshold:
                    break
                opt.zero_grad()
                _loss(logits, x, target, config.reg).sum().backward()
                opt.step()
                n += 1
            with torch.no_grad():
                kept.append(bool(model(x).argmax(1).item() == target))
            xs.append(x.detach()[0])
            steps.append(n)
    return xs, steps, kept
