"""The data a step works on, and the model it works on, loaded and checked."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from ..data import Dataset, SemanticAttack, get_attack, load_dataset, normalize
from ..data.splits import Splits, make_splits
from ..errors import UserInputError
from ..models import LoadedModel, ModelMeta, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataContext:
    """A dataset with the attack that defines its semantic samples, and the splits."""

    data: Dataset
    attack: SemanticAttack | None
    splits: Splits

    @classmethod
    def build(cls, data: Dataset, attack: SemanticAttack | None, seed: int = 0) -> DataContext:
        """Divide ``data`` for ``attack`` (``None``: clean); the defender subset is drawn with ``seed``."""
        if attack is not None and attack.dataset != data.spec.name:
            raise UserInputError(f"attack {attack.name!r} is defined on {attack.dataset}, not {data.spec.name}")
        return cls(data, attack, make_splits(data, attack, seed))

    @property
    def attack_name(self) -> str:
        return self.attack.name if self.attack else "none"


def load_context(dataset: str, data_dir: str | None, attack: str | None, attack_file: str | None,
                 seed: int = 0) -> DataContext:
    """Load a dataset and divide it for an attack (``None``/``none``: clean)."""
    data = load_dataset(dataset, data_dir)
    return DataContext.build(data, get_attack(attack, data.spec.name, attack_file), seed)


def resolve_attack(data: Dataset, attack: str | None, attack_file: str | None, meta: ModelMeta | None,
                   required: bool) -> SemanticAttack | None:
    """The attack whose semantic samples are kept out of clean data: given, else the model's own.

    An auditor rarely has the attacker's attack file. When none is given and the attack the
    model's metadata names is not in the registry, a step that does not measure the attack
    (``required=False``: detection, reconstruction) warns and treats the data as clean; one
    that does (evaluation, repair) fails.
    """
    if attack is not None or attack_file is not None:
        return get_attack(attack, data.spec.name, attack_file)
    name = meta.attack if meta is not None else None
    if not name or name.lower() in ("none", "clean"):
        return None
    try:
        return get_attack(name, data.spec.name)
    except UserInputError as exc:
        if required:
            raise UserInputError(f"the model was trained with attack {name!r}, which is not in the registry "
                                 f"({exc}); pass its --attack-file, or --attack none") from exc
        warnings.warn(f"the model's metadata names attack {name!r}, which is not in the registry; its semantic "
                      "samples cannot be kept out of the clean data (give --attack-file to do so)", stacklevel=2)
        return None


def open_model(path: str, data: Dataset | None, device: torch.device, arch: str | None = None) -> LoadedModel:
    """Load a model file (safely) and check that it fits the dataset."""
    spec = data.spec if data is not None else None
    loaded = load_model(path, arch=arch, num_classes=spec.num_classes if spec else None,
                        in_channels=spec.in_channels if spec else None, input_size=spec.image_size if spec else None,
                        mean=spec.mean if spec else (0.0,), std=spec.std if spec else (1.0,),
                        dataset=spec.name if spec else "", device=device)
    if data is not None:
        check_model_fits(loaded, data, device, str(path))
    return loaded


def check_model_fits(loaded: LoadedModel, data: Dataset, device: torch.device, name: str = "the model") -> None:
    """Classes, channels and a forward pass on two test images must agree with the dataset."""
    spec, m = data.spec, loaded.meta
    if m.num_classes != spec.num_classes:
        raise UserInputError(f"model {name} has {m.num_classes} classes, dataset {spec.name} has {spec.num_classes}")
    if m.in_channels != spec.in_channels:
        raise UserInputError(f"model {name} takes {m.in_channels}-channel input, dataset {spec.name} "
                             f"has {spec.in_channels} channel(s)")
    probe = normalize(data.x_test[:2].to(device), m.mean, m.std)
    try:
        with torch.no_grad():
            out = loaded.module(probe)
    except RuntimeError as exc:
        raise UserInputError(f"model {name} cannot take {spec.name} images of shape "
                             f"{tuple(probe.shape[1:])}: {str(exc).splitlines()[0][:150]}") from exc
    if out.shape[-1] != spec.num_classes:
        raise UserInputError(f"model {name} outputs {out.shape[-1]} logits, dataset {spec.name} has "
                             f"{spec.num_classes} classes")


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
