"""The tool's steps as functions over files: what each CLI subcommand (and ``soda run``) does.

Each step loads what it needs (model, dataset, attack), calls one library function, writes
its artifacts atomically and returns a JSON-ready dict.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis import AttributionConfig, NeuronEffects, compute_neuron_effects, parse_layer
from ..data import Dataset, SemanticAttack, get_attack, load_dataset, normalize
from ..data.splits import Splits, make_splits
from ..detection import DetectionConfig, detect_backdoor
from ..errors import UserInputError
from ..models import LoadedModel, ModelMeta, create_model, get_model_spec, load_model, save_model
from ..reconstruction import Reconstruction, ReconstructionConfig, reconstruct_inputs
from ..repair import RepairConfig, repair_model
from ..training import TrainConfig, evaluate_attack, train_model
from ..utils import seed_everything, write_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataContext:
    """A dataset with the attack that defines its semantic samples, and the splits."""

    data: Dataset
    attack: SemanticAttack | None
    splits: Splits


def load_context(dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
                 seed: int = 0) -> DataContext:
    """Load a dataset and divide it for an attack (``None``/``none``: clean)."""
    data = load_dataset(dataset, data_dir)
    atk = get_attack(attack, data.spec.name, attack_file)
    if atk is not None and atk.dataset != data.spec.name:
        raise UserInputError(f"attack {atk.name!r} is defined on {atk.dataset}, not {data.spec.name}")
    return DataContext(data, atk, make_splits(data, atk, seed))


def open_model(path: str, ctx: DataContext | None, device: torch.device, arch: str | None = None) -> LoadedModel:
    """Load a model file and check that it fits the dataset."""
    spec = ctx.data.spec if ctx else None
    loaded = load_model(path, arch=arch, num_classes=spec.num_classes if spec else None,
                        in_channels=spec.in_channels if spec else None, input_size=spec.image_size if spec else None,
                        mean=spec.mean if spec else (0.0,), std=spec.std if spec else (1.0,),
                        dataset=spec.name if spec else "", device=device)
    if spec is not None:
        m = loaded.meta
        if m.num_classes != spec.num_classes:
            raise UserInputError(f"model {path} has {m.num_classes} classes, dataset {spec.name} has {spec.num_classes}")
        if m.in_channels != spec.in_channels:
            raise UserInputError(f"model {path} takes {m.in_channels}-channel input, dataset {spec.name} "
                                 f"has {spec.in_channels} channel(s)")
        probe = normalize(ctx.data.x_test[:2].to(device), m.mean, m.std)
        try:
            with torch.no_grad():
                out = loaded.module(probe)
        except RuntimeError as exc:
            raise UserInputError(f"model {path} cannot take {spec.name} images of shape "
                                 f"{tuple(probe.shape[1:])}: {str(exc).splitlines()[0][:150]}") from exc
        if out.shape[-1] != spec.num_classes:
            raise UserInputError(f"model {path} outputs {out.shape[-1]} logits, dataset {spec.name} has "
                                 f"{spec.num_classes} classes")
    return loaded


def model_fingerprint(module: torch.nn.Module) -> str:
    """Short hash of a model's weights (ties a samples file to the model that made it)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def class_inputs(ctx: DataContext, meta: ModelMeta, num_samples: int, device: torch.device) -> dict[int, torch.Tensor]:
    """Clean held-out samples per class (test split minus semantic samples), normalised."""
    x = ctx.data.x_test[ctx.splits.clean_test]
    y = ctx.data.y_test[ctx.splits.clean_test]
    out = {}
    for c in range(ctx.data.num_classes):
        xc = x[(y == c).nonzero().flatten()[:num_samples]]
        if len(xc) == 0:
            raise UserInputError(f"class {c} has no clean samples in the analysis data; every class needs some")
        out[c] = normalize(xc.to(device), meta.mean, meta.std)
    return out


# ----------------------------------------------------------------------------- train / evaluate

def default_train_config(arch: str, seed: int) -> TrainConfig:
    """The training defaults (chosen by measurement for the CPU default ``cnn``)."""
    return TrainConfig(seed=seed)


def run_train(dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None, arch: str,
              out: str, config: TrainConfig, device: torch.device, init: str | None = None,
              progress: bool = True, on_epoch=None) -> dict[str, Any]:
    """Train a (semantic-backdoored or clean) model and save it with its metadata."""
    get_model_spec(arch)
    ctx = load_context(dataset, data_dir, attack, attack_file, config.seed)
    spec = ctx.data.spec
    seed_everything(config.seed)
    if init:
        loaded = open_model(init, ctx, device, arch=arch)
        module, arch = loaded.module, loaded.meta.arch
    else:
        module = create_model(arch, spec.num_classes, spec.in_channels, spec.image_size)
    if ctx.attack is None and config.ratio:
        config = replace(config, ratio=0.0)
    result = train_model(module, ctx.data, ctx.splits, ctx.attack, config, spec.mean, spec.std, device,
                         progress, on_epoch)
    ev = evaluate_attack(module, ctx.data, ctx.splits, ctx.attack, spec.mean, spec.std, device)
    meta = ModelMeta(arch=get_model_spec(arch).name, num_classes=spec.num_classes, in_channels=spec.in_channels,
                     input_size=spec.image_size, mean=spec.mean, std=spec.std, dataset=spec.name,
                     attack=ctx.attack.name if ctx.attack else "none",
                     train_config={**asdict(config), "init": init or "", "acc": ev.acc, "asr": ev.asr})
    save_model(out, module, meta)
    return {"model": str(out), "arch": meta.arch, "dataset": spec.name, "attack": meta.attack,
            "acc": ev.acc, "asr": ev.asr, "n_clean": ev.n_clean, "n_semantic": ev.n_semantic,
            "seconds": result.seconds, "history": result.history, "config": asdict(config)}


def run_evaluate(model: str, dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
                 device: torch.device, arch: str | None = None) -> dict[str, Any]:
    """ACC on the clean test split and ASR on the semantic test samples."""
    ctx = load_context(dataset, data_dir, _attack_for(model, attack, attack_file), attack_file)
    loaded = open_model(model, ctx, device, arch)
    ev = evaluate_attack(loaded.module, ctx.data, ctx.splits, ctx.attack, loaded.meta.mean, loaded.meta.std, device)
    return {"acc": ev.acc, "asr": ev.asr, "n_clean": ev.n_clean, "n_semantic": ev.n_semantic,
            "attack": ctx.attack.name if ctx.attack else "none"}


# ----------------------------------------------------------------------------- detect

def save_effects(path: str | Path, effects: NeuronEffects) -> None:
    """Attribution matrices as ``.npz`` (for reports)."""
    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, matrices=effects.matrices.numpy(), classes=np.array(effects.classes),
                                num_samples=np.array(effects.num_samples), layer=np.array(effects.layer),
                                method=np.array(effects.method))
    write_atomic(path, write)


def run_detect(model: str, dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
               config: DetectionConfig, layer: str | None, device: torch.device, seed: int = 0,
               arch: str | None = None, effects_out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Causal attribution + target/source detection on a model file."""
    t0 = time.perf_counter()
    seed_everything(seed)
    ctx = load_context(dataset, data_dir, _attack_for(model, attack, attack_file), attack_file)
    loaded = open_model(model, ctx, device, arch)
    ref = parse_layer(loaded.module, layer)
    inputs = class_inputs(ctx, loaded.meta, config.attribution.num_samples, device)
    result, effects = detect_backdoor(loaded.module, ref, inputs, ctx.data.num_classes, config, progress)
    if effects_out:
        save_effects(effects_out, effects)
    out = result.to_dict()
    out["seconds"] = time.perf_counter() - t0
    out["analysis_seconds"] = result.seconds
    out["model"] = str(model)
    out["class_names"] = list(ctx.data.spec.class_names)
    return out


def _attack_for(model: str, attack: str | None, attack_file: str | None) -> str | None:
    """The attack whose semantic samples are kept out of clean data: given, else the model's own."""
    if attack is not None or attack_file is not None:
        return attack
    try:
        from safetensors import safe_open

        with safe_open(str(model), framework="pt") as fh:
            import json

            meta = json.loads((fh.metadata() or {}).get("soda_backdoor", "{}"))
        return meta.get("attack") or None
    except Exception:  # noqa: BLE001 - no metadata: nothing to exclude
        return None


# ----------------------------------------------------------------------------- reconstruct

def save_reconstruction(path: str | Path, rec: Reconstruction, fingerprint: str) -> None:
    """Kept samples, starts and bookkeeping as ``.npz``."""
    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, samples=rec.samples.numpy(), starts=rec.starts.numpy(),
                                start_indices=rec.start_indices.numpy(), source=np.array(rec.source),
                                target=np.array(rec.target), target_prob=rec.target_prob.numpy(),
                                steps=rec.steps.numpy(), tried=np.array(rec.tried),
                                model_fingerprint=np.array(fingerprint))
    write_atomic(path, write)


def load_samples(path: str | Path, source: int, target: int, fingerprint: str | None,
                 shape: tuple[int, ...]) -> np.lib.npyio.NpzFile:
    """Read a samples file and check it belongs to this model and class pair."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"samples file {p} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
        samples = z["samples"]
        src, tgt = int(z["source"]), int(z["target"])
        fp = str(z["model_fingerprint"]) if "model_fingerprint" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{p} is not a samples file written by `soda reconstruct`: {exc}") from exc
    if (src, tgt) != (source, target):
        raise UserInputError(f"{p} holds samples for source {src} -> target {tgt}, not {source} -> {target}")
    if fingerprint and fp and fp != fingerprint:
        raise UserInputError(f"{p} was reconstructed from another model (fingerprint {fp}, this model {fingerprint})")
    if samples.ndim != 4 or tuple(samples.shape[1:]) != tuple(shape):
        raise UserInputError(f"{p}: samples have shape {samples.shape[1:]}, the model takes {tuple(shape)}")
    if not np.isfinite(samples).all():
        raise UserInputError(f"{p}: samples contain NaN or Inf")
    if len(samples) < 2:
        raise UserInputError(f"{p} holds {len(samples)} sample(s); repair needs at least 2 (half are held out)")
    return z


def run_reconstruct(model: str, dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
                    source: int, target: int, config: ReconstructionConfig, out: str, device: torch.device,
                    seed: int = 0, arch: str | None = None, png: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Reconstruct infected samples of ``source`` sent to ``target``; write ``.npz`` (+ PNG grid)."""
    seed_everything(seed)
    ctx = load_context(dataset, data_dir, _attack_for(model, attack, attack_file), attack_file, seed)
    loaded = open_model(model, ctx, device, arch)
    k = ctx.data.num_classes
    for name, c in (("source", source), ("target", target)):
        if not 0 <= c < k:
            raise UserInputError(f"--{name} {c} is out of range 0..{k - 1}")
    if source == target:
        raise UserInputError("--source and --target must differ")
    idx = ctx.splits.clean_train[ctx.data.y_train[ctx.splits.clean_train] == source]
    gen = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=gen)]
    starts = normalize(ctx.data.x_train[idx].to(device), loaded.meta.mean, loaded.meta.std)
    rec = reconstruct_inputs(loaded.module, starts, idx, source, target, config, progress)
    save_reconstruction(out, rec, model_fingerprint(loaded.module))
    if png:
        from ..reporting.plots import plot_reconstructions

        plot_reconstructions(rec, loaded.meta.mean, loaded.meta.std, png, ctx.data.spec.class_names)
    steps = rec.steps.float()
    return {"kept": rec.kept, "tried": rec.tried, "seconds": rec.seconds, "source": source, "target": target,
            "samples": str(out), "png": png or "", "mean_steps": float(steps.mean()) if len(steps) else 0.0,
            "max_steps": int(rec.steps.max()) if len(steps) else 0,
            "mean_target_prob": float(rec.target_prob.mean()) if len(steps) else 0.0, "config": asdict(config)}


# ----------------------------------------------------------------------------- repair

def run_repair(model: str, dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
               source: int, target: int, samples: str, config: RepairConfig, out: str, device: torch.device,
               layer: str | None = None, num_samples: int = 256, arch: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Repair a model with reconstructed samples; report ACC/ASR before and after and R-ASR."""
    t0 = time.perf_counter()
    seed_everything(config.seed)
    ctx = load_context(dataset, data_dir, _attack_for(model, attack, attack_file),
                       attack_file, config.seed)
    loaded = open_model(model, ctx, device, arch)
    module, meta = loaded.module, loaded.meta
    z = load_samples(samples, source, target, model_fingerprint(module), tuple(ctx.data.x_train.shape[1:]))
    recon = torch.from_numpy(z["samples"]).float().to(device)
    x_fix, x_hold = recon[0::2], recon[1::2]
    ref = parse_layer(module, layer)
    before = evaluate_attack(module, ctx.data, ctx.splits, ctx.attack, meta.mean, meta.std, device)
    with torch.no_grad():
        rasr_before = float((module(x_hold).argmax(1) == target).float().mean())
    if config.top < 1.0:
        inputs = class_inputs(ctx, meta, num_samples, device)
        effects = compute_neuron_effects(module, ref, {source: inputs[source]}, AttributionConfig(num_samples=num_samples))
        attribution = effects.for_class(source)[:, target]
    else:
        with torch.no_grad():
            from ..analysis import activations

            h, _ = activations(module, ref, x_hold[:1])
        attribution = torch.ones(h.shape[1])
    dfd = ctx.splits.defender
    x_clean = normalize(ctx.data.x_train[dfd].to(device), meta.mean, meta.std)
    y_clean = ctx.data.y_train[dfd].to(device)
    result = repair_model(module, ref, attribution, x_clean, y_clean, x_fix, source, target, config, progress)
    after = evaluate_attack(module, ctx.data, ctx.splits, ctx.attack, meta.mean, meta.std, device)
    with torch.no_grad():
        rasr_after = float((module(x_hold).argmax(1) == target).float().mean())
    note = (f"repaired: source {source} -> target {target}, top {config.top}, epochs {config.epochs}, "
            f"lr {config.lr}, reg {config.reg}, {len(x_fix)} reconstructed samples")
    save_model(out, module, meta.with_note(note))
    return {"acc_before": before.acc, "asr_before": before.asr, "acc_after": after.acc, "asr_after": after.asr,
            "rasr_before": rasr_before, "rasr_after": rasr_after, "n_clean": after.n_clean,
            "n_semantic": after.n_semantic, "n_repair_samples": len(x_fix), "n_heldout_samples": len(x_hold),
            "n_defender": len(dfd), "neurons_kept": result.num_kept, "num_neurons": result.num_neurons,
            "layer": str(ref), "source": source, "target": target, "model": str(out),
            "seconds": time.perf_counter() - t0, "repair_seconds": result.seconds, "history": result.history,
            "config": asdict(config)}
