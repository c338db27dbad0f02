"""Reading and writing the tool's artifacts: attribution matrices, reconstructed samples.

Model files go through :mod:`soda_backdoor.models.io` (safe loading); this module holds the
``.npz`` files the steps exchange, and the calibrations (JSON). Every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .analysis import NeuronEffects
from .detection.calibration import Calibration, shipped_calibration
from .errors import UserInputError
from .reconstruction import Reconstruction, split_samples
from .utils import write_atomic, write_json


def model_fingerprint(module: torch.nn.Module) -> str:
    """Short hash of a model's weights (ties a samples file to the model that made it)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_effects(path: str | Path, effects: NeuronEffects) -> None:
    """Attribution matrices as ``.npz`` (for reports)."""
    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, matrices=effects.matrices.numpy(), classes=np.array(effects.classes),
                                num_samples=np.array(effects.num_samples), layer=np.array(effects.layer),
                                method=np.array(effects.method))
    write_atomic(path, write)


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


@dataclass(frozen=True)
class SampleSet:
    """Reconstructed samples of one class pair, as repair takes them.

    Shape:
        samples: ``(M, C, H, W)`` in the model's normalised input space.
    """

    samples: torch.Tensor
    source: int
    target: int
    fingerprint: str | None = None
    origin: str = "samples"

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(repair half, held-out half) (:func:`soda_backdoor.reconstruction.split_samples`)."""
        return split_samples(self.samples)

    @classmethod
    def from_reconstruction(cls, rec: Reconstruction, fingerprint: str | None = None) -> SampleSet:
        return cls(rec.samples, rec.source, rec.target, fingerprint, "reconstruction")

    def check(self, source: int, target: int, fingerprint: str | None, shape: tuple[int, ...]) -> None:
        """Refuse samples of another pair or model, of the wrong shape, non-finite, or fewer than 2."""
        where, s = self.origin, self.samples
        if (self.source, self.target) != (source, target):
            raise UserInputError(f"{where} holds samples for source {self.source} -> target {self.target}, "
                                 f"not {source} -> {target}")
        if fingerprint and self.fingerprint and self.fingerprint != fingerprint:
            raise UserInputError(f"{where} was reconstructed from another model (fingerprint {self.fingerprint}, "
                                 f"this model {fingerprint})")
        if s.ndim != 4 or tuple(s.shape[1:]) != tuple(shape):
            raise UserInputError(f"{where}: samples have shape {tuple(s.shape[1:])}, the model takes {tuple(shape)}")
        if not torch.isfinite(s).all():
            raise UserInputError(f"{where}: samples contain NaN or Inf")
        if len(s) < 2:
            raise UserInputError(f"{where} holds {len(s)} sample(s); repair needs at least 2 (half are held out)")


def load_samples(path: str | Path) -> SampleSet:
    """Read a samples file written by :func:`save_reconstruction` (no pickles)."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"samples file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            samples = z["samples"]
            src, tgt = int(z["source"]), int(z["target"])
            fp = str(z["model_fingerprint"]) if "model_fingerprint" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{p} is not a samples file written by `soda reconstruct`: {exc}") from exc
    if samples.dtype.kind not in "fiu":
        raise UserInputError(f"{p} is not a samples file written by `soda reconstruct`: samples of dtype "
                             f"{samples.dtype}")
    return SampleSet(torch.from_numpy(np.ascontiguousarray(samples)).float(), src, tgt, fp, str(p))


def save_calibration(path: str | Path, calibration: Calibration) -> None:
    """A calibration as JSON (written by `soda zoo calibrate`)."""
    write_json(path, calibration.to_dict())


DEFAULT_CALIBRATION = "default"
NO_CALIBRATION = "none"


def resolve_calibration(spec: Calibration | str | Path | None) -> Calibration | None:
    """The calibration a front end names: ``default`` the shipped one
    (:func:`soda_backdoor.detection.shipped_calibration`), ``none`` or ``None`` none, a
    :class:`Calibration` itself, anything else a file written by `soda zoo calibrate`."""
    if spec is None or isinstance(spec, Calibration):
        return spec
    if str(spec) == NO_CALIBRATION:
        return None
    if str(spec) == DEFAULT_CALIBRATION:
        return shipped_calibration()
    return load_calibration(spec)


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration written by :func:`save_calibration`."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"calibration file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{p} is not a calibration written by `soda zoo calibrate`: {exc}") from exc
    try:
        return Calibration.from_dict(data)
    except UserInputError as exc:
        raise UserInputError(f"{p}: {exc}") from exc
