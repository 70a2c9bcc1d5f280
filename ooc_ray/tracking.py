"""MLflow tracking: where the store is, what identifies a run, and the Tune callbacks the stages pass on. mlflow
itself is imported only by ooc_ray.experiment_tracking, which this module imports when tracking is on, so it
stays light: no Ray, no MLflow at import.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from ooc_ray.config import ExperimentConfig
from ooc_ray.errors import ConfigError
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


def with_callbacks(tuner, callbacks: list) -> None:
    """A restored Tuner keeps the callbacks pickled with the interrupted run; give it this run's, so tracking
    follows the current config (turned on, or pointed elsewhere, between the two runs). Tune has no public
    setter for a restored run's RunConfig, hence the private attribute."""
    tuner._local_tuner.get_run_config().callbacks = callbacks


def mlflow_side(cfg: ExperimentConfig):
    """ooc_ray.experiment_tracking (imported now) when tracking.mlflow is on, else None."""
    if not cfg.tracking.mlflow:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError('tracking.mlflow: true, but mlflow is not installed: pip install -e ".[tracking]"')
    return importlib.import_module("ooc_ray.experiment_tracking")


def tracker(cfg: ExperimentConfig, paths: ExperimentPaths, stage: str, identity: Callable, params: Callable,
            artifacts: Callable) -> list:
    """[TrialTracker] for Tune's RunConfig(callbacks=...) when tracking.mlflow is on, else []."""
    runs = mlflow_side(cfg)
    if runs is None:
        return []
    return [runs.TrialTracker(tracking_uri(cfg, paths), cfg.tracking.experiment or cfg.name, runs.artifact_root(paths),
                              stage, identity, params, artifacts, runs.open_parent_id(cfg, paths))]
