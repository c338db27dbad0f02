"""Datasets, semantic attacks and augmentations."""

from .attacks import SemanticAttack, get_attack, list_attacks, load_attack_file, validate_attack
from .datasets import DATASETS, Dataset, DatasetSpec, denormalize, get_dataset_spec, load_dataset, normalize

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "SemanticAttack", "denormalize", "get_attack",
           "get_dataset_spec", "list_attacks", "load_attack_file", "load_dataset", "normalize",
           "validate_attack"]
