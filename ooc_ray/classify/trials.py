"""A classifier trial's shared context and its files, without Keras: the grid's driver plans, checks and collects
trials through this module, and only the Tune worker that trains one imports ooc_ray.classify.train (Keras and
TensorFlow, ~4.4 s of CPU per process, measured)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ooc_ray.backbones import BackboneWeights
from ooc_ray.io import parquet_problem
from ooc_ray.paths import ExperimentPaths


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one grid shares, resolved once by the driver."""

    classes: tuple[str, ...]
    weights: BackboneWeights
    data_digest: str  # the manifest the trials were planned from (keys.data_digest)
    features_dir: str | None = None  # cached mode: the feature cache folder


def trial_outputs(paths: ExperimentPaths, key: str) -> list[Path]:
    """The files of one trial; the summary (trials/<key>.parquet) is written last and marks it done."""
    return [paths.trial_history(key), paths.trial_predictions(key), paths.trial(key)]


def trial_problem(paths: ExperimentPaths, key: str) -> str:
    """'' when the trial's three files are whole, else what is wrong ('missing' when never run)."""
    if not paths.trial(key).exists():
        return "missing"
    for path in trial_outputs(paths, key):
        problem = parquet_problem(path)
        if problem:
            return f"{path}: {problem}"
    return ""
