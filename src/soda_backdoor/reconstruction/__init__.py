"""Reconstruction of infected samples by input optimisation."""

from .reconstruct import (Reconstruction, ReconstructionConfig, optimize_batch, reconstruct_inputs,
                          reconstruct_one_by_one, split_samples)

__all__ = ["Reconstruction", "ReconstructionConfig", "optimize_batch", "reconstruct_inputs", "reconstruct_one_by_one",
           "split_samples"]
