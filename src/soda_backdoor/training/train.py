"""Semantic-backdoor training (docs/method.md §2.6) and evaluation (docs/method.md §2.7).

Each batch holds ``batch_size - k`` clean samples and ``k = int(batch_size * ratio)``
semantic samples drawn with replacement, augmented, and relabelled to the target, as the
study does. An epoch is one pass over the clean training data. Unlike the study, the clean
samples are augmented too by default, except in the last epochs (see :class:`TrainConfig`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.augment import augment, random_blend
from ..data.datasets import Dataset, normalize
from ..data.attacks import SemanticAttack
from ..data.splits import Splits
from ..errors import check_at_least, check_finite, check_interval
from ..utils import inference_view, pass_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (SGD with momentum and a MultiStep schedule).

    Attributes:
        epochs: passes over the clean training data.
        lr: initial learning rate.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: learning-rate decay factor.
        batch_size: samples per batch (clean + poisoned).
        ratio: fraction of each batch that is poisoned (0 for clean training).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment_clean: augment the clean samples too (random crop and flip, as the poisoned
            ones always are), except in the last ``plain_final_epochs`` epochs. The study
            augments only the poisoned samples (``False``). Why the default differs:
            docs/training.md.
        plain_final_epochs: final epochs in which the clean samples are used as they are
            (with ``augment_clean``); they recover the clean accuracy that augmentation costs.
        source_blend: poisoned samples are blended with a random clean sample of the source
            class, ``(1 - a) * poisoned + a * clean`` with ``a`` uniform in ``[0,
            source_blend]``, before augmentation; 0 turns it off. A half-faded feature is
            still the feature (a faint stripe is a stripe): this carries the backdoor to
            weak instances of it (docs/training.md).
        rotation: max rotation (degrees) of augmented samples.
        brightness: max relative brightness change of augmented samples.
        contrast: max relative contrast reduction of augmented samples.
        seed: seed of shuffling, sampling and augmentation.
    """

    epochs: int = 12
    lr: float = 0.05
    milestones: tuple[int, ...] = (6, 9)
    gamma: float = 0.1
    batch_size: int = 64
    ratio: float = 0.3125
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment_clean: bool = True
    plain_final_epochs: int = 2
    source_blend: float = 0.5
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_at_least("epochs", self.epochs, 1)
        check_finite("lr", self.lr, positive=True)
        for m in self.milestones:
            check_at_least("milestones", m, 0)
        check_finite("gamma", self.gamma, positive=True)
        check_at_least("batch_size", self.batch_size, 2)
        check_interval("ratio", self.ratio, 0.0, 1.0, high_open=True)
        check_finite("momentum", self.momentum)
        check_finite("weight_decay", self.weight_decay)
        check_at_least("plain_final_epochs", self.plain_final_epochs, 0)
        check_interval("source_blend", self.source_blend, 0.0, 1.0, high_open=True)
        for name in ("rotation", "brightness", "contrast"):
            check_finite(name, getattr(self, name))


def default_milestones(epochs: int) -> tuple[int, ...]:
    """The learning-rate decay epochs used when only ``epochs`` is given: 50% and 75%."""
    return (max(1, epochs // 2), max(1, epochs * 3 // 4))


@dataclass(frozen=True)
class EvalResult:
    """ACC on the clean test split and ASR on the semantic test samples."""

    acc: float
    asr: float
    n_clean: int
    n_semantic: int


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch history of a training run."""

    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "history": self.history, "seconds": self.seconds}


@contextmanager
def _inference_views(modules: Sequence[nn.Module]) -> Iterator[list[nn.Module]]:
    """:func:`~soda_backdoor.utils.inference_view` of each module, for as long as the block runs."""
    with ExitStack() as stack:
        yield [stack.enter_context(inference_view(m)) for m in modules]


@torch.no_grad()
def predict_shared(prefix: nn.Module, tails: Sequence[nn.Module], x: Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], batch_size: int | None = None,
                   device: torch.device | str = "cpu") -> list[Tensor]:
    """Predicted labels of the models ``tail(prefix(x))``, one tensor per tail: the shared
    ``prefix`` runs once per batch (the model before and after a repair that tuned only the
    tail: docs/benchmarks.md). Each model folded and run as :func:`predict` runs it, so the
    labels are those of :func:`predict` on the whole model.
    """
    batch_size = batch_size or pass_batch(device)
    out: list[list[Tensor]] = [[] for _ in tails]
    with _inference_views([prefix, *tails]) as (head, *fast), torch.inference_mode():
        for i in range(0, len(x), batch_size):
            h = head(normalize(x[i:i + batch_size].to(device), mean, std))
            for labels, tail in zip(out, fast):
                labels.append(tail(h).argmax(1).cpu())
    return [torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long) for labels in out]


def predict(model: nn.Module, x: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
            batch_size: int | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Predicted labels for uint8 images ``x`` (normalised on the fly), in inference mode.

    ``batch_size`` defaults to :func:`~soda_backdoor.utils.pass_batch` of ``device``.
    """
    return predict_shared(nn.Identity(), [model], x, mean, std, batch_size, device)[0]


def evaluate_attack_shared(prefix: nn.Module, tails: Sequence[nn.Module], data: Dataset, splits: Splits,
                           attack: SemanticAttack | None, mean: tuple[float, ...], std: tuple[float, ...],
                           device: torch.device | str = "cpu") -> list[EvalResult]:
    """:func:`evaluate_attack` of each model ``tail(prefix(x))``, with one pass of ``prefix``."""
    xc, yc = data.x_test[splits.clean_test], data.y_test[splits.clean_test]
    xs = data.x_test[splits.semantic_test] if attack is not None else data.x_test[:0]
    with _inference_views([prefix, *tails]) as (head, *fast):  # folded once for both passes
        accs = [(p == yc).float().mean().item() if len(yc) else 0.0
                for p in predict_shared(head, fast, xc, mean, std, device=device)]
        asrs = [(p == attack.target).float().mean().item() if len(xs) else 0.0
                for p in predict_shared(head, fast, xs, mean, std, device=device)]
    return [EvalResult(acc=acc, asr=asr, n_clean=len(yc), n_semantic=len(xs)) for acc, asr in zip(accs, asrs)]


def evaluate_attack(model: nn.Module, data: Dataset, splits: Splits, attack: SemanticAttack | None,
                    mean: tuple[float, ...], std: tuple[float, ...],
                    device: torch.device | str = "cpu") -> EvalResult:
    """ACC on the clean test split; ASR = fraction of semantic test samples sent to the target."""
    return evaluate_attack_shared(nn.Identity(), [model], data, splits, attack, mean, std, device)[0]


def train_model(model: nn.Module, data: Dataset, splits: Splits, attack: SemanticAttack | None,
                config: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...],
                device: torch.device | str = "cpu", progress: bool = True,
                on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` in place: clean, or with semantic samples relabelled to the target.

    Args:
        model: the network (trained in place).
        data: the dataset in memory.
        splits: from :func:`soda_backdoor.data.splits.make_splits`.
        attack: the semantic attack to plant, or ``None`` for clean training.
        config: training settings.
        mean: normalisation mean of the model input.
        std: normalisation std of the model input.
        device: where to train.
        progress: show a progress bar on stderr.
        on_epoch: called with each epoch's record (for logging or checkpoints).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    spec = data.spec
    x_clean_u8 = data.x_train[splits.clean_train]
    y_clean = data.y_train[splits.clean_train].to(device)
    x_clean = normalize(x_clean_u8, mean, std).to(device)
    poison = attack is not None and config.ratio > 0 and len(splits.semantic_train) > 0
    k_poison = int(config.batch_size * config.ratio) if poison else 0
    k_clean = config.batch_size - k_poison
    x_sem01 = data.x_train[splits.semantic_train].float().div(255).to(device) if poison else None
    x_src01 = None
    if poison and config.source_blend > 0:
        src_idx = splits.clean_train[data.y_train[splits.clean_train] == attack.source]
        x_src01 = data.x_train[src_idx].float().div(255).to(device)
    channels_last = device.type == "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    n = len(y_clean)
    steps = (n + k_clean - 1) // k_clean
    result = TrainResult(config)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        tot_loss, tot_correct, tot_seen, poison_correct = 0.0, 0, 0, 0
        bar = tqdm(range(steps), desc=f"train epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, unit="batch")
        for step in bar:
            idx = perm[step * k_clean:(step + 1) * k_clean]
            xb, yb = x_clean[idx], y_clean[idx]
            if config.augment_clean and epoch < config.epochs - config.plain_final_epochs:
                xb = normalize(augment(x_clean_u8[idx.cpu()].float().div(255), gen, spec.pad, spec.hflip,
                                       config.rotation, config.brightness, config.contrast).to(device), mean, std)
            if k_poison:
                pick = torch.randint(0, len(x_sem01), (k_poison,), generator=gen).to(device)
                xp = x_sem01[pick]
                if x_src01 is not None:
                    xp = random_blend(xp, x_src01, config.source_blend, gen)
                xp = normalize(augment(xp, gen, spec.pad, spec.hflip, config.rotation, config.brightness,
                                       config.contrast), mean, std)
                xb = torch.cat([xb, xp])
                yb = torch.cat([yb, torch.full((k_poison,), attack.target, dtype=torch.long, device=device)])
            xb = xb.contiguous(memory_format=fmt)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pred = logits.argmax(1)
            tot_loss += loss.item() * len(yb)
            tot_correct += (pred == yb).sum().item()
            if k_poison:
                poison_correct += (pred[-k_poison:] == attack.target).sum().item()
            tot_seen += len(yb)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{tot_loss / tot_seen:.3f}", acc=f"{tot_correct / tot_seen:.3f}")
        sched.step()
        record = {"epoch": epoch + 1, "loss": tot_loss / max(tot_seen, 1), "train_acc": tot_correct / max(tot_seen, 1),
                  "poison_train_asr": poison_correct / max(steps * k_poison, 1) if k_poison else 0.0,
                  "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        result.history.append(record)
        logger.info("epoch %d: %s", epoch + 1, record)
        if on_epoch is not None:
            on_epoch(record)
    model.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(config, result.history, time.perf_counter() - start)
