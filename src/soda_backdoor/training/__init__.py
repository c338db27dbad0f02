"""Training semantic-backdoored (or clean) models and measuring ACC / ASR."""

from .train import EvalResult, TrainConfig, TrainResult, evaluate_attack, predict, train_model

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "evaluate_attack", "predict", "train_model"]
