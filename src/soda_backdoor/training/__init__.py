"""Training semantic-backdoored (or clean) models and measuring ACC / ASR."""

from .train import (EvalResult, TrainConfig, TrainResult, evaluate_attack, evaluate_attack_shared, predict,
                    predict_shared, train_model)

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "evaluate_attack", "evaluate_attack_shared", "predict",
           "predict_shared", "train_model"]
