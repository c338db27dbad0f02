"""SODA: causality-based detection and removal of semantic backdoors.

One function per step of the tool, plain tensors in and dataclasses out:

- :func:`soda_backdoor.training.train_model` plants a semantic backdoor (docs/method.md §2.6);
- :func:`soda_backdoor.detection.detect_backdoor` finds (source, target) (§2.1-2.3);
- :func:`soda_backdoor.reconstruction.reconstruct_inputs` synthesises infected samples (§2.4);
- :func:`soda_backdoor.repair.repair_model` removes the backdoor (§2.5).

:mod:`soda_backdoor.workflow` runs these as the tool's steps on loaded models and data, with
typed reports, and :func:`soda_backdoor.workflow.run_pipeline` runs the whole job.

Model files are read with :func:`load_model`, which never runs code stored in a file.
"""

from .errors import UserInputError
from .models import LoadedModel, ModelMeta, load_model, save_model

__version__ = "0.1.0"
__all__ = ["LoadedModel", "ModelMeta", "UserInputError", "load_model", "save_model", "__version__"]
