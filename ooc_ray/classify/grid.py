"""The classify stage: a Ray Tune grid over (ratio, LoRA weight, fold), one Parquet row per trial.

Resume works at two levels: Tuner.restore continues an interrupted Tune experiment, and every trial first
looks for its own summary Parquet (written last, atomically) and skips the work if it exists, so finished
trials are never re-run or duplicated even when the Tune folder is lost.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ooc_ray.classify.train import arm_name, run_trial, summary_path
from ooc_ray.classify.trainsets import build_trainset
from ooc_ray.config import ExperimentConfig, save_resolved, slice_key, to_dict
from ooc_ray.paths import ExperimentPaths

# Fields that change where/how fast work runs, not its numbers: left out of the result key so that, e.g.,
# moving from 1 to 4 GPUs does not re-run finished trials.
_RESOURCE_FIELDS = {"gpus", "actors", "gpus_per_actor", "cpus_per_trial", "gpus_per_trial",
                    "max_failures", "max_concurrent"}
# Grid definition: which trials exist, not what one trial computes.
_GRID_FIELDS = {"ratios", "synthetic_only"}


def config_key(cfg: ExperimentConfig) -> str:
    """Hash of every config value that can change a trial's numbers (data, folds, generator, sampling,
    classifier), without resource and grid-shape fields."""
    def strip(section, drop):
        return {k: v for k, v in to_dict(section).items() if k not in drop}

    return slice_key(cfg.data, cfg.folds, strip(cfg.generator, _RESOURCE_FIELDS),
                     strip(cfg.sample, _RESOURCE_FIELDS), strip(cfg.classify, _RESOURCE_FIELDS | _GRID_FIELDS),
                     cfg.quality.filter_min_confidence)


def trial_key(ckey: str, fold: int, ratio: float, weight: float | None, synthetic_only: bool) -> str:
    arm = "synthetic" if synthetic_only else f"r{ratio:g}"
    wtag = "w-" if weight is None else f"w{weight:g}"
    return f"fold{fold}-{arm}-{wtag}-{slice_key(ckey, fold, ratio, weight, synthetic_only, length=8)}"


def trial_specs(cfg: ExperimentConfig) -> list[dict]:
    """Every trial of the grid: per fold, real only once (no LoRA weight), then each ratio > 0 and
    synthetic-only for each LoRA weight. The paper's grid: 5 x (1 + 2 x 5 + 2) = 65 trials."""
    ckey = config_key(cfg)
    specs = []
    for fold in range(cfg.folds.k):
        arms: list[tuple[float, float | None, bool]] = []
        if any(r == 0 for r in cfg.classify.ratios):
            arms.append((0.0, None, False))
        for weight in cfg.sample.weights:
            arms += [(float(r), float(weight), False) for r in cfg.classify.ratios if r > 0]
            if cfg.classify.synthetic_only:
                arms.append((1.0, float(weight), True))  # n_train synthetic images: ratio 1, no real ones
        for ratio, weight, synth in arms:
            specs.append({"trial_key": trial_key(ckey, fold, ratio, weight, synth), "fold": fold, "ratio": ratio,
                          "weight": weight, "synthetic_only": synth, "arm": arm_name(ratio, synth),
                          "config_key": ckey})
    return specs


def _tune_trial(config: dict, cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame,
                synthetic: pd.DataFrame | None, features_dir: str | None) -> None:
    """Tune function trainable: one trial spec; per-epoch metrics go to ray.tune.report."""
    from ray import tune

    spec = config["spec"]
    out = summary_path(paths, spec["trial_key"])
    if out.exists():  # finished by an earlier run: report its result, compute nothing
        row = pd.read_parquet(out).iloc[0]
        tune.report({"test_accuracy": float(row["accuracy"]), "skipped": True})
        return
    row = run_trial(cfg, paths, spec, manifest, synthetic, report=tune.report, features_dir=features_dir)
    tune.report({"test_accuracy": row["accuracy"], "test_f1_macro": row["f1_macro"], "skipped": False})


def tune_storage(cfg: ExperimentConfig, paths: ExperimentPaths) -> str:
    if cfg.ray.storage_path:
        # URIs (s3://, gs://) go to Tune as they are; local paths are made absolute (trials may chdir).
        return cfg.ray.storage_path if "://" in cfg.ray.storage_path else str(Path(cfg.ray.storage_path).resolve())
    return str(paths.ray_storage)


def _run_tune(cfg, paths, specs, pending, manifest, synthetic, features_dir) -> None:
    from ray import tune

    cc = cfg.classify
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, cfg=cfg, paths=paths, manifest=manifest, synthetic=synthetic,
                             features_dir=None if features_dir is None else str(features_dir)),
        # Cached-mode trials train only the head (~0.1 ms per image-epoch on one CPU core, measured at 1280
        # features): GPUs are for the feature extraction, and the trials run on CPUs, many at a time.
        {"cpu": cc.cpus_per_trial, "gpu": 0 if cc.mode == "cached" else cc.gpus_per_trial},
    )
    storage = tune_storage(cfg, paths)
    name = f"classify-{slice_key(config_key(cfg), [s['trial_key'] for s in specs])}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(exp_path):
        # An interrupted run of this same grid: continue it (finished trials are not re-run; errored ones are).
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cc.max_concurrent or None,
                # A worker keeps TensorFlow imported (and CUDA initialised) across trials: saves 3-5 s a trial
                # on CPU. run_trial re-seeds and clears the Keras session, so results do not depend on it.
                reuse_actors=True,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=cc.max_failures),
            ),
        )
    tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["spec"]["trial_key"]


def collect(paths: ExperimentPaths, specs: list[dict]) -> pd.DataFrame:
    """The summary rows of `specs`, in grid order; error naming the trials that have none."""
    missing = [s["trial_key"] for s in specs if not summary_path(paths, s["trial_key"]).exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} classifier trial(s) did not finish, e.g. {missing[0]}; see the Tune error files "
            f"under the classify-* folder of the Ray storage path, fix, and re-run (finished trials are kept)"
        )
    return pd.concat([pd.read_parquet(summary_path(paths, s["trial_key"])) for s in specs], ignore_index=True)


def needed_images(cfg: ExperimentConfig, specs: list[dict], manifest: pd.DataFrame,
                  synthetic: pd.DataFrame | None) -> list[str]:
    """Every image path the trials of `specs` read (training sets and held-out folds)."""
    needed = set(manifest["path"])
    for s in specs:
        if s["ratio"] > 0 or s["synthetic_only"]:
            train = build_trainset(manifest, synthetic, s["fold"], s["ratio"], s["weight"], s["synthetic_only"],
                                   seed=cfg.classify.seed, generator_split=cfg.generator.split)
            needed |= set(train["path"])
    return sorted(needed)


def filtered_synthetic(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """The synthetic table, less the images the quality filter dropped (quality.filter_min_confidence > 0)."""
    synthetic = pd.read_parquet(paths.synthetic_table)
    if cfg.quality.filter_min_confidence <= 0:
        return synthetic
    if not paths.synthetic_scores.exists():
        raise FileNotFoundError(f"quality.filter_min_confidence is set but {paths.synthetic_scores} is missing: "
                                "run the quality stage first")
    scores = pd.read_parquet(paths.synthetic_scores)
    # The threshold is applied here, not read from the stored `keep`, so changing it needs no quality re-run.
    keep = set(scores.loc[scores["real_confidence"] >= cfg.quality.filter_min_confidence, "id"])
    return synthetic[synthetic["id"].isin(keep)].reset_index(drop=True)


def run_classify(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Run (or finish) the classifier grid; returns all its trial rows, one per trial."""
    from ooc_ray.data import load_manifest

    from ooc_ray.classify.model import with_backbone_weights

    specs = trial_specs(cfg)  # before the weights are resolved: keys stay "calibrated", not a machine's path
    manifest = load_manifest(paths)
    cfg = with_backbone_weights(cfg, paths, manifest)
    needs_synthetic = any(s["ratio"] > 0 or s["synthetic_only"] for s in specs)
    if needs_synthetic and not paths.synthetic_table.exists():
        raise FileNotFoundError(f"{paths.synthetic_table} not found: run the sample stage first")
    synthetic = filtered_synthetic(cfg, paths) if needs_synthetic else None
    # Build every training set now (cheap, pandas only): a pool that is too small fails here, naming the
    # fold/class/weight, before Ray starts or any trial spends time.
    images = needed_images(cfg, specs, manifest, synthetic)
    save_resolved(cfg, paths.config)
    pending = [s for s in specs if not summary_path(paths, s["trial_key"]).exists()]
    if pending:
        from ooc_ray.raycluster import init_ray

        init_ray(cfg)
        features_dir = None
        if cfg.classify.mode == "cached":
            from ooc_ray.classify.features import ensure_features

            features_dir = ensure_features(cfg.classify, paths.features, images)
        _run_tune(cfg, paths, specs, pending, manifest, synthetic, features_dir)
    return collect(paths, specs)


__all__ = ["config_key", "trial_key", "trial_specs", "run_classify", "collect", "needed_images"]
