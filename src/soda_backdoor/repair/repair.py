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
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..analysis.hooks import LayerRef, intervene
from ..analysis.split import Split, deepest_split, split_after
from ..data.augment import natural_variation
from ..errors import UserInputError, check_at_least, check_finite, check_interval
from ..utils import cpu_channels_last, inference_view, run_batched

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16")
"""Precisions of the repair's tuning (``RepairConfig.precision``)."""


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere autocast emulates it, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def tuning_precision(precision: str, device: torch.device) -> str:
    """The precision the tuning runs at: ``auto`` is bfloat16 where ``device`` computes it natively
    (:func:`native_bfloat16`), float32 elsewhere; any other value is kept."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16(device) else "float32"


@dataclass(frozen=True)
class RepairConfig:
    """Settings of the repair.

    Attributes:
        top: fraction of neurons kept by the mask (1.0: no mask).
        epochs: passes over the clean defender subset (10: with only the tail tuned, as many
            backdoors go as with 5 at half the accuracy cost on the dev zoo; docs/repair.md).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        reg: weight of the term that pushes reconstructed samples away from the target.
        reg_cap: cap on that cross-entropy term (beyond it the term gives no gradient).
        batch_size: samples per batch.
        num_recon: reconstructed samples per batch.
        bn_train: update batch-norm statistics during fine-tuning (train mode). Off by default:
            batches that are 30% reconstructed samples shift the statistics and cost accuracy.
        tune_from: fine-tune only the layers after this module's output. ``"auto"`` (default):
            the cut closest to the output that leaves half of the weights to tune
            (:func:`~soda_backdoor.analysis.split.deepest_split`; the whole model where no cut
            qualifies); ``None``: every layer. The frozen part runs once per sample instead of
            once per step: as good on the dev zoo and 2x to 4x faster (docs/repair.md).
        variations: varied copies of each clean source sample tried by
            :func:`mine_variations`; those the model sends to the target join the
            reconstructed samples (0: none). They reach the subgroups the reconstruction
            misses (darker, larger, wider, smoother sources); docs/repair.md.
        max_variations: at most this many of them are used.
        variation_confidence: a varied sample counts as sent to the target when the target is
            its top class and, above 0, its softmax probability reaches this (0: the top
            class alone).
        variation_anchor: above 0, only variations of clean samples that the model itself
            gives the source with at least this softmax probability are kept: the variation,
            not an ambiguous original, moved them to the target (0: every original). 0.95,
            the detector's confidence: on the dev zoo the same backdoors but one at a third
            less accuracy cost, on test the same at half the largest cost (docs/repair.md).
        variation_generations: rounds of variation: each round varies the previous round's hits
            again (a walk through the family that the model steers towards its backdoor,
            reaching past one variation's range) and contributes an equal share of
            ``max_variations`` (1: one round).
        cut_target: above 0, before fine-tuning, the links to the target of the head's input
            neurons that carry the infected samples (reconstructed and varied) to the target
            more than the clean source samples are cut and held at 0, the fewest neurons
            covering this share of that excess (0: none). Research; docs/repair.md.
        feature_samples: above 0, up to this many clean source samples (those the model gives
            the source with ``variation_anchor``) are also moved, at the cut of ``tune_from``,
            by normalised gradient steps (``feature_step`` of their norm each, at most
            ``feature_steps``) until the tail sends them to the target, and join the
            reconstructed samples: infected samples reconstructed in feature space, next to
            the data (needs a cut; 0: none, the default). Opt-in: on the dev zoo 100 of them
            remove 10 of 14 backdoors against 8, on the test zoo 14 of 16 either way, at
            about 0.1 point more accuracy lost (docs/repair.md).
        feature_step: length of one feature-space step, as a share of the start's norm.
        feature_steps: most steps of a feature-space reconstruction.
        feature_threshold: softmax probability of the target at which a feature-space
            reconstruction stops (the target must also be its top class). 0.99: 28 of 42 dev
            repairs removed against 25 at 0.5, at a larger cost that the guard bounds.
        feature_guard: with feature samples, the repair is kept only if it costs at most this
            many points of clean accuracy on the guard half of the held-out test split (every
            other clean test sample); else the repair runs again without them, exactly as
            with ``feature_samples=0``. The report says which ran. 1.5: the middle of the
            guards that remove the most on the dev zoo (1.25 to 2); ``None``: no guard.
        precision: ``auto`` (default), ``float32`` or ``bfloat16``: the tuning's forward passes
            run under ``torch.autocast`` at this precision; the weights, the optimiser and every
            measurement stay float32. ``bfloat16`` is faster where the hardware computes it
            natively (CPUs with AVX512-BF16 or AMX, recent GPUs) and slower where it does not, so
            ``auto`` takes it only there (:func:`tuning_precision`). The same ASR after on 14 of
            14 dev and 16 of 16 test models, accuracy within 0.07 points (docs/repair.md).
        seed: seed of shuffling and sampling.
    """

    top: float = 1.0
    epochs: int = 10
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: float = 0.01
    reg_cap: float = 5.0
    batch_size: int = 64
    num_recon: int = 20
    bn_train: bool = False
    tune_from: str | None = "auto"
    variations: int = 10
    max_variations: int = 200
    variation_confidence: float = 0.0
    variation_anchor: float = 0.95
    variation_generations: int = 1
    cut_target: float = 0.0
    feature_samples: int = 0
    feature_step: float = 0.02
    feature_steps: int = 100
    feature_threshold: float = 0.99
    feature_guard: float | None = 1.5
    precision: str = "auto"
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
        check_at_least("variations", self.variations, 0)
        check_at_least("max_variations", self.max_variations, 0)
        check_interval("variation_confidence", self.variation_confidence, 0.0, 1.0)
        check_interval("variation_anchor", self.variation_anchor, 0.0, 1.0)
        check_at_least("variation_generations", self.variation_generations, 1)
        check_interval("cut_target", self.cut_target, 0.0, 1.0)
        check_at_least("feature_samples", self.feature_samples, 0)
        check_finite("feature_step", self.feature_step, positive=True)
        check_at_least("feature_steps", self.feature_steps, 1)
        check_interval("feature_threshold", self.feature_threshold, 0.0, 1.0)
        if self.feature_guard is not None:
            check_at_least("feature_guard", self.feature_guard, 0.0)
        if self.precision not in PRECISIONS:
            raise UserInputError(f"unknown repair precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class RepairResult:
    """What the repair did (the repaired weights are in the module passed in)."""

    mask: Tensor
    num_kept: int
    num_neurons: int
    history: list[dict[str, float]]
    config: RepairConfig = field(default_factory=RepairConfig)
    seconds: float = 0.0
    tuned_from: str | None = None
    num_feature: int = 0


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


def mine_variations(model: nn.Module, x_source: Tensor, target: int, copies: int, cap: int,
                    normalize: Callable[[Tensor], Tensor], gen: torch.Generator,
                    confidence: float = 0.0, source: int | None = None, anchor: float = 0.0,
                    generations: int = 1) -> Tensor:
    """Natural variations of clean source samples that the model sends to ``target``.

    ``copies`` varied copies of each of ``x_source`` (pixels in [0, 1],
    :func:`~soda_backdoor.data.augment.natural_variation`) are classified; the first ``cap``
    that land on the target (its top class, with at least ``confidence`` of softmax
    probability; with ``anchor`` > 0, only copies of originals the model gives ``source``
    with at least that probability) are returned, normalised. Labelled with the source during the
    repair, they carry the real property the backdoor keys on whenever the family of
    variations reaches it; when it does not, none land on the target and nothing changes.
    """
    empty = x_source.new_zeros((0, *x_source.shape[1:]))
    if copies <= 0 or cap <= 0 or len(x_source) == 0:
        return empty
    kept, share = [], max(1, cap // max(generations, 1))
    with inference_view(model) as fast, torch.inference_mode():
        def probs(x: Tensor) -> Tensor:
            return run_batched(lambda v: fast(v).float().softmax(1), x)

        parents = x_source
        for g in range(max(generations, 1)):
            if len(parents) == 0:
                break
            raw = torch.cat([natural_variation(parents, gen) for _ in range(copies)])
            p = probs(normalize(raw))
            hit = (p.argmax(1) == target) & (p[:, target] >= confidence)
            if g == 0 and anchor > 0 and source is not None:
                hit &= (probs(normalize(x_source))[:, source] >= anchor).repeat(copies)  # copy k of j: k * n + j
            parents = raw[hit.to(raw.device)][:max(cap, len(x_source))]  # the next generation varies these
            kept.append(normalize(parents[:share]))
    return torch.cat(kept)[:cap].clone() if kept else empty


def feature_reconstructions(tail: nn.Module, h: Tensor, target: int, step: float, steps: int,
                            threshold: float) -> Tensor:
    """Move activations ``h`` (at a cut) towards ``target`` through ``tail``; return those that get there.

    Each row takes normalised gradient steps on ``-log p_target`` of length ``step`` times its
    start's norm (scale-free, so one setting serves every layer) until ``tail`` gives it the
    target as top class with softmax at least ``threshold``, for at most ``steps`` steps. A
    start that was non-negative (after a ReLU or a pooling of one) stays non-negative.
    """
    if len(h) == 0:
        return h
    was = tail.training
    tail.eval()
    try:  # autograd.grad with respect to the activations alone: the weights' .grad stay untouched
        size = h.flatten(1).norm(dim=1).clamp_min(1e-12)
        nonneg = bool((h >= 0).all())
        done = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        x = h.clone()
        view = (-1, *([1] * (h.dim() - 1)))
        for _ in range(steps + 1):
            xr = x.detach().requires_grad_(True)
            logp = tail(xr).float().log_softmax(1)
            done |= (logp.argmax(1) == target) & (logp[:, target] >= math.log(max(threshold, 1e-12)))
            if bool(done.all()):
                break
            (g,) = torch.autograd.grad(-logp[:, target].sum(), xr)
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            move = (step * size / gn).view(view) * g
            x = torch.where(done.view(view), x, x - move).detach()
            if nonneg:
                x = x.clamp_min(0)
        return x[done].detach()
    finally:
        tail.train(was)


def _apply_mask(mask: Tensor):
    def edit(h: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (h.dim() - 2)
        return h * mask.to(h.device, h.dtype).view(shape)
    return edit


def _tuned_part(model: nn.Module, x: Tensor, tune_from: str | None) -> Split | None:
    """The split whose tail is fine-tuned, or ``None`` for the whole model.

    ``"auto"`` falls back to the whole model (with a warning) where no cut qualifies, e.g. a
    model ``torch.fx`` cannot trace; a named layer that cannot be cut is an error.
    """
    if tune_from is None:
        return None
    model.eval()
    if tune_from != "auto":
        return split_after(model, tune_from)
    try:
        return deepest_split(model, x)
    except UserInputError as exc:
        logger.warning("repair: fine-tuning every layer (%s)", exc)
        return None


def _head(net: nn.Module) -> nn.Linear:
    heads = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise UserInputError("cut_target needs a model whose last layer is nn.Linear")
    return heads[-1]


def cut_target_links(net: nn.Module, x_infected: Tensor, x_source: Tensor, source: int, target: int,
                     share: float):
    """Cut (and hold at 0) the head's links to ``target`` from the neurons that carry the backdoor.

    A neuron's excess is ``(mean h_j(infected) - mean h_j(source)) * (W[t, j] - W[s, j])`` at
    the input ``h`` of the last Linear layer: how much more it pushes the infected samples than
    the clean source samples from the source to the target. The fewest neurons covering
    ``share`` of the positive excess lose their link to the target. Returns their indices and
    the handle of the gradient hook that holds the links at 0 (remove it after the tuning).
    """
    head = _head(net)
    feats: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach().flatten(1)))
    try:
        was = net.training
        net.eval()
        run_batched(net, x_infected)
        h_inf = torch.cat(feats).mean(0)
        feats.clear()
        run_batched(net, x_source)
        h_src = torch.cat(feats).mean(0) if feats else torch.zeros_like(h_inf)
        net.train(was)
    finally:
        handle.remove()
    w = head.weight.detach()
    excess = ((h_inf - h_src) * (w[target] - w[source])).clamp(min=0)
    order = excess.argsort(descending=True)
    covered = excess[order].cumsum(0) / excess.sum().clamp(min=1e-12)
    cut = order[:int((covered < share).sum()) + 1]
    keep = torch.ones_like(head.weight)
    keep[target, cut] = 0
    with torch.no_grad():
        head.weight.mul_(keep)
    hold = head.weight.register_hook(lambda g: g * keep)
    logger.info("repair: cut %d links to class %d", len(cut), target)
    return cut, hold


def _feature_samples(tail: nn.Module, h_source: Tensor, source: int, target: int, config: RepairConfig) -> Tensor:
    """Feature-space reconstructions from the clean source samples the tail gives the source confidently."""
    if len(h_source) == 0:  # the defender holds no clean sample of the source
        return h_source
    with torch.no_grad():
        p = run_batched(lambda v: tail(v).float().softmax(1), h_source)
    starts = h_source[p[:, source] >= config.variation_anchor][:config.feature_samples]
    out = feature_reconstructions(tail, starts, target, config.feature_step, config.feature_steps,
                                  config.feature_threshold)
    logger.info("repair: %d of %d feature-space reconstructions reached class %d", len(out), len(starts), target)
    return out


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
    config = replace(config, precision=tuning_precision(config.precision, device))  # the result says what ran
    gen = torch.Generator().manual_seed(config.seed)
    mask = outstanding_neurons(attribution_to_target.cpu(), config.top)
    use_mask = config.top < 1.0
    n, history, n_feature = len(y_clean), [], 0
    with cpu_channels_last(model), (intervene(model, ref, _apply_mask(mask)) if use_mask else nullcontext()):
        net, tuned_from = model, None
        split = _tuned_part(model, x_clean, config.tune_from)
        if split is not None:  # the frozen part runs once; each step runs the tail only
            x_clean, x_recon = run_batched(split.prefix, x_clean), run_batched(split.prefix, x_recon)
            net, tuned_from = split.tail, split.layer
            if config.feature_samples > 0:
                x_feature = _feature_samples(net, x_clean[y_clean == source], source, target, config)
                x_recon, n_feature = torch.cat([x_recon, x_feature]), len(x_feature)
        elif config.feature_samples > 0:
            logger.warning("repair: no cut, so no feature-space reconstructions")
        n_recon = min(config.num_recon, len(x_recon)) if len(x_recon) else 0
        k_clean = config.batch_size - n_recon
        steps = (len(y_clean) + k_clean - 1) // k_clean
        hold = None
        if config.cut_target > 0 and len(x_recon):
            _, hold = cut_target_links(net, x_recon, x_clean[y_clean == source], source, target, config.cut_target)
        opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        low = config.precision != "float32"
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
                with torch.autocast(device.type, dtype=getattr(torch, config.precision), enabled=low):
                    logits = net(xb)
                logits = logits.float()
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
        if hold is not None:
            hold.remove()
    model.eval()
    return RepairResult(mask, int(mask.sum()), mask.numel(), history, config, time.perf_counter() - t0,
                        tuned_from, n_feature)
