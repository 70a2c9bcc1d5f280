"""MLflow tracking: where the store is and what identifies a run. mlflow itself is imported only by the modules
that log (ooc_ray.tune_tracking for Ray Tune trials), so this one stays light: no Ray, no MLflow at import.
"""
from __future__ import annotations

from ooc_ray.config import ExperimentConfig
from ooc_ray.paths import ExperimentPaths

IDENTITY_TAG = "ooc_ray.trial"
STAGE_TAG = "ooc_ray.stage"


def tracking_uri(cfg: ExperimentConfig, paths: ExperimentPaths) -> str:
    return cfg.tracking.uri or f"sqlite:///{paths.mlflow.resolve() / 'mlflow.db'}"


def flat(prefix: str, value, out: dict) -> dict:
    """A nested mapping as MLflow params: {"classify": {"epochs": 3}} -> {"classify.epochs": 3}."""
    if isinstance(value, dict):
        for k, v in value.items():
            flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out
