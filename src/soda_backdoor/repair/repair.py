"""Removal of a semantic backdoor (docs/method.md §2.5).

1. Outstanding neurons: rank neurons by ``A_s[:, t]`` (attribution to the target, analysed on
   the source class) and keep the top fraction ``top``.
2. Masked model ``f'(x) = g(m * h(x))``; fine-tune all parameters on the clean defender subset,
   each batch mixing ``batch_size - num_recon`` clean samples with ``num_recon`` reconstructed
   samples labelled with the SOURCE class, minimising
   ``CE(batch, labels) - reg * CE(reconstructed, t)``.
3. Drop the mask: the repaired model has the original architecture.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..analysis.hooks import LayerRef, intervene
from ..errors import check_at_least, check_finite, check_interval
from ..utils import cpu_channels_last

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairConfig:
    """Settings of the repair.

    Attributes:
        top: fraction of neurons kept by the mask (1.0: no mask).
        epochs: passes over the clean defender subset.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        reg: weight of the term that pushes reconstructed samples away from the target.
        reg_cap: cap on that cross-entropy term (beyond it the term gives no gradient).
        batch_size: samples per batch.
        num_recon: reconstructed samples per batch.
        bn_train: update batch-norm statistics during fine-tuning (train mode). Off by default:
            batches that are 30% reconstructed samples shift the statistics and cost accuracy.
        seed: seed of shuffling and sampling.
    """

    top: float = 1.0
    epochs: int = 5
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: float = 0.01
    reg_cap: float = 5.0
    batch_size: int = 64
    num_recon: int = 20
    bn_train: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_interval("top", self.top, 0.0, 1.0, low_open=True)
        check_at_least("epochs", self.epochs, 1)
        check_finite("lr", self.lr, positive=True)
        check_finite("momentum", self.momentum)
        check_finite("weight_decay", self.weight_decay)
        check_finite("reg", self.reg)
        check_finite("reg_cap", self.reg_cap)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_recon", self.num_recon, 1)


@dataclass(frozen=True)
class RepairResult:
    """What the repair did (the repaired weights are in the module passed in)."""

    mask: Tensor
    num_kept: int
    num_neurons: int
    history: list[dict[str, float]]
    config: RepairConfig = field(default_factory=RepairConfig)
    seconds: float = 0.0


def outstanding_neurons(attribution_to_target: Tensor, top: float) -> Tensor:
    """Mask keeping the ``top`` fraction of neurons with the largest attribution.

    Shape:
        attribution_to_target: ``(n,)``; returns a float mask ``(n,)``.
    """
    check_interval("top", top, 0.0, 1.0, low_open=True)
    n = attribution_to_target.numel()
    k = max(1, int(round(top * n)))
    mask = torch.zeros(n)
    mask[attribution_to_target.flatten().argsort(descending=True)[:k]] = 1.0
    return mask


def _apply_mask(mask: Tensor):
    def edit(h: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (h.dim() - 2)
        return h * mask.to(h.device, h.dtype).view(shape)
    return edit


def repair_model(model: nn.Module, ref: LayerRef, attribution_to_target: Tensor, x_clean: Tensor, y_clean: Tensor,
                 x_recon: Tensor, source: int, target: int, config: RepairConfig | None = None,
                 progress: bool = False) -> RepairResult:
    """Fine-tune ``model`` in place to remove a backdoor from ``source`` to ``target``.

    Args:
        model: the backdoored classifier (modified in place; returned in eval mode).
        ref: analysis layer where the mask applies.
        attribution_to_target: ``A_s[:, t]`` per neuron of ``ref``.
        x_clean: normalised clean defender samples; y_clean: their labels.
        x_recon: normalised reconstructed samples (labelled ``source`` here).
        source: source class.
        target: target class.
        config: repair settings.
        progress: progress bar.
    """
    config = config or RepairConfig()
    t0 = time.perf_counter()
    device = x_clean.device
    gen = torch.Generator().manual_seed(config.seed)
    mask = outstanding_neurons(attribution_to_target.cpu(), config.top)
    n_recon = min(config.num_recon, len(x_recon)) if len(x_recon) else 0
    k_clean = config.batch_size - n_recon
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps = (len(y_clean) + k_clean - 1) // k_clean
    use_mask = config.top < 1.0
    n, history = len(y_clean), []
    with cpu_channels_last(model):  # faster convolutions on the CPU (docs/benchmarks.md)
        for epoch in range(config.epochs):
            model.train(config.bn_train)
            perm = torch.randperm(n, generator=gen).to(device)
            tot, seen = 0.0, 0
            bar = tqdm(range(steps), desc=f"repair epoch {epoch + 1}/{config.epochs}", disable=not progress,
                       leave=False, unit="batch")
            for step in bar:
                idx = perm[step * k_clean:(step + 1) * k_clean]
                xb, yb = x_clean[idx], y_clean[idx]
                if n_recon:
                    pick = torch.randint(0, len(x_recon), (n_recon,), generator=gen).to(device)
                    xb = torch.cat([xb, x_recon[pick]])
                    yb = torch.cat([yb, torch.full((n_recon,), source, dtype=torch.long, device=device)])
                if use_mask:
                    with intervene(model, ref, _apply_mask(mask)):
                        logits = model(xb)
                else:
                    logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if n_recon and config.reg:
                    # -CE(reconstructed, t) is unbounded below; capped so it cannot blow the weights up.
                    away = F.cross_entropy(logits[-n_recon:], torch.full_like(yb[-n_recon:], target))
                    loss = loss - config.reg * away.clamp(max=config.reg_cap)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(yb)
                seen += len(yb)
            history.append({"epoch": epoch + 1, "loss": tot / max(seen, 1)})
            logger.info("repair epoch %d: loss %.4f", epoch + 1, tot / max(seen, 1))
    model.eval()
    return RepairResult(mask, int(mask.sum()), mask.numel(), history, config, time.perf_counter() - t0)
