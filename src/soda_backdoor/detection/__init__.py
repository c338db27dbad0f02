"""Target and source detection from causal attributions."""

from .detector import (SOURCE_RULES, DetectionConfig, DetectionResult, SourceAnalysis, SourceEvidence, SourceRule,
                       TransferSettings,                        detect_backdoor, get_source_rule, mean_logits, register_source_rule,
                       source_scores, target_scores, transfer_steps)
from .calibration import (ArchCalibration, CalibratedScore, Calibration, PlattMap, fit_calibration, fit_platt,
                          model_score, shipped_calibration)
from .neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, detect_neural_cleanse, normalized_bounds
from .stats import MAD_SCALE, OutlierTest, mad_outliers, pearson

__all__ = ["MAD_SCALE", "SOURCE_RULES", "transfer_steps", "DetectionConfig", "DetectionResult", "OutlierTest", "SourceAnalysis", "SourceEvidence", "SourceRule", "TransferSettings", "detect_backdoor", "get_source_rule", "register_source_rule",
           "mad_outliers", "mean_logits", "pearson", "source_scores", "target_scores"]
__all__ += ["NeuralCleanseConfig", "NeuralCleanseResult", "detect_neural_cleanse", "normalized_bounds"]
__all__ += ["ArchCalibration", "CalibratedScore", "Calibration", "PlattMap", "fit_calibration", "fit_platt",
            "model_score", "shipped_calibration"]
