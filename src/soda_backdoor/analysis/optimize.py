"""Batched input optimisation shared by reconstruction (docs/method.md §2.4) and source detection.

Each row of a batch is optimised independently with SGD (momentum, weight decay) on
``-f(x)_t + reg * mean(x^2)``, with its own target and its own early stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


class OptimSettings(Protocol):
    """What the optimiser reads from a config (e.g. ``ReconstructionConfig``)."""

    steps: int
    lr: float
    momentum: float
    weight_decay: float
    reg: float
    threshold: float


def _pick(logits: Tensor, target: int | Tensor) -> Tensor:
    if isinstance(target, Tensor):
        return logits.gather(1, target.view(-1, 1)).squeeze(1)
    return logits[:, target]


def loss_per_sample(logits: Tensor, x: Tensor, target: int | Tensor, reg: float) -> Tensor:
    """Per-sample loss ``-f(x)_t + reg * mean(x^2)``."""
    return -_pick(logits, target) + reg * x.pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class OptimResult:
    """Result of :func:`optimize_batch`.

    Shape:
        x: like the input; steps, prob, crossing: ``(N,)``.

    Attributes:
        x: final inputs.
        steps: SGD steps taken per row.
        prob: final target probability per row.
        crossing: the step at which the row's target log-probability crossed
            ``log(threshold)``, linearly interpolated between the last two checks (a
            continuous version of ``steps``); ``config.steps`` for rows that never reached it.
    """

    x: Tensor
    steps: Tensor
    prob: Tensor
    crossing: Tensor


def optimize_batch(model: nn.Module, x0: Tensor, target: int | Tensor, config: OptimSettings,
                   progress: bool = False) -> OptimResult:
    """Optimise every row of ``x0`` independently, in one batch.

    Args:
        model: the classifier (eval mode, frozen weights are the caller's business).
        x0: starting inputs.
        target: the target class, or one target per row (``(N,)`` long tensor).
        config: optimisation settings.
        progress: progress bar.

    Returns:
        final inputs, steps and target probabilities per row (see :class:`OptimResult`).
    """
    per_row = isinstance(target, Tensor)
    x = x0.detach().clone()
    buf = torch.zeros_like(x)
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    first = torch.ones(len(x), dtype=torch.bool, device=x.device)
    prev_logp = torch.full((len(x),), -math.inf, device=x.device)
    crossing = torch.full((len(x),), float(config.steps), device=x.device)
    log_th = math.log(config.threshold)
    bar = tqdm(range(config.steps), desc="reconstruct", disable=not progress, leave=False, unit="step")
    for _ in bar:
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        xa = x[idx].requires_grad_(True)
        logits = model(xa)
        tgt = target[idx] if per_row else target
        logp = _pick(logits.detach().log_softmax(1), tgt)
        prob = logp.exp()
        running = prob < config.threshold
        done = idx[~running]
        if len(done):
            lp_prev, lp_now = prev_logp[done], logp[~running]
            frac = ((log_th - lp_prev) / (lp_now - lp_prev)).clamp(0, 1).nan_to_num(1.0)
            crossing[done] = torch.where(steps[done] > 0, steps[done] - 1 + frac, torch.zeros_like(frac))
        prev_logp[idx] = logp
        if not running.any():
            active[idx] = False
            break
        loss = loss_per_sample(logits, xa, tgt, config.reg)[running].sum()
        (grad,) = torch.autograd.grad(loss, xa)
        ridx = idx[running]
        g = grad[running] + config.weight_decay * x[ridx]
        fresh = first[ridx].view(-1, *([1] * (x.dim() - 1)))
        new_buf = torch.where(fresh, g, config.momentum * buf[ridx] + g)
        buf[ridx] = new_buf
        x[ridx] = x[ridx] - config.lr * new_buf
        first[ridx] = False
        steps[ridx] += 1
        active[idx[~running]] = False
        bar.set_postfix(running=int(running.sum()), refresh=False)
    with torch.no_grad():
        prob = torch.cat([_pick(model(x[i:i + 512]).softmax(1), target[i:i + 512] if per_row else target)
                          for i in range(0, len(x), 512)])
    return OptimResult(x, steps, prob, crossing)
