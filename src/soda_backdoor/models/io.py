"""Saving and loading models safely.

Every model file goes through :func:`load_model`: safetensors (no code at all), or a
study-style ``.th``/``.pt`` state_dict read with ``torch.load(weights_only=True)``. A file
whose unpickling would run code is refused with :class:`UserInputError`; nothing executes.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from ..utils import atomic_path
from .registry import create_model, get_model_spec

logger = logging.getLogger(__name__)

META_KEY = "soda_backdoor"


@dataclass(frozen=True)
class ModelMeta:
    """What a model file says about itself.

    Attributes:
        arch: registry name of the architecture.
        num_classes: number of logits.
        in_channels: input channels.
        input_size: input side in pixels.
        mean: normalisation mean (model input = (x/255 - mean) / std).
        std: normalisation std.
        dataset: dataset it was trained on.
        attack: semantic attack planted in training ("none" when clean).
        train_config: the training settings.
        notes: free-form history (e.g. a repair).
    """

    arch: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""
    attack: str = "none"
    train_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"model metadata is not valid JSON: {exc.msg}") from exc
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("arch", "num_classes", "in_channels", "input_size", "mean", "std") if n not in raw]
        if missing:
            raise UserInputError(f"model metadata lacks {', '.join(missing)}")
        raw = {k: v for k, v in raw.items() if k in names}
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)

    def with_note(self, note: str) -> "ModelMeta":
        return replace(self, notes=[*self.notes, note])


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its metadata."""

    module: nn.Module
    meta: ModelMeta
    path: str = ""


def check_finite(module: nn.Module, where: str) -> None:
    """Refuse weights with NaN or Inf."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserInputError(f"{where}: parameter {name} contains NaN or Inf")


def save_model(path: str | Path, module: nn.Module, meta: ModelMeta) -> Path:
    """Write ``module``'s weights and ``meta`` to a safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={META_KEY: meta.to_json()})
    return path


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserInputError(f"{where}: weights do not fit the architecture "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserInputError(f"{where}: {k} has shape {tuple(v.shape)}, the architecture needs {tuple(own[k].shape)}")
    module.load_state_dict(state)


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only refusal (it opens with generic advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln[:160]
    return lines[0][:160] if lines else "unsafe pickle"


TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


def _check_torch_file(path: Path) -> None:
    """Refuse a file that cannot be a ``torch.save`` file (empty, text, ...) before unpickling it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UserInputError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if not head:
        raise UserInputError(f"{path} is empty, not a model file (valid: .safetensors, or a .th/.pt state_dict)")
    if not (head.startswith(TORCH_ZIP_MAGIC) or head.startswith(PICKLE_PROTO)):
        raise UserInputError(f"{path} is not a model file: neither safetensors nor a torch.save state_dict "
                             "(valid: .safetensors, or a .th/.pt state_dict)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.th``/``.pt`` state_dict without running code (weights_only)."""
    path = Path(path)
    _check_torch_file(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not for our users
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserInputError(f"refused {path}: it is not a plain weights file and loading it could run code "
                             f"({_unpickling_reason(exc)}); save a state_dict or safetensors instead") from exc
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler fails on junk with any error type
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"cannot read model file {path}: {first}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(f"{path} does not hold a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, input_size: int | None = None,
               mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
               dataset: str = "", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file in eval mode, never running code stored in it.

    A safetensors file written by :func:`save_model` carries its metadata. A state_dict
    (``.th``/``.pt``, or a safetensors file without metadata) needs ``arch``, ``num_classes``
    and ``in_channels`` (the CLI fills them from ``--arch`` and the dataset).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"model file {path} does not exist")
    meta: ModelMeta | None = None
    with open(path, "rb") as fh:
        head = fh.read(16)
    is_safetensors = path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{")
    if is_safetensors:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                file_meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, or a torch error on a bad header
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"cannot read safetensors file {path}: {first}") from exc
        if META_KEY in file_meta:
            meta = ModelMeta.from_json(file_meta[META_KEY])
    else:
        state = read_state_dict(path)
    if meta is None:
        if arch is None or num_classes is None or in_channels is None:
            raise UserInputError(f"{path} carries no soda metadata: pass --arch (valid: see `soda train --help`) "
                                 "and the dataset it was trained on")
        meta = ModelMeta(arch=get_model_spec(arch).name, num_classes=num_classes, in_channels=in_channels,
                         input_size=input_size or 32, mean=tuple(mean), std=tuple(std), dataset=dataset)
    return _build(meta, state, str(path), device)


def _build(meta: ModelMeta, state: dict[str, torch.Tensor], where: str, device: str | torch.device) -> LoadedModel:
    module = create_model(meta.arch, meta.num_classes, meta.in_channels, meta.input_size)
    _load_state(module, state, where)
    check_finite(module, where)
    module.to(device).eval()
    return LoadedModel(module, meta, where)


def model_from_state_dict(state: dict[str, torch.Tensor], arch: str, num_classes: int, in_channels: int,
                          input_size: int, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
                          dataset: str = "", device: str | torch.device = "cpu", where: str = "state_dict") -> LoadedModel:
    """A registered architecture with weights already in memory (checked like a file's)."""
    meta = ModelMeta(arch=get_model_spec(arch).name, num_classes=num_classes, in_channels=in_channels,
                     input_size=input_size, mean=tuple(mean), std=tuple(std), dataset=dataset)
    return _build(meta, state, where, device)
