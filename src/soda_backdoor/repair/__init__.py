"""Masked fine-tuning that removes a semantic backdoor."""

from .baselines import (REPAIR_BASELINES, BaselineRepairConfig, BaselineRepairResult, anp_modules, attention_layers,
                        bake_channel_mask, repair_with)
from .repair import RepairConfig, RepairResult, mine_variations, outstanding_neurons, repair_model

__all__ = ["RepairConfig", "RepairResult", "mine_variations", "outstanding_neurons", "repair_model"]
__all__ += ["REPAIR_BASELINES", "BaselineRepairConfig", "BaselineRepairResult", "anp_modules", "attention_layers",
            "bake_channel_mask", "repair_with"]
