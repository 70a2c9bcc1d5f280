"""Classifier stage: the paper's EfficientNet classifier trained per (ratio, LoRA weight, fold) under Ray Tune.

Import cost: only pandas/numpy here; TensorFlow and Ray load inside the functions that need them.
"""
from ooc_ray.classify.grid import collect, config_key, run_classify, trial_key, trial_specs
from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.classify.train import arm_name, run_trial
from ooc_ray.classify.trainsets import (
    TrainsetError,
    build_testset,
    build_trainset,
    largest_remainder,
    round_half_up,
    synthetic_pool,
)

__all__ = [
    "TrainsetError", "arm_name", "build_testset", "build_trainset", "collect", "compute_metrics", "config_key",
    "largest_remainder", "round_half_up", "run_classify", "run_trial", "synthetic_pool", "trial_key",
    "trial_specs",
]
