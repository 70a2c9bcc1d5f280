"""Classifier stage: the paper's EfficientNet classifier trained per (ratio, LoRA weight, fold) under Ray Tune."""
from ooc_ray.classify.grid import collect, run_classify
from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.classify.train import TrialContext, run_trial

__all__ = ["TrialContext", "collect", "compute_metrics", "run_classify", "run_trial"]
