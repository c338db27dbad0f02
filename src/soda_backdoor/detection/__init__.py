"""Target and source detection from causal attributions."""

from .detector import (SOURCE_RULES, DetectionConfig, DetectionResult, SourceAnalysis, detect_backdoor, mean_logits,
                       source_scores, target_scores, transfer_steps)
from .neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, detect_neural_cleanse, normalized_bounds
from .stats import MAD_SCALE, OutlierTest, mad_outliers, pearson

__all__ = ["MAD_SCALE", "SOURCE_RULES", "transfer_steps", "DetectionConfig", "DetectionResult", "OutlierTest", "SourceAnalysis", "detect_backdoor",
           "mad_outliers", "mean_logits", "pearson", "source_scores", "target_scores"]
__all__ += ["NeuralCleanseConfig", "NeuralCleanseResult", "detect_neural_cleanse", "normalized_bounds"]
