"""The application layer: every step of the tool on in-memory objects, with typed reports.

Load once (:func:`load_context`, :func:`open_model`), then call any step as often as needed;
save what you want with :mod:`soda_backdoor.artifacts`. The CLI, ``soda run``, the study
front ends and the research scripts all go through here.

Example:
    >>> from soda_backdoor.workflow import detect, load_context, open_model
    >>> ctx = load_context("fmnist", None, "stripet", None)
    >>> model = open_model("m.safetensors", ctx.data, "cpu")
    >>> detect(model, ctx).pairs
    ((0, 2),)
"""

from .context import DataContext, check_model_fits, class_inputs, load_context, open_model, resolve_attack
from .pipeline import PipelineConfig, PipelineReport, StepRecord, run_pipeline
from .reports import BaselineRepairReport, DetectReport, EvaluateReport, ReconstructReport, RepairReport, TrainReport
from .steps import check_pair, detect, evaluate, rasr, reconstruct, repair, repair_baseline, train

__all__ = ["BaselineRepairReport", "DataContext", "DetectReport", "EvaluateReport", "PipelineConfig", "PipelineReport", "ReconstructReport",
           "RepairReport", "StepRecord", "TrainReport", "check_model_fits", "check_pair", "class_inputs", "detect",
           "evaluate", "load_context", "open_model", "rasr", "reconstruct", "repair", "repair_baseline", "resolve_attack", "run_pipeline",
           "train"]
