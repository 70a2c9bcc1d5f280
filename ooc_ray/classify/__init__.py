"""Classifier stage: the paper's EfficientNet classifier trained per (ratio, LoRA weight, fold) under Ray Tune.

Importing it loads no Keras: run_trial (ooc_ray.classify.train) is loaded on first use, as in a Tune worker."""
from ooc_ray.classify.grid import collect, run_classify
from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.classify.trials import TrialContext
from ooc_ray.backend import keras_side

__all__ = ["TrialContext", "collect", "compute_metrics", "run_classify", "run_trial"]


def __getattr__(name: str):
    if name == "run_trial":
        return keras_side("ooc_ray.classify.train").run_trial
    raise AttributeError(f"module 'ooc_ray.classify' has no attribute {name!r}")
