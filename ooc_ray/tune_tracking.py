"""MLflow tracking of Tune trials (the classifier grid, the LoRA search), through Ray Tune's MLflowLoggerCallback.

Tune's callback runs in the driver and opens one MLflow run per Tune trial: params, every reported result as
metrics (step = the report's number, so one per epoch for the classifier), the run's end. TrialTracker adds
what a research log needs and Tune cannot know:
- params: the trial's grid point and settings (a classifier trial's Tune config is only its key);
- artifacts: the trial's own Parquet files (summary, per-epoch history, per-image predictions);
- one run per result: every run is tagged with the trial's identity (its result key, or the search trial's Tune
  id), and a trial whose identity already has a FINISHED run is not logged again. A resumed grid re-reports
  trials that an earlier run finished; a killed run's trial left RUNNING in MLflow is closed as KILLED when the
  trial runs again.

mlflow is imported only when tracking is on (tracking.mlflow: true).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback

from ooc_ray.config import ExperimentConfig
from ooc_ray.errors import ConfigError
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.tracking import IDENTITY_TAG, STAGE_TAG, flat, tracking_uri


class TrialTracker(MLflowLoggerCallback):
    """MLflowLoggerCallback with the trial's own params, its Parquet files as artifacts, and one run per trial
    identity. `identity(trial)`, `params(trial)` and `artifacts(trial, last_result)` are picklable callables
    (Tune pickles its callbacks with the experiment, to restore them on resume)."""

    def __init__(self, uri: str, experiment: str, artifact_root: str, stage: str, identity: Callable,
                 params: Callable, artifacts: Callable):
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags={STAGE_TAG: stage})
        self.artifact_root, self.stage = artifact_root, stage
        self.identity, self.params, self.artifacts = identity, params, artifacts

    def setup(self, *args, **kwargs):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        if self.client.get_experiment_by_name(self.experiment_name) is None:
            # Artifacts beside the store, not under the driver's working directory (MLflow's default).
            self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_root)
        super().setup(*args, **kwargs)
        self._skipped: set = set()
        self._last: dict = {}

    def _runs_of(self, identity: str) -> list:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        return self.client.search_runs([experiment.experiment_id],
                                       f"tags.`{IDENTITY_TAG}` = '{identity}' and tags.`{STAGE_TAG}` = '{self.stage}'")

    def log_trial_start(self, trial):
        if trial in self._trial_runs or trial in self._skipped:
            return
        identity = self.identity(trial)
        earlier = self._runs_of(identity)
        if any(run.info.status == "FINISHED" for run in earlier):
            self._skipped.add(trial)  # logged whole by an earlier run: a resumed grid re-reports it
            return
        for run in earlier:
            if run.info.status == "RUNNING":  # its driver was killed: the trial is running again now
                self.client.set_terminated(run.info.run_id, "KILLED")
        run = self.mlflow_util.start_run(tags={**self.tags, IDENTITY_TAG: identity, "trial_name": str(trial)},
                                         run_name=str(trial))
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=flat("", self.params(trial), {}))

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial in self._skipped:
            return
        self._last[trial] = result
        numeric = {k: v for k, v in result.items()
                   if isinstance(v, numbers.Number) and not isinstance(v, bool) and math.isfinite(v)}
        super().log_trial_result(iteration, trial, numeric)

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._skipped or trial not in self._trial_runs:
            return
        run_id = self._trial_runs[trial]
        if not failed:
            for path in self.artifacts(trial, self._last.get(trial, {})):
                if Path(path).exists():
                    self.client.log_artifact(run_id, str(path), artifact_path=Path(path).parent.name)
                else:  # a finished trial always has them: say so rather than log a run that silently lacks one
                    note(f"tracking: {path} is missing; MLflow run {run_id} has no copy of it")
        super().log_trial_end(trial, failed)
        del self._trial_runs[trial]


def with_callbacks(tuner, callbacks: list) -> None:
    """A restored Tuner keeps the callbacks pickled with the interrupted run; give it this run's, so tracking
    follows the current config (turned on, or pointed elsewhere, between the two runs). Tune has no public
    setter for a restored run's RunConfig, hence the private attribute."""
    tuner._local_tuner.get_run_config().callbacks = callbacks


def tracker(cfg: ExperimentConfig, paths: ExperimentPaths, stage: str, identity: Callable, params: Callable,
            artifacts: Callable) -> list:
    """[TrialTracker] for Tune's RunConfig(callbacks=...) when tracking.mlflow is on, else []."""
    if not cfg.tracking.mlflow:
        return []
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError('tracking.mlflow: true, but mlflow is not installed: pip install -e ".[tracking]"')
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    artifact_root = (paths.mlflow / "artifacts").resolve().as_uri()
    return [TrialTracker(tracking_uri(cfg, paths), cfg.tracking.experiment or cfg.name, artifact_root, stage,
                         identity, params, artifacts)]
