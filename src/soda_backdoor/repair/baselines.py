"""Repair baselines: the defenses a user would reach for instead of SODA (issue 17).

Every method has one signature, ``fn(model, layer, x_clean, y_clean, config, progress)``, and
is reached through :func:`repair_with` by name (the registry :data:`REPAIR_BASELINES`):

- ``finetune``: plain fine-tuning on the defender's clean data.
- ``fineprune``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018).
- ``nad``: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, ICLR 2021).
- ``anp``: Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021).

The model is repaired in place and keeps its architecture: pruning is baked into the weights
(zeroed rows or columns), so ``state_dict`` keys and shapes do not change. ``x_clean`` and
``y_clean`` are the defender's clean subset, normalised as the model expects. What differs
from each paper is listed in docs/baselines.md.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..analysis.hooks import LayerRef, intervene, parse_layer
from ..errors import UserInputError
from ..utils import cpu_channels_last, eval_mode, frozen, pass_batch

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class BaselineRepairConfig:
    """Settings shared by the repair baselines, plus per-method fields (prefixed).

    Attributes:
        epochs: fine-tuning epochs over the clean subset (``finetune``, ``fineprune`` after
            pruning, the ``nad`` student). ``anp`` does not fine-tune.
        lr: SGD learning rate of every fine-tuning.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: samples per batch (also ANP's mask-optimisation batch).
        bn_train: fine-tune with batch-norm in train mode (batch statistics, running
            statistics updated), as the papers do.
        seed: seed of shuffling, splits and ANP's random perturbation start.
        fp_val_fraction: share of the clean subset held out to measure the accuracy drop while
            pruning (Fine-Pruning).
        fp_acc_drop: pruning stops before the held-out accuracy drops by more than this
            (absolute; the paper: 4 points).
        fp_step: fraction of the layer's neurons pruned per pruning step.
        fp_max_ratio: never prune more than this fraction of the layer.
        nad_teacher_epochs: fine-tuning epochs of the NAD teacher.
        nad_betas: weight of the attention loss per distilled layer (the paper: 500, 1000,
            1000 for its three residual groups); their number is the number of layers.
        nad_p: power of the attention map ``sum_c |f_c|^p`` (the paper: 2).
        nad_layers: names of the distilled modules; empty picks them generically (see
            :func:`attention_layers`).
        anp_eps: bound of the multiplicative neuron perturbation (the paper: 0.4).
        anp_steps: sign-gradient steps of the perturbation per batch (the paper: 1).
        anp_alpha: weight of the natural loss against the perturbed one (the paper: 0.2).
        anp_lr: SGD learning rate of the masks, momentum 0.9 (the paper: 0.2).
        anp_iterations: mask-optimisation batches (the paper: 2000 of 128 samples; fewer here
            for a CPU budget, see docs/baselines.md).
        anp_threshold: neurons whose mask ends below this are pruned (the paper: 0.2).
        anp_bn_train: run the mask optimisation with batch-norm on batch statistics (train
            mode), as the paper's code does; the running statistics are restored afterwards.
    """

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    bn_train: bool = True
    seed: int = 0
    fp_val_fraction: float = 0.2
    fp_acc_drop: float = 0.04
    fp_step: float = 0.05
    fp_max_ratio: float = 0.95
    nad_teacher_epochs: int = 10
    nad_betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    nad_p: float = 2.0
    nad_layers: tuple[str, ...] = ()
    anp_eps: float = 0.4
    anp_steps: int = 1
    anp_alpha: float = 0.2
    anp_lr: float = 0.2
    anp_iterations: int = 500
    anp_threshold: float = 0.2
    anp_bn_train: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "nad_teacher_epochs", "anp_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "batch_size", "fp_step", "nad_p", "anp_lr", "anp_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("fp_val_fraction", "fp_max_ratio", "anp_alpha", "anp_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.fp_val_fraction < 1:
            raise ValueError(f"fp_val_fraction must be in (0, 1), got {self.fp_val_fraction}")
        if self.fp_acc_drop < 0 or self.anp_eps < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("fp_acc_drop, anp_eps, momentum and weight_decay must be >= 0")
        if not self.nad_betas or any(b < 0 for b in self.nad_betas):
            raise ValueError(f"nad_betas needs at least one weight, all >= 0; got {self.nad_betas}")
        if self.nad_layers and len(self.nad_layers) != len(self.nad_betas):
            raise ValueError(f"nad_layers ({len(self.nad_layers)}) and nad_betas ({len(self.nad_betas)}) "
                             "must have the same length")


@dataclass(frozen=True)
class BaselineRepairResult:
    """What a baseline did (the repaired weights are in the module passed in).

    Attributes:
        method: registry name of the method.
        seconds: wall time.
        history: per-epoch (or per-phase) records: losses, accuracies, pruning steps.
        pruned: neurons pruned per layer name (empty for methods that do not prune).
        num_neurons: neurons per pruned-or-masked layer name.
        layers: the layers the method worked on (pruned, distilled or masked).
        config: the settings used.
    """

    method: str
    seconds: float
    history: list[dict[str, float]]
    pruned: dict[str, int]
    num_neurons: dict[str, int]
    layers: tuple[str, ...]
    config: BaselineRepairConfig = field(default_factory=BaselineRepairConfig)

    @property
    def num_pruned(self) -> int:
        """Neurons pruned over all layers."""
        return sum(self.pruned.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_pruned"] = self.num_pruned
        return d


# ----------------------------------------------------------------------------- shared pieces

def _check_data(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise UserInputError(f"x_clean (N, ...) and y_clean (N,) must match; got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) < 2:
        raise UserInputError(f"the clean subset needs at least 2 samples, got {len(y)}")


def _ce_loss(model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, dict[str, float]]:
    loss = F.cross_entropy(model(xb), yb)
    return loss, {}


def _train(model: nn.Module, x: Tensor, y: Tensor, config: BaselineRepairConfig, epochs: int, gen: torch.Generator,
           loss_fn: LossFn = _ce_loss, desc: str = "fine-tune", progress: bool = False) -> list[dict[str, float]]:
    """SGD on ``(x, y)`` for ``epochs`` epochs; returns per-epoch mean losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or epochs == 0:
        return []
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    n, bs = len(y), config.batch_size
    history = []
    was_training = model.training
    try:
        for epoch in range(epochs):
            model.train(config.bn_train)
            perm = torch.randperm(n, generator=gen).to(x.device)
            sums: dict[str, float] = {}
            seen = 0
            bar = tqdm(range(0, n, bs), desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for start in bar:
                idx = perm[start:start + bs]
                if len(idx) < 2 and config.bn_train:
                    continue  # batch-norm cannot take a batch of one in train mode
                loss, parts = loss_fn(model, x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                seen += len(idx)
            record = {"phase": desc, "epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()}}
            history.append(record)
            logger.info("%s epoch %d: %s", desc, epoch + 1, record)
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int | None = None) -> float:
    batch_size = batch_size or pass_batch(x.device)
    with eval_mode(model), cpu_channels_last(model):
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    return correct / max(len(y), 1)


def _split(n: int, val_fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=gen)
    n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    return perm[n_val:], perm[:n_val]


def _channel_mask_edit(keep: Tensor) -> Callable[[Tensor], Tensor]:
    def edit(h: Tensor) -> Tensor:
        return h * keep.to(h.device, h.dtype).view([1, -1] + [1] * (h.dim() - 2))
    return edit


@torch.no_grad()
def bake_channel_mask(model: nn.Module, ref: LayerRef, keep: Tensor) -> None:
    """Make zeroing the channels ``~keep`` at ``ref`` permanent in the weights.

    At a module's input the matching input columns of its weight are zeroed (``nn.Linear``,
    ``nn.Conv*`` with one group); at a module's output its weight rows and bias entries are
    zeroed (``nn.Linear``, ``nn.Conv*``, affine batch-norm), so the channel outputs exactly 0.
    The forward pass then equals the one with the mask hook; the architecture is unchanged.

    Raises:
        UserInputError: the module at ``ref`` has no weight laid out that way.
    """
    module = model.get_submodule(ref.name)
    weight = getattr(module, "weight", None)
    drop = ~keep.bool()
    if not isinstance(weight, Tensor):
        raise UserInputError(f"cannot prune at {ref}: {type(module).__name__} has no weight; pick a Linear, Conv or "
                             "affine BatchNorm layer, or the input of a Linear/Conv")
    if ref.point == "input":
        if weight.dim() < 2 or weight.shape[1] != keep.numel() or getattr(module, "groups", 1) != 1:
            raise UserInputError(f"cannot prune at {ref}: the weight {tuple(weight.shape)} of "
                                 f"{type(module).__name__} does not take {keep.numel()} input channels on dim 1")
        weight[:, drop.to(weight.device)] = 0.0
        return
    if weight.shape[0] != keep.numel():
        raise UserInputError(f"cannot prune at {ref}: the weight {tuple(weight.shape)} of {type(module).__name__} "
                             f"does not produce {keep.numel()} channels on dim 0")
    weight[drop.to(weight.device)] = 0.0
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias[drop.to(bias.device)] = 0.0


# ----------------------------------------------------------------------------- fine-tuning

def repair_finetune(model: nn.Module, layer: str | LayerRef | None, x_clean: Tensor, y_clean: Tensor,
                    config: BaselineRepairConfig, progress: bool = False) -> BaselineRepairResult:
    """Plain fine-tuning of all parameters on the clean subset (SGD, ``config.epochs``).

    The baseline every backdoor-removal paper compares with, e.g. Liu et al., RAID 2018,
    Section 4.1. ``layer`` is not used.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    history = _train(model, x_clean, y_clean, config, config.epochs, gen, progress=progress)
    return BaselineRepairResult("finetune", time.perf_counter() - t0, history, {}, {}, (), config)


# ----------------------------------------------------------------------------- fine-pruning

@torch.no_grad()
def mean_activation(model: nn.Module, ref: LayerRef, x: Tensor, batch_size: int = 256) -> Tensor:
    """Mean activation per neuron (dim 1) at ``ref`` over ``x`` (and spatial positions)."""
    total: Tensor | None = None
    seen = 0

    def record(h: Tensor) -> None:
        nonlocal total, seen
        per = h.detach().transpose(0, 1).reshape(h.shape[1], -1).double().sum(1)
        total = per if total is None else total + per
        seen += h.numel() // h.shape[1]

    with eval_mode(model), intervene(model, ref, record):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    if total is None:
        raise RuntimeError(f"forward hook on {ref} did not obtain any output: the layer is not used in forward()")
    return (total / max(seen, 1)).float().cpu()


def repair_fineprune(model: nn.Module, layer: str | LayerRef | None, x_clean: Tensor, y_clean: Tensor,
                     config: BaselineRepairConfig, progress: bool = False) -> BaselineRepairResult:
    """Fine-Pruning: prune the neurons least active on clean data, then fine-tune.

    Liu, Dolan-Gavitt, Garg. "Fine-Pruning: Defending Against Backdooring Attacks on Deep
    Neural Networks". RAID 2018, Sections 3-4. Neurons of ``layer`` (default: the input of the
    last ``nn.Linear``, the paper's last convolutional layer after pooling) are pruned in
    increasing order of mean activation on clean data, ``fp_step`` of them at a time, as long
    as the accuracy on a held-out ``fp_val_fraction`` of the clean subset stays within
    ``fp_acc_drop`` of its value before pruning. The pruned model is fine-tuned on the whole
    clean subset with the pruned neurons held at zero, then the pruning is baked into the
    weights (:func:`bake_channel_mask`).
    """
    t0 = time.perf_counter()
    ref = parse_layer(model, layer)
    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = _split(len(y_clean), config.fp_val_fraction, gen)
    x_tr, x_val, y_val = x_clean[train_idx.to(x_clean.device)], x_clean[val_idx.to(x_clean.device)], \
        y_clean[val_idx.to(y_clean.device)]
    act = mean_activation(model, ref, x_tr)
    n = act.numel()
    order = act.argsort()
    step = max(1, int(math.ceil(config.fp_step * n)))
    limit = int(math.floor(config.fp_max_ratio * n))
    base = _accuracy(model, x_val, y_val)
    history: list[dict[str, float]] = [{"phase": "prune", "num_pruned": 0, "val_acc": base}]
    num_pruned = 0
    for k in range(step, limit + 1, step):
        keep = torch.ones(n)
        keep[order[:k]] = 0.0
        with intervene(model, ref, _channel_mask_edit(keep)):
            acc = _accuracy(model, x_val, y_val)
        history.append({"phase": "prune", "num_pruned": k, "val_acc": acc})
        if base - acc > config.fp_acc_drop:
            break
        num_pruned = k
    keep = torch.ones(n)
    keep[order[:num_pruned]] = 0.0
    logger.info("fine-pruning: %d of %d neurons of %s pruned (held-out accuracy %.4f before)", num_pruned, n, ref, base)
    with intervene(model, ref, _channel_mask_edit(keep)):
        history += _train(model, x_clean, y_clean, config, config.epochs, gen, progress=progress)
    bake_channel_mask(model, ref, keep)
    return BaselineRepairResult("fineprune", time.perf_counter() - t0, history, {str(ref): num_pruned},
                                {str(ref): n}, (str(ref),), config)


# ----------------------------------------------------------------------------- NAD

def attention_map(h: Tensor, p: float) -> Tensor:
    """NAD's attention ``sum_c |h_c|^p``, flattened and L2-normalised per sample.

    Shape:
        h: ``(N, C, ...)``; returns ``(N, prod(...))``.
    """
    a = h.abs().pow(p).sum(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_layers(model: nn.Module, x: Tensor, count: int) -> tuple[str, ...]:
    """The last module of each of the last ``count`` spatial resolutions of the network.

    Runs one sample through ``model`` and records, in execution order, the outputs of every
    ``nn.Conv2d`` and ``nn.BatchNorm2d``; the last module to produce each distinct spatial size
    stands for the end of that stage (NAD distils the outputs of a network's stages). When the
    network has fewer stages than ``count``, the last ``count`` modules are taken instead.

    Raises:
        UserInputError: the model has no Conv2d or BatchNorm2d used in forward().
    """
    seen: list[tuple[str, tuple[int, ...]]] = []
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    with ExitStack() as stack, eval_mode(model), torch.no_grad():
        for name in names:
            def record(h: Tensor, name: str = name) -> None:
                seen.append((name, tuple(h.shape[2:])))
            stack.enter_context(intervene(model, LayerRef(name), record))
        model(x[:1])
    if not seen:
        raise UserInputError("NAD needs Conv2d or BatchNorm2d modules to distil; pass nad_layers=(names...)")
    last_of_size: dict[tuple[int, ...], str] = {}
    for name, size in seen:
        last_of_size.pop(size, None)  # re-insert so the dict keeps the order of each size's last module
        last_of_size[size] = name
    stages = list(last_of_size.values())
    if len(stages) >= count:
        return tuple(stages[-count:])
    order = list(dict.fromkeys(name for name, _ in seen))
    return tuple(order[-count:])


@contextmanager
def _batch_statistics(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Train mode (batch-norm on batch statistics) with every buffer restored on exit."""
    if not enabled:
        with eval_mode(model):
            yield
        return
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])


@contextmanager
def _capture_live(model: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, Tensor]]:
    """Keep the latest output of each named module in the yielded dict, in the graph.

    A copy (``clone`` keeps the gradient path): a following in-place module such as
    ``ReLU(inplace=True)`` would otherwise change what was stored, and the distilled map would
    then depend on how the model writes its activations.
    """
    store: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for name in names:
            def keep(h: Tensor, name: str = name) -> None:
                store[name] = h.clone()
            stack.enter_context(intervene(model, LayerRef(name), keep))
        yield store


def repair_nad(model: nn.Module, layer: str | LayerRef | None, x_clean: Tensor, y_clean: Tensor,
               config: BaselineRepairConfig, progress: bool = False) -> BaselineRepairResult:
    """Neural Attention Distillation: fine-tune a teacher, distil its attention into the model.

    Li, Lyu, Koren, Lyu, Li, Ma. "Neural Attention Distillation: Erasing Backdoor Triggers
    from Deep Neural Networks". ICLR 2021, Section 3. A copy of the model fine-tuned on the
    clean subset for ``nad_teacher_epochs`` is the teacher; the model (student) is then trained
    with ``CE + sum_i beta_i * mean((a_s^i - a_t^i)^2)`` where ``a`` is :func:`attention_map`
    at the layers ``nad_layers`` (default: :func:`attention_layers`). ``layer`` is not used.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    names = config.nad_layers or attention_layers(model, x_clean, len(config.nad_betas))
    for name in names:
        parse_layer(model, name)  # unknown names fail here, with the closest valid ones
    teacher = copy.deepcopy(model)
    history = _train(teacher, x_clean, y_clean, config, config.nad_teacher_epochs, gen, desc="nad teacher",
                     progress=progress)
    betas = dict(zip(names, config.nad_betas))

    def loss_fn(student: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad(), _capture_live(teacher, names) as t_store:
            teacher(xb)
        with _capture_live(student, names) as s_store:
            logits = student(xb)
        missing = [n for n in names if n not in s_store or n not in t_store]
        if missing:
            raise RuntimeError(f"forward hooks on {missing} did not obtain any output: not used in forward()")
        ce = F.cross_entropy(logits, yb)
        at = sum(betas[n] * (attention_map(s_store[n], config.nad_p) - attention_map(t_store[n], config.nad_p))
                 .pow(2).mean() for n in names)
        return ce + at, {"ce": ce.item(), "attention": float(at.detach()) if isinstance(at, Tensor) else at}

    with eval_mode(teacher), frozen(teacher):
        history += _train(model, x_clean, y_clean, config, config.epochs, gen, loss_fn, desc="nad student",
                          progress=progress)
    return BaselineRepairResult("nad", time.perf_counter() - t0, history, {}, {}, tuple(names), config)


# ----------------------------------------------------------------------------- ANP

def anp_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose neurons ANP perturbs and masks.

    Every affine ``nn.BatchNorm1d``/``nn.BatchNorm2d`` (the paper's choice); in a model
    without one, every ``nn.Conv2d`` (its output channels).
    """
    bns = [name for name, m in model.named_modules()
           if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.weight is not None]
    if bns:
        return bns
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserInputError("ANP needs BatchNorm1d/2d (affine) or Conv2d modules to mask; the model has none")
    return convs


class _NeuronPerturbation:
    """Per-neuron mask ``m`` and perturbations ``delta``, ``xi`` of one module's output.

    The module computes ``out = w * z + b`` per neuron (``z`` the normalised input of a
    batch-norm, the convolution of a conv layer); the hook returns ``(m + delta) * (out - b)
    + (1 + xi) * b`` when perturbed and ``m * (out - b) + b`` otherwise: the paper's
    perturbation of the weight and bias of each neuron, applied from outside the module.
    """

    def __init__(self, module: nn.Module, num: int, device: torch.device) -> None:
        self.module = module
        self.mask = torch.ones(num, device=device, requires_grad=True)
        self.noise = torch.zeros(num, device=device, requires_grad=True)
        self.noise_bias = torch.zeros(num, device=device, requires_grad=True)
        self.perturbed = False

    def edit(self, out: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (out.dim() - 2)
        bias = self.module.bias
        b = bias.view(shape) if isinstance(bias, Tensor) else torch.zeros((), device=out.device)
        core = out - b
        if self.perturbed:
            return core * (self.mask + self.noise).view(shape) + b * (1 + self.noise_bias).view(shape)
        return core * self.mask.view(shape) + b


def repair_anp(model: nn.Module, layer: str | LayerRef | None, x_clean: Tensor, y_clean: Tensor,
               config: BaselineRepairConfig, progress: bool = False) -> BaselineRepairResult:
    """Adversarial Neuron Pruning: masks learnt under adversarial neuron perturbation.

    Wu and Wang. "Adversarial Neuron Perturbation Exposes Backdoors in Pretrained Models"
    (ANP), NeurIPS 2021, Algorithm 1. For each batch, the perturbations ``delta, xi`` start
    uniform in ``[-eps, eps]`` and take ``anp_steps`` sign-gradient ascent steps on the
    cross-entropy (clipped to ``[-eps, eps]``); the masks then take an SGD step on
    ``alpha * CE(masked) + (1 - alpha) * CE(masked and perturbed)`` and are clipped to
    ``[0, 1]``. The model's weights stay frozen; batch-norm uses batch statistics as in the
    paper's code (``anp_bn_train``; the running statistics are restored). Neurons whose
    mask ends below ``anp_threshold`` are pruned by zeroing their weight (the BN scale, or the
    conv filter), as the paper's code does; there is no fine-tuning. The neurons are those of
    :func:`anp_modules`, perturbed through forward hooks. ``layer`` is not used.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    device = x_clean.device
    names = anp_modules(model)
    perts = {}
    for name in names:
        module = model.get_submodule(name)
        perts[name] = _NeuronPerturbation(module, module.weight.shape[0], device)
    masks = [p.mask for p in perts.values()]
    noises = [t for p in perts.values() for t in (p.noise, p.noise_bias)]
    mask_opt = torch.optim.SGD(masks, lr=config.anp_lr, momentum=0.9)
    eps = config.anp_eps
    history: list[dict[str, float]] = []
    n, bs = len(y_clean), min(config.batch_size, len(y_clean))
    perm = torch.randperm(n, generator=gen)
    pos = 0

    def set_perturbed(flag: bool) -> None:
        for p in perts.values():
            p.perturbed = flag

    sums = {"loss": 0.0, "loss_nat": 0.0, "loss_rob": 0.0}
    report_every = max(1, config.anp_iterations // 10)
    with ExitStack() as stack:
        stack.enter_context(_batch_statistics(model, config.anp_bn_train))
        stack.enter_context(frozen(model))
        for name, p in perts.items():
            stack.enter_context(intervene(model, LayerRef(name), p.edit))
        for it in tqdm(range(config.anp_iterations), desc="anp", disable=not progress, leave=False):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs].to(device)
            pos += bs
            xb, yb = x_clean[idx], y_clean[idx]
            if eps > 0:
                with torch.no_grad():
                    for t in noises:
                        t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1).mul_(eps).to(device))
                set_perturbed(True)
                for _ in range(config.anp_steps):
                    loss_noise = F.cross_entropy(model(xb), yb)
                    grads = torch.autograd.grad(loss_noise, noises)
                    with torch.no_grad():
                        for t, g in zip(noises, grads):
                            t.add_(g.sign(), alpha=eps / config.anp_steps).clamp_(-eps, eps)
                loss_rob = F.cross_entropy(model(xb), yb)
            else:
                loss_rob = torch.zeros((), device=device)
            set_perturbed(False)
            loss_nat = F.cross_entropy(model(xb), yb)
            loss = config.anp_alpha * loss_nat + (1 - config.anp_alpha) * loss_rob
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
            for k, v in (("loss", loss), ("loss_nat", loss_nat), ("loss_rob", loss_rob)):
                sums[k] += float(v.detach())
            if (it + 1) % report_every == 0 or it + 1 == config.anp_iterations:
                count = report_every if (it + 1) % report_every == 0 else (it + 1) % report_every
                history.append({"phase": "anp", "iteration": it + 1, **{k: v / count for k, v in sums.items()}})
                sums = dict.fromkeys(sums, 0.0)
    pruned, num_neurons = {}, {}
    with torch.no_grad():
        for name, p in perts.items():
            drop = p.mask.detach() < config.anp_threshold
            p.module.weight[drop.to(p.module.weight.device)] = 0.0
            pruned[name] = int(drop.sum())
            num_neurons[name] = drop.numel()
    logger.info("anp: pruned %d of %d neurons", sum(pruned.values()), sum(num_neurons.values()))
    return BaselineRepairResult("anp", time.perf_counter() - t0, history, pruned, num_neurons, tuple(names), config)


# ----------------------------------------------------------------------------- registry

RepairFn = Callable[[nn.Module, "str | LayerRef | None", Tensor, Tensor, BaselineRepairConfig, bool],
                    BaselineRepairResult]

REPAIR_BASELINES: dict[str, RepairFn] = {
    "finetune": repair_finetune,
    "fineprune": repair_fineprune,
    "nad": repair_nad,
    "anp": repair_anp,
}


def repair_with(method: str, model: nn.Module, layer: str | LayerRef | None, x_clean: Tensor, y_clean: Tensor,
                config: BaselineRepairConfig | None = None, progress: bool = False) -> BaselineRepairResult:
    """Repair ``model`` in place with the baseline ``method``; it is returned in eval mode.

    Args:
        method: one of :data:`REPAIR_BASELINES` (``finetune``, ``fineprune``, ``nad``, ``anp``).
        model: the backdoored classifier; its architecture and ``state_dict`` keys are kept.
        layer: the analysis layer (``NAME`` or ``NAME:input``); used by ``fineprune`` only,
            ``None`` for the input of the last ``nn.Linear``.
        x_clean: the defender's clean samples, normalised.
        y_clean: their labels.
        config: settings (shared and per-method).
        progress: progress bars.

    Shape:
        x_clean: ``(N, C, H, W)``; y_clean: ``(N,)``.

    Raises:
        UserInputError: unknown method (the message lists the valid ones) or bad data.

    Example:
        >>> res = repair_with("fineprune", model, None, x_clean, y_clean, BaselineRepairConfig(epochs=5))
        >>> res.pruned
    """
    if method not in REPAIR_BASELINES:
        raise UserInputError(f"unknown repair method {method!r}; valid: {', '.join(REPAIR_BASELINES)}")
    _check_data(x_clean, y_clean)
    config = config or BaselineRepairConfig()
    try:
        return REPAIR_BASELINES[method](model, layer, x_clean, y_clean, config, progress)
    finally:
        model.eval()
