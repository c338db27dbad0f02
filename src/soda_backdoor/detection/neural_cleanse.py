"""Neural Cleanse: trigger reverse engineering and a MAD test on the trigger sizes.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks". IEEE S&P 2019.

For every class ``k`` the smallest patch trigger that sends clean samples of all classes to
``k`` is reverse engineered::

    x' = (1 - m) * x + m * p,   min_{m, p}  CE(f(x'), k) + cost * |m|_1

with a mask ``m`` in ``[0, 1]^{H x W}`` (shared by the channels) and a pattern ``p`` in the valid
input range, both parametrised through ``tanh`` so that Adam works unconstrained. A class that
needs a much smaller trigger than the others is a backdoor target: the L1 norms of the masks go
through the MAD test and a class whose norm is a LOW outlier with anomaly index above 2 is
flagged.

The baseline exists to show what trigger inversion does on semantic backdoors (issue 16): a
semantic trigger is a feature of natural images, not a small patch, so nothing guarantees a
small mask for its target.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import UserInputError
from ..utils import cpu_channels_last, eval_mode, frozen
from .stats import OutlierTest, mad_outliers

logger = logging.getLogger(__name__)

TANH_EPS = 1e-7  # keeps the tanh parametrisation of the mask strictly inside (0, 1)

Bound = float | Sequence[float] | Tensor


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """Settings of Neural Cleanse.

    The paper's schedule adjusts the cost of the mask norm by attack success: it rises by
    ``cost_multiplier`` after ``patience`` epochs in which the trigger reaches
    ``attack_success_threshold``, and falls by ``cost_multiplier ** 1.5`` after ``patience``
    epochs in which it does not. Here one "epoch" is a window of ``adjust_every`` steps and the
    patience is one window (the paper: 5 epochs over the whole clean set), so that the schedule
    acts within a CPU budget of a few hundred steps per class.

    Attributes:
        steps: Adam steps per class (upper bound; early stopping may end a class sooner).
        lr: Adam learning rate (the paper: 0.1, betas (0.5, 0.9)).
        init_cost: initial weight of the mask L1 norm (the paper: 1e-3).
        cost_multiplier: factor of the cost adjustment (the paper: 1.5).
        attack_success_threshold: a trigger counts as working above this success rate on a
            batch (the paper: 0.99).
        adjust_every: steps per window of the cost schedule.
        early_stop_patience: windows without a 1% improvement of the best mask norm, once the
            cost went both up and down, before a class stops; 0 disables early stopping.
        batch_size: clean samples per step, drawn from all classes.
        num_samples_per_class: clean samples used per class (the first ones given).
        threshold: anomaly-index threshold of the MAD test (the paper: 2).
        seed: seed of the initialisation and of the batch sampling.
    """

    steps: int = 300
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    attack_success_threshold: float = 0.99
    adjust_every: int = 10
    early_stop_patience: int = 5
    batch_size: int = 32
    num_samples_per_class: int = 50
    threshold: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
                    "num_samples_per_class": self.num_samples_per_class, "adjust_every": self.adjust_every,
                    "threshold": self.threshold}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.init_cost < 0:
            raise ValueError(f"init_cost must be >= 0, got {self.init_cost}")
        if not self.cost_multiplier > 1:
            raise ValueError(f"cost_multiplier must be > 1, got {self.cost_multiplier}")
        if not 0 < self.attack_success_threshold <= 1:
            raise ValueError(f"attack_success_threshold must be in (0, 1], got {self.attack_success_threshold}")
        if self.early_stop_patience < 0:
            raise ValueError(f"early_stop_patience must be >= 0, got {self.early_stop_patience}")


@dataclass(frozen=True)
class NeuralCleanseResult:
    """Verdict of :func:`detect_neural_cleanse` with the per-class evidence.

    Attributes:
        mask_norms: L1 norm of each class's reverse-engineered mask (the smallest one that
            reached the attack-success threshold; the last one if none did).
        attack_success: success rate of each class's trigger on the pooled clean samples of
            the other classes.
        reached: whether the class's trigger ever reached the attack-success threshold.
        anomaly_index: per class, ``(median - norm) / MAD`` on max-normalised norms; positive
            for norms below the median (the paper reports the absolute value).
        flagged: classes whose norm is a low outlier above ``config.threshold``, most
            anomalous first.
        score: model-level score, the largest anomaly index of a norm below the median (0 when
            there is none).
        outlier_test: the MAD test on the negated norms.
        masks: ``(K, H, W)`` masks; patterns: ``(K, C, H, W)`` patterns in normalised space.
        steps: optimisation steps run per class.
        seconds: wall time.
        config: the settings used.
    """

    mask_norms: tuple[float, ...]
    attack_success: tuple[float, ...]
    reached: tuple[bool, ...]
    anomaly_index: tuple[float, ...]
    flagged: tuple[int, ...]
    score: float
    outlier_test: OutlierTest
    masks: Tensor
    patterns: Tensor
    steps: tuple[int, ...]
    seconds: float
    config: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)

    @property
    def backdoor(self) -> bool:
        """Whether any class was flagged."""
        return bool(self.flagged)

    def to_dict(self) -> dict:
        """JSON-ready summary (masks and patterns left out; they are in the tensors)."""
        return {"method": "neural_cleanse", "backdoor": self.backdoor, "flagged": list(self.flagged),
                "score": self.score, "mask_norms": list(self.mask_norms),
                "attack_success": list(self.attack_success), "reached": list(self.reached),
                "anomaly_index": list(self.anomaly_index), "outlier_test": asdict(self.outlier_test),
                "steps": list(self.steps), "seconds": self.seconds, "config": asdict(self.config)}


def normalized_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Per-channel bounds of ``[0, 1]`` images after ``(x - mean) / std``.

    Shape:
        returns two ``(C,)`` tensors.
    """
    m = torch.as_tensor(mean, dtype=torch.float32).flatten()
    s = torch.as_tensor(std, dtype=torch.float32).flatten()
    if m.shape != s.shape or (s <= 0).any():
        raise UserInputError(f"mean and std need the same length and std > 0; got mean={list(mean)}, std={list(std)}")
    return (0.0 - m) / s, (1.0 - m) / s


def _bounds(input_range: tuple[Bound, Bound] | None, mean: Sequence[float] | None, std: Sequence[float] | None,
            channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if (input_range is None) == (mean is None or std is None):
        raise UserInputError("give either input_range=(lo, hi) in the model's input space or mean and std")
    lo, hi = normalized_bounds(mean, std) if input_range is None else input_range
    lo = torch.as_tensor(lo, dtype=torch.float32).flatten().to(device)
    hi = torch.as_tensor(hi, dtype=torch.float32).flatten().to(device)
    lo, hi = lo.expand(channels) if lo.numel() == 1 else lo, hi.expand(channels) if hi.numel() == 1 else hi
    if lo.numel() != channels or hi.numel() != channels or not (hi > lo).all():
        raise UserInputError(f"the input range needs one (lo < hi) pair per channel ({channels}); "
                             f"got lo={lo.tolist()}, hi={hi.tolist()}")
    return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)


def _mask_of(raw: Tensor) -> Tensor:
    return torch.tanh(raw) / (2 - TANH_EPS) + 0.5


def _atanh_of(value: Tensor) -> Tensor:
    return torch.atanh((value - 0.5) * (2 - TANH_EPS))


def reverse_engineer_trigger(model: nn.Module, x_pool: Tensor, target: int, lo: Tensor, hi: Tensor,
                             config: NeuralCleanseConfig, gen: torch.Generator) -> dict:
    """Optimise one class's mask and pattern (the model must be in eval mode and frozen).

    Returns:
        dict with ``mask`` ``(H, W)``, ``pattern`` ``(C, H, W)``, ``norm``, ``reached`` and
        ``steps``.
    """
    device = x_pool.device
    _, c, h, w = x_pool.shape
    mask_raw = _atanh_of(torch.rand(1, 1, h, w, generator=gen) * 0.8 + 0.1).to(device).requires_grad_()
    pattern_raw = _atanh_of(torch.rand(1, c, h, w, generator=gen) * 0.8 + 0.1).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=(0.5, 0.9))
    labels = torch.full((config.batch_size,), target, dtype=torch.long, device=device)
    cost = config.init_cost
    best_norm, best_mask, best_pattern = math.inf, None, None
    went_up = went_down = False
    window_hits, window_seen, stale = 0, 0, 0
    last_best = math.inf
    step = 0
    for step in range(1, config.steps + 1):
        idx = torch.randint(0, len(x_pool), (config.batch_size,), generator=gen).to(device)
        mask = _mask_of(mask_raw)
        pattern = lo + (hi - lo) * _mask_of(pattern_raw)
        logits = model((1 - mask) * x_pool[idx] + mask * pattern)
        ce = F.cross_entropy(logits, labels)
        norm = mask.sum()
        loss = ce + cost * norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hits = int((logits.argmax(1) == target).sum())
            window_hits += hits
            window_seen += len(idx)
            if hits >= config.attack_success_threshold * len(idx) and float(norm) < best_norm:
                best_norm = float(norm)
                best_mask, best_pattern = mask.detach().clone(), pattern.detach().clone()
        if step % config.adjust_every:
            continue
        # Cost schedule (one window = one of the paper's epochs, patience one window).
        success = window_hits / window_seen
        window_hits = window_seen = 0
        if success >= config.attack_success_threshold:
            cost = config.init_cost if cost == 0 else cost * config.cost_multiplier
            went_up = True
        else:
            cost /= config.cost_multiplier ** 1.5
            went_down = True
        if config.early_stop_patience and went_up and went_down:
            stale = stale + 1 if best_norm > 0.99 * last_best else 0
            last_best = min(last_best, best_norm)
            if stale >= config.early_stop_patience:
                break
    reached = best_mask is not None
    if not reached:
        with torch.no_grad():
            best_mask = _mask_of(mask_raw).detach().clone()
            best_pattern = (lo + (hi - lo) * _mask_of(pattern_raw)).detach().clone()
            best_norm = float(best_mask.sum())
    return {"mask": best_mask[0, 0], "pattern": best_pattern[0], "norm": best_norm, "reached": reached, "steps": step}


@torch.no_grad()
def _trigger_success(model: nn.Module, x: Tensor, mask: Tensor, pattern: Tensor, target: int,
                     batch_size: int = 256) -> float:
    if len(x) == 0:
        return 0.0
    hits = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        hits += int((model((1 - mask) * xb + mask * pattern).argmax(1) == target).sum())
    return hits / len(x)


def detect_neural_cleanse(model: nn.Module, class_inputs: dict[int, Tensor], num_classes: int,
                          config: NeuralCleanseConfig | None = None,
                          input_range: tuple[Bound, Bound] | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          progress: bool = False) -> NeuralCleanseResult:
    """Reverse-engineer a trigger per class and flag classes with an anomalously small one.

    Wang et al., "Neural Cleanse", IEEE S&P 2019 (Sections IV-V). The clean samples of all
    classes form one pool; each class's trigger is optimised on random batches of that pool.

    Cost: at most ``num_classes * steps * batch_size`` forward-backward passes. Measured with
    one thread on the 2-core CPU (docs/baselines.md): 33 s with the defaults on the default
    ``cnn`` (10 classes, 1x28x28, trained; classes stopped early after 130-300 steps); about
    60 s if no class stops early (0.6 ms per sample and step).

    Args:
        model: the classifier (left unchanged, in its original mode).
        class_inputs: clean normalised samples per class, as built by ``class_inputs`` in the
            CLI; every class in ``range(num_classes)`` may be a target.
        num_classes: number of classes of the model.
        config: settings.
        input_range: ``(lo, hi)`` bounds of the model's (normalised) input, scalars or per
            channel; the pattern is kept inside them.
        mean: alternatively, the normalisation mean (with ``std``): the bounds are those of
            ``[0, 1]`` images after normalisation.
        std: the normalisation std.
        progress: progress bar over classes.

    Shape:
        class_inputs: ``{c: (n_c, C, H, W)}``.

    Raises:
        UserInputError: no samples, mismatched shapes, or neither/both of ``input_range`` and
            ``mean``/``std``.

    Example:
        >>> res = detect_neural_cleanse(model, inputs, 10, mean=(0.286,), std=(0.353,))
        >>> res.flagged, res.score
    """
    config = config or NeuralCleanseConfig()
    t0 = time.perf_counter()
    if num_classes < 2:
        raise UserInputError(f"num_classes must be >= 2, got {num_classes}")
    pools = {c: class_inputs[c][:config.num_samples_per_class] for c in sorted(class_inputs)}
    pools = {c: p for c, p in pools.items() if len(p)}
    if not pools:
        raise UserInputError("class_inputs holds no samples")
    shapes = {tuple(p.shape[1:]) for p in pools.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise UserInputError(f"class_inputs must hold image batches (N, C, H, W) of one shape; got {sorted(shapes)}")
    x_pool = torch.cat(list(pools.values()))
    labels_pool = torch.cat([torch.full((len(p),), c) for c, p in pools.items()])
    lo, hi = _bounds(input_range, mean, std, x_pool.shape[1], x_pool.device)
    gen = torch.Generator().manual_seed(config.seed)
    per_class = []
    with eval_mode(model), frozen(model), cpu_channels_last(model):
        for k in tqdm(range(num_classes), desc="neural cleanse", disable=not progress, unit="class"):
            trig = reverse_engineer_trigger(model, x_pool, k, lo, hi, config, gen)
            others = x_pool[(labels_pool != k).to(x_pool.device)]
            trig["success"] = _trigger_success(model, others, trig["mask"], trig["pattern"], k)
            logger.info("neural cleanse class %d: mask L1 %.2f, success %.3f, %d steps", k, trig["norm"],
                        trig["success"], trig["steps"])
            per_class.append(trig)
    norms = torch.tensor([t["norm"] for t in per_class], dtype=torch.double)
    # Low outliers of the norms are the upper outliers of their negation (the test is scale-free).
    test = mad_outliers(-norms, config.threshold)
    below = [i for i in range(num_classes) if test.normalized[i] > test.median]
    score = max((test.anomaly_index[i] for i in below), default=0.0)
    return NeuralCleanseResult(
        mask_norms=tuple(float(v) for v in norms), attack_success=tuple(t["success"] for t in per_class),
        reached=tuple(t["reached"] for t in per_class), anomaly_index=test.anomaly_index, flagged=test.flagged,
        score=float(max(score, 0.0)), outlier_test=test,
        masks=torch.stack([t["mask"].cpu() for t in per_class]),
        patterns=torch.stack([t["pattern"].cpu() for t in per_class]),
        steps=tuple(t["steps"] for t in per_class), seconds=time.perf_counter() - t0, config=config)
