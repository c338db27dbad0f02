"""Masked fine-tuning that removes a semantic backdoor."""

from .repair import RepairConfig, RepairResult, outstanding_neurons, repair_model

__all__ = ["RepairConfig", "RepairResult", "outstanding_neurons", "repair_model"]
