"""The classify stage: a Ray Tune grid over (ratio, LoRA weight, fold), one Parquet row per trial.

Every trial's key is its content (ooc_ray.keys.trial_key: its exact training and held-out sets, the classifier's
result fields and weights), so a trial is re-used only when everything it was computed from is byte-identical.
Resume works at two levels: Tuner.restore continues an interrupted Tune experiment, and every trial first looks
for its own whole summary Parquet (written last, atomically) and skips the work if it is there, so finished
trials are never re-run or duplicated even when the Tune folder is lost.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from ray import tune

from ooc_ray import keys
from ooc_ray.classic import write_missing
from ooc_ray.classify.trials import TrialContext
from ooc_ray.trial_files import trial_outputs, trial_problem
from ooc_ray.config import ClassifyConfig, ExperimentConfig
from ooc_ray.fields import to_dict
from ooc_ray.data import class_names, load_manifest
from ooc_ray.errors import StageError, one_line
from ooc_ray.backend import keras_side
from ooc_ray.feature_cache import cache_dir, ensure_features, weights_on_cluster
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.progress import FileProgress
from ooc_ray.protocol import PlannedTrial, trial_config
from ooc_ray.trainsets import augmented_source, plan_grid
from ooc_ray.variants import Variant
from ooc_ray.raycluster import init_ray, require_resources, tune_storage
from ooc_ray.tracking import tracker, with_callbacks


class GridTrial(NamedTuple):
    """A planned trial with the config of its variant and what its variant's trials share."""
    cfg: ExperimentConfig
    trial: PlannedTrial
    ctx: TrialContext | None


def _tune_trial(config: dict, paths: ExperimentPaths, trials: dict[str, GridTrial]) -> None:
    """Tune function trainable: one planned trial; per-epoch metrics go to ray.tune.report."""
    cfg, trial, ctx = trials[config["trial_key"]]
    if not trial_problem(paths, trial.key):  # finished by an earlier run: report its result, compute nothing
        # Its recorded epochs first, as the run that computed it reported them (a resumed Tune experiment re-runs
        # a trial whose files were written just before a kill; its MLflow run then still has every epoch).
        for epoch in pd.read_parquet(paths.history / f"{trial.key}.parquet").itertuples():
            tune.report({"epoch": int(epoch.epoch), "loss": float(epoch.loss), "train_accuracy": float(epoch.accuracy)})
        row = pd.read_parquet(paths.trial(trial.key)).iloc[0]
        tune.report({"test_accuracy": float(row["accuracy"]), "skipped": True})
        return
    row = keras_side("ooc_ray.classify.train", cfg.classify.backend).run_trial(cfg, paths, trial, ctx,
                                                                             report=tune.report)
    tune.report({"test_accuracy": row["accuracy"], "test_f1_macro": row["f1_macro"], "skipped": False})


def _trial_key(trial) -> str:
    """A Tune trial's result key: its MLflow identity, and its name and folder in Tune's storage."""
    return trial.config["trial_key"]


def _tracked_params(params: dict[str, dict], trial) -> dict:
    return params[_trial_key(trial)]


def _tracked_files(paths: ExperimentPaths, trial, last_result: dict) -> list[Path]:
    return trial_outputs(paths, _trial_key(trial))


def trial_params(cfg: ExperimentConfig, trial: PlannedTrial, ctx: TrialContext) -> dict:
    """What MLflow records of a trial: its grid point, the classifier settings, and what it was computed from."""
    return {"trial_key": trial.key, **dataclasses.asdict(trial.spec), "arm": trial.spec.arm,
            "n_train": len(trial.train), "n_test": len(trial.test), "classify": to_dict(cfg)["classify"],
            "sample": to_dict(cfg)["sample"], "generator": to_dict(cfg)["generator"],
            "generator_split": cfg.generator.split, "weights": ctx.weights.identity, "data": ctx.data_digest}


def _run_tune(cfg: ExperimentConfig, paths: ExperimentPaths, trials: dict[str, GridTrial], pending: list[str],
              backend: str) -> dict[str, str]:
    """One Tune experiment: the pending trials of one classify.backend (a reused trial actor keeps its Keras,
    which runs on one framework for the life of the process). Returns the errors of trials that failed, by key."""
    cc = cfg.classify  # resources: an axis cannot vary them (load.parse_axes)
    # Cached-mode trials train only the head (~0.1 ms per image-epoch on one CPU core, measured at 1280
    # features): GPUs are for the feature extraction, and the trials run on CPUs, many at a time.
    resources = {"CPU": cc.cpus_per_trial, "GPU": 0 if cc.mode == "cached" else cc.gpus_per_trial}
    require_resources(cfg, resources, f"classify: classify.cpus_per_trial={cc.cpus_per_trial:g}, "
                                      f"classify.gpus_per_trial={resources['GPU']:g}")
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, paths=paths, trials=trials),
        {k.lower(): v for k, v in resources.items()})
    storage = tune_storage(cfg, paths)
    # Every planned trial's: a restored experiment can re-run one that finished just before a kill.
    params = {key: trial_params(t.cfg, t.trial, t.ctx) for key, t in trials.items()}
    callbacks = tracker(cfg, paths, "classify", _trial_key, functools.partial(_tracked_params, params),
                        functools.partial(_tracked_files, paths))
    name, tuner = _interrupted(storage, list(trials), backend, trainable)
    if tuner is not None:
        # An interrupted run of these trials: continue it (finished trials are not re-run; errored ones are).
        with_callbacks(tuner, callbacks)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial_key": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cc.max_concurrent or None,
                # A worker keeps its framework imported (and CUDA initialised) and its compiled models across
                # trials (train.reuse_compiled); run_trial re-seeds and resets them, so results do not depend on it.
                reuse_actors=True,
                trial_name_creator=_trial_key, trial_dirname_creator=_trial_key,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=cc.max_failures)),
        )
    return {result.config["trial_key"]: one_line(result.error) for result in tuner.fit() if result.error}


def _interrupted(storage: str, planned: list[str], backend: str, trainable) -> tuple[str, object | None]:
    """(name, restored tuner) of an interrupted Tune experiment of this grid (named by its planned trials), else
    (a new name, None). One that ran to its end is never restored (its trials are done to Tune, which would run
    nothing: a trial damaged since, or trials/ deleted, failed every re-run), so the next free name is taken."""
    base = f"classify-{keys.digest(planned)}" + ("" if backend == "tensorflow" else f"-{backend}")
    attempt = 0
    while True:
        name = base + (f"-{attempt}" if attempt else "")
        path = f"{storage.rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(path):
            return name, None
        restored = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        done = restored.get_results()
        if done.num_terminated < len(done):
            return name, restored
        attempt += 1


def collect(paths: ExperimentPaths, planned: list[PlannedTrial], errors: dict[str, str] | None = None) -> pd.DataFrame:
    """The summary rows of `planned`, in grid order; error naming the trials that have none (and the first
    one's own error, from `errors`, when Tune reported it)."""
    missing = [t.key for t in planned if trial_problem(paths, t.key)]
    if missing:
        errors = errors or {}
        first = next((key for key in missing if key in errors), missing[0])
        said = errors.get(first, first)
        said = said if first in said else f"{first}: {said}"  # run_trial's own errors name their trial
        raise StageError(
            f"{len(missing)} classifier trial(s) did not finish, e.g. {said}; see the Tune error files under the "
            f"classify-* folder of the Ray storage path, fix, and re-run (finished trials are kept)")
    rows = pd.concat([pd.read_parquet(paths.trial(t.key)) for t in planned], ignore_index=True)
    if "backend" not in rows.columns or rows["backend"].isna().any():
        # Rows written before classify.backend existed (their keys are unchanged): TensorFlow ran them all.
        rows["backend"] = rows.get("backend", pd.Series(index=rows.index, dtype=object)).fillna("tensorflow")
    return rows


def _pending(paths: ExperimentPaths, planned: list[PlannedTrial]) -> list[PlannedTrial]:
    """Trials without three whole output files; a damaged one is named and run again."""
    pending = []
    for trial in planned:
        problem = trial_problem(paths, trial.key)
        if problem and problem != "missing":
            note(f"classify: trial {trial.key} is damaged ({problem}): running it again")
            paths.trial(trial.key).unlink(missing_ok=True)
        if problem:
            pending.append(trial)
    return pending


def _move_trial(paths: ExperimentPaths, key: str, to_superseded: bool) -> None:
    """Move one trial's files between trials/ (with history/, predictions/) and superseded/. The summary marks
    a trial done, so it leaves trials/ first and arrives there last."""
    here = trial_outputs(paths, key)  # history, predictions, summary
    there = [paths.superseded / p.parent.name / p.name for p in here]
    pairs = list(zip(here, there)) if to_superseded else list(zip(there, here))
    for src, dst in (reversed(pairs) if to_superseded else pairs):
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)


def _keep_trials_current(paths: ExperimentPaths, planned: list[PlannedTrial]) -> None:
    """trials/ holds exactly this plan's trials, so `read_parquet('trials/*.parquet')` is never stale: others
    move to superseded/, and planned ones found there (a config or data set that came back) move home."""
    keys_planned = {t.key for t in planned}
    # By every file of a trial: a run killed between a trial's history or predictions and its summary left them
    # without one, and a glob of predictions/ would read them beside this config's.
    retired = sorted({f.stem for folder in (paths.trials, paths.history, paths.predictions)
                      for f in folder.glob("*.parquet") if f.stem not in keys_planned})
    for key in retired:
        _move_trial(paths, key, to_superseded=True)
    back = [k for k in keys_planned if (paths.superseded / "trials" / f"{k}.parquet").exists()
            and not paths.trial(k).exists()]
    for key in back:
        _move_trial(paths, key, to_superseded=False)
    if retired or back:
        note(f"classify: {len(retired)} trials of another config or data moved to {paths.superseded}, "
             f"{len(back)} brought back from it")


def _feature_images(pending: list[PlannedTrial]) -> pd.DataFrame:
    frames = [frame[["path", "sha256"]] for t in pending for frame in (t.train, t.test)]
    return pd.concat(frames, ignore_index=True).drop_duplicates("sha256")


def _write_augmented(manifest: pd.DataFrame, pending: list[PlannedTrial]) -> None:
    """The classic augmentations the pending real_augmented controls train on (ooc_ray.classic)."""
    rows = [t.train[t.train["source"] == "augmented"] for t in pending]
    rows = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if rows.empty:
        return
    source_path = manifest.set_index("id")["path"]
    sources = {identity: source_path[augmented_source(image_id)[0]]
               for identity, image_id in zip(rows["sha256"], rows["id"])}
    note(f"classify: {write_missing(rows, sources)} classic augmentations written for the real_augmented control")


class _Weights:
    """The classifier weights of each classify section the variants use, resolved (and built) once each."""

    def __init__(self, cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame):
        self.cfg, self.paths, self.manifest, self.known = cfg, paths, manifest, {}

    def __call__(self, cc: ClassifyConfig):
        # Every setting backbone_weights reads: "calibrated" is computed with the backbone, the input size, the
        # seed (a classify.seed axis: one set per seed) and on the framework.
        key = (cc.backbone, cc.weights, cc.input_size, cc.backend, cc.seed)
        if key not in self.known:
            self.known[key] = weights_on_cluster(self.cfg, cc, self.paths.models, self.manifest)
        return self.known[key]


def _cache_group(t: GridTrial, weights: _Weights) -> str:
    """Trials that read one feature cache folder (cached mode; its key holds the views) or one set of weights."""
    cc = trial_config(t.cfg, t.trial.spec).classify
    if cc.mode == "cached":
        return str(cache_dir(cc, weights(cc), weights.paths.features))
    return weights(cc).identity


def grid_trials(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame
                ) -> tuple[list[tuple[Variant, list[PlannedTrial]]], dict[str, GridTrial], _Weights]:
    """The variants with their planned trials, and every distinct trial (by key) once with its variant's config."""
    weights = _Weights(cfg, paths, manifest)
    grid = plan_grid(cfg, paths, manifest, lambda cc: weights(cc).identity)
    trials: dict[str, GridTrial] = {}
    for variant, planned in grid:
        for trial in planned:
            trials.setdefault(trial.key, GridTrial(variant.cfg, trial, None))
    return grid, trials, weights


def run_classify(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Run (or finish) the classifier grid of every variant; returns all its trial rows, one per trial."""
    manifest = load_manifest(paths)
    if "file" not in manifest.columns:  # what each prediction row names its image by
        raise StageError(f"{paths.manifest}: no `file` column (written by an older ooc-ray); run `ooc-ray data` again")
    grid, trials, weights = grid_trials(cfg, paths, manifest)
    planned = [t.trial for t in trials.values()]
    _keep_trials_current(paths, planned)
    pending = _pending(paths, planned)
    note(f"classify: {len(planned)} trials planned" + (f" over {len(grid)} variants" if len(grid) > 1 else "")
         + f", {len(planned) - len(pending)} re-used, {len(pending)} to run")
    empty = [t.trial.key for t in trials.values() if t.cfg.classify.mixing in ("loss_weighted", "replace")
             and t.trial.spec.mixes and not (t.trial.train["source"] == "synthetic").any()]
    if empty:  # train.trial_mixing: nothing to weight or swap
        note(f"classify: {len(empty)} trial(s) of a mixing arm draw no synthetic image (round(r x n_train) = 0), "
             f"e.g. {empty[0]}: they train as concat, and their rows' `mixing` says so")
    errors: dict[str, str] = {}  # a failed trial's own error, by key
    if pending:
        init_ray(cfg)
        _write_augmented(manifest, pending)
        waiting = {t.key for t in pending}
        # Trials that read one feature cache (or one set of weights) share a context; a cache is filled for the
        # pending trials that read it.
        groups = {key: _cache_group(t, weights) for key, t in trials.items()}
        contexts: dict[str, TrialContext] = {}
        for key, (vcfg, trial, _) in list(trials.items()):
            group = groups[key]
            if group not in contexts:
                cc = trial_config(vcfg, trial.spec).classify
                features_dir = None
                if cc.mode == "cached":
                    mine = [trials[k].trial for k in waiting if groups[k] == group]
                    features_dir = str(ensure_features(vcfg, cc, weights(cc), _feature_images(mine), paths.features)
                                       if mine else group)
                contexts[group] = TrialContext(tuple(class_names(manifest)), weights(cc), keys.data_digest(manifest),
                                               features_dir)
            trials[key] = GridTrial(vcfg, trial, contexts[group])
        with FileProgress([paths.trial(t.key) for t in pending], "classify", "trial"):
            for backend in dict.fromkeys(trials[t.key].cfg.classify.backend for t in pending):
                keys_of = [t.key for t in pending if trials[t.key].cfg.classify.backend == backend]
                errors.update(_run_tune(cfg, paths, trials, keys_of, backend))
    return collect(paths, planned, errors)
