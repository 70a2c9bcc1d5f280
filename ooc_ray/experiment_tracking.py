"""MLflow runs (tracking.mlflow: true): the experiment, what its stages trained, and its Ray Tune trials.

One parent run per experiment config (its identity: the digest of the resolved config), opened by the CLI when a
writing command starts and closed when it ends (FINISHED or FAILED), with config.yaml and report.html as
artifacts. Under it, child runs read from the files the stages wrote, so what MLflow shows is what the results
folder holds: one per pretrained base (its settings, VAE and UNet loss per step, reconstruction error) and one per
LoRA (its settings, loss per step and per epoch, key). Like the trials', every child is logged once per result:
a re-run that re-uses a LoRA adds no run.

The classifier grid's and the LoRA search's trials are logged through Ray Tune's MLflowLoggerCallback, which runs
in the driver and opens one run per Tune trial: params, every reported result as metrics (step = the report's
number, so one per epoch for the classifier), the run's end. TrialTracker adds what a research log needs and Tune
cannot know:
- params: the trial's grid point and settings (a classifier trial's Tune config is only its key);
- artifacts: the trial's own Parquet files (summary, per-epoch history, per-image predictions);
- one run per result: every run is tagged with the trial's identity (its result key, or the search trial's Tune
  id), and a trial whose identity already has a FINISHED run is not logged again. A resumed grid re-reports
  trials that an earlier run finished; a killed run's trial left RUNNING in MLflow is closed as KILLED when the
  trial runs again;
- the experiment's parent run as each run's parent, when a command has it open;
- only the trial's own metrics: Tune's bookkeeping (pid, timestamp, iteration, times) is not logged.

mlflow is imported here at the top; this module is imported only when tracking is on (the CLI, and
ooc_ray.tracking.tracker for the stages), so a run without tracking never needs mlflow installed.
"""
from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig
from ooc_ray.diffusion.lora_files import METADATA_FILE as LORA_METADATA
from ooc_ray.diffusion.pretrain import METADATA_FILE as PRETRAIN_METADATA
from ooc_ray.fields import to_dict
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.tracking import IDENTITY_TAG, STAGE_TAG, flat, tracking_uri
from ooc_ray.variants import each_variant

EXPERIMENT_STAGE = "experiment"
BATCH = 1000  # MLflow's log_batch takes at most 1,000 metrics (and 100 params) per call


def artifact_root(paths: ExperimentPaths) -> str:
    """Artifacts beside the store, not under the driver's working directory (MLflow's default)."""
    return (paths.mlflow / "artifacts").resolve().as_uri()


def experiment_id(client: MlflowClient, name: str, root: str) -> str:
    """The MLflow experiment `name`, created with its artifacts under `root` when new."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name, artifact_location=root)


def runs_of(client: MlflowClient, experiment: str, stage: str, identity: str) -> list:
    """The runs of one result (stage + identity tags), newest first."""
    return client.search_runs([experiment], f"tags.`{IDENTITY_TAG}` = '{identity}' and tags.`{STAGE_TAG}` = '{stage}'")


def _client(cfg: ExperimentConfig, paths: ExperimentPaths) -> tuple[MlflowClient, str]:
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri(cfg, paths))
    return client, experiment_id(client, cfg.tracking.experiment or cfg.name, artifact_root(paths))


def parent_identity(cfg: ExperimentConfig) -> str:
    return keys.digest(EXPERIMENT_STAGE, to_dict(cfg))


def _log(client: MlflowClient, run_id: str, params: dict, metrics: dict[str, list[float]]) -> None:
    """Params (flattened) and metric series (step = position) in MLflow's batch sizes."""
    now = int(time.time() * 1000)
    items = [Param(k, str(v)) for k, v in flat("", params, {}).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])
    points = [Metric(name, float(v), now, step) for name, series in metrics.items()
              for step, v in enumerate(series) if v is not None]
    for start in range(0, len(points), BATCH):
        client.log_batch(run_id, metrics=points[start:start + BATCH])


def open_parent(cfg: ExperimentConfig, paths: ExperimentPaths, command: str) -> str:
    """The experiment config's parent run, created with the config as params or re-opened; its run id."""
    client, experiment = _client(cfg, paths)
    identity = parent_identity(cfg)
    earlier = runs_of(client, experiment, EXPERIMENT_STAGE, identity)
    if earlier:
        run_id = earlier[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(experiment, run_name=cfg.name,
                                 tags={STAGE_TAG: EXPERIMENT_STAGE, IDENTITY_TAG: identity})
        run_id = run.info.run_id
        _log(client, run_id, to_dict(cfg), {})
    client.set_tag(run_id, "ooc_ray.last_command", command)
    return run_id


def open_parent_id(cfg: ExperimentConfig, paths: ExperimentPaths) -> str | None:
    """The run id of this config's parent run while a command has it open, else None (a stage run directly)."""
    client, experiment = _client(cfg, paths)
    runs = runs_of(client, experiment, EXPERIMENT_STAGE, parent_identity(cfg))
    return next((r.info.run_id for r in runs if r.info.status == "RUNNING"), None)


def _child(client: MlflowClient, experiment: str, parent: str, stage: str, identity: str, name: str,
           params: dict, metrics: dict[str, list[float]]) -> None:
    """One child run of a result, unless a finished run of it exists (a re-used base or LoRA)."""
    if any(r.info.status == "FINISHED" for r in runs_of(client, experiment, stage, identity)):
        return
    run = client.create_run(experiment, run_name=name, tags={STAGE_TAG: stage, IDENTITY_TAG: identity,
                                                              MLFLOW_PARENT_RUN_ID: parent})
    _log(client, run.info.run_id, params, metrics)
    client.set_terminated(run.info.run_id, "FINISHED")


def _pretrained(paths: ExperimentPaths) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((paths.models / "pretrained").glob(f"*/{PRETRAIN_METADATA}"))]


def _loras(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[dict]:
    """The metadata of every LoRA of the config's variants (their loras.parquet), each once."""
    found: dict[str, dict] = {}
    for _, vpaths in each_variant(cfg, paths):
        if vpaths.lora_table.is_file():
            for key in pd.read_parquet(vpaths.lora_table, columns=["lora_key"])["lora_key"]:
                meta = paths.lora / key / LORA_METADATA
                if key not in found and meta.is_file():
                    found[key] = json.loads(meta.read_text())
    return list(found.values())


def close_parent(cfg: ExperimentConfig, paths: ExperimentPaths, run_id: str, exit_code: int, reported: bool
                 ) -> None:
    """Log the children the command's stages made, the parent's artifacts (report.html when the command wrote
    it: `reported`), and end the parent run."""
    client, experiment = _client(cfg, paths)
    for meta in _pretrained(paths):
        _child(client, experiment, run_id, "pretrain", meta["key"], f"pretrain-{meta['key']}",
               {**meta["config"], "base": meta["base"], "n_images": meta["n_images"],
                "resolution": meta["resolution"]},
               {"vae_loss": meta["vae_loss_steps"], "unet_loss": meta["unet_loss_steps"],
                "vae_recon_mse": [meta["vae_recon_mse"]]})  # no seconds: the folder is the base's identity
    for meta in _loras(cfg, paths):
        _child(client, experiment, run_id, "finetune", meta["lora_key"], meta["lora_key"],
               {**meta["config"], "fold": meta["fold"], "label": meta["label"], "group": meta["group"],
                "base": meta["base"], "n_images": meta["n_images"], "weights_sha256": meta["weights_sha256"]},
               {"loss": meta["loss_steps"], "loss_epoch": meta["loss_epochs"], "final_loss": [meta["final_loss"]],
                "seconds": [meta["seconds"]]})
    if exit_code == 0:  # a failed command's config.yaml is an earlier command's
        for artifact in (paths.config, *([paths.report / "report.html"] if reported else [])):
            client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id, "FINISHED" if exit_code == 0 else "FAILED")


class TrialTracker(MLflowLoggerCallback):
    """MLflowLoggerCallback with the trial's own params, its Parquet files as artifacts, and one run per trial
    identity. `identity(trial)`, `params(trial)` and `artifacts(trial, last_result)` are picklable callables
    (Tune pickles its callbacks with the experiment, to restore them on resume)."""

    def __init__(self, uri: str, experiment: str, artifact_root: str, stage: str, identity: Callable,
                 params: Callable, artifacts: Callable, parent: str | None = None):
        tags = {STAGE_TAG: stage, **({MLFLOW_PARENT_RUN_ID: parent} if parent else {})}
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags=tags)
        self.artifact_root, self.stage = artifact_root, stage
        self.identity, self.params, self.artifacts = identity, params, artifacts

    def setup(self, *args, **kwargs):
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id = experiment_id(self.client, self.experiment_name, self.artifact_root)
        super().setup(*args, **kwargs)
        self._skipped: set = set()
        self._last: dict = {}

    def _runs_of(self, identity: str) -> list:
        return runs_of(self.client, self.experiment_id, self.stage, identity)

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
        numeric = {k: v for k, v in result.items() if k not in AUTO_RESULT_KEYS
                   and isinstance(v, numbers.Number) and not isinstance(v, bool) and math.isfinite(v)}
        # Tune's own callback would log every field; the step is the report's number (one per epoch).
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numeric,
                                     step=result[TRAINING_ITERATION])

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
