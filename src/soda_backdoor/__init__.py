"""SODA: causality-based detection and removal of semantic backdoors.

One function per step of the tool, plain tensors in and dataclasses out:

- :func:`soda_backdoor.training.train_model` plants a semantic backdoor (SPEC 2.6);
- :func:`soda_backdoor.detection.detect_backdoor` finds (source, target) (SPEC 2.1-2.3);
- :func:`soda_backdoor.reconstruction.reconstruct_inputs` synthesises infected samples (SPEC 2.4);
- :func:`soda_backdoor.repair.repair_model` removes the backdoor (SPEC 2.5).

Model files are read with :func:`load_model`, which never runs code stored in a file.
"""

from .errors import UserInputError
from .models import LoadedModel, ModelMeta, load_model, save_model

__version__ = "0.1.0"
__all__ = ["LoadedModel", "ModelMeta", "UserInputError", "load_model", "save_model", "__version__"]
