"""Model registry, the study's architectures, and safe model files."""

from .io import LoadedModel, ModelMeta, load_model, model_from_state_dict, read_state_dict, save_model
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["LoadedModel", "ModelMeta", "ModelSpec", "create_model", "get_model_spec", "list_models",
           "load_model", "model_from_state_dict", "read_state_dict", "register_model", "save_model"]
