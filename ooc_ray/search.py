"""LoRA hyperparameter search: Ray Tune + Optuna over rank, alpha, UNet/TE learning rates, epochs, repeats and
the sampling LoRA weight.

One trial is the pipeline in miniature, composed from the stages' own planning functions on a derived config
(generator settings and LoRA weight of the trial's point): fine-tune one LoRA per class on a small subset of one
fold's training images (finetune), sample `search.images_per_class` images per class with sample.* as
configured (sample), and score them on frozen-backbone features against that fold's real held-out images
(quality's measures). Every trial computes all three objectives; search.objective picks the one Optuna follows:
  cas       accuracy on real held-out images of a linear classifier trained on the synthetic images only (max)
  kid       mean per-class KID between synthetic and real training images (min)
  accuracy  held-out accuracy of a linear classifier on real subset + synthetic images (max)
The linear probe stands in for the full EfficientNet grid: it costs seconds, not hours, so the search can
afford many trials; confirm the winner with the full grid (experiments/<name>.yaml).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ooc_ray import keys
from ooc_ray.backbones import BackboneWeights
from ooc_ray.config import ExperimentConfig, SearchConfig
from ooc_ray.data import class_names, load_manifest, run_data
from ooc_ray.diffusion.base import BaseModel
from ooc_ray.diffusion.lora_files import trained_table
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import ConfigError, StageError
from ooc_ray.finetune import pending_jobs, train_job
from ooc_ray.folds import fold_ids, held_out_rows, train_rows
from ooc_ray.gpu import require_tf_gpu, require_torch_cuda
from ooc_ray.io import atomic_write_text, parquet_problem, write_parquet
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.pretrain import run_pretrain
from ooc_ray.protocol import plan_loras
from ooc_ray.measures import class_quality, linear_probe
from ooc_ray.features import weights_on_cluster
from ooc_ray.quality import features_identity, quality_features
from ooc_ray.raycluster import init_ray, require_resources, tune_storage
from ooc_ray.sample import consolidate, plan_images, render, start_images
from ooc_ray.tracking import tracker, with_callbacks
from ooc_ray.variants import refuse_axes

OBJECTIVE_MODE = {"cas": "max", "kid": "min", "accuracy": "max"}
POINT = ("rank", "alpha", "unet_lr", "text_encoder_lr", "epochs", "repeats", "weight")


def search_space(s: SearchConfig) -> dict:
    return {
        "rank": tune.choice(list(s.rank)),
        "alpha": tune.choice(list(s.alpha)),
        "unet_lr": tune.loguniform(*s.unet_lr),
        "text_encoder_lr": tune.loguniform(*s.text_encoder_lr),
        "epochs": tune.randint(s.epochs[0], s.epochs[1] + 1),  # randint's upper bound is exclusive
        "repeats": tune.randint(s.repeats[0], s.repeats[1] + 1),
        "weight": tune.uniform(*s.weight),
    }


def point_config(cfg: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The experiment config of one search point: its LoRA settings, and its weight as the only LoRA weight."""
    generator = dataclasses.replace(
        cfg.generator, rank=int(params["rank"]), alpha=float(params["alpha"]), unet_lr=float(params["unet_lr"]),
        text_encoder_lr=float(params["text_encoder_lr"]), epochs=int(params["epochs"]),
        repeats=int(params["repeats"]), split="fold", per_group=False)
    sample = dataclasses.replace(cfg.sample, weights=(float(params["weight"]),))
    return dataclasses.replace(cfg, generator=generator, sample=sample)


def search_subset(manifest: pd.DataFrame, s: SearchConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(LoRA training subset: up to images_per_class per class from the fold's training images, held-out fold)."""
    if s.fold not in fold_ids(manifest):
        raise ConfigError(f"search.fold: {s.fold} is not one of the folds {fold_ids(manifest)}")
    train = train_rows(manifest, s.fold)
    subset = pd.concat([rows.sample(min(len(rows), s.images_per_class), random_state=s.seed)
                        for _, rows in train.groupby("label")])
    return subset.sort_values("id"), held_out_rows(manifest, s.fold)


def score(subset: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame, features: dict, classes: list[str],
          cfg: ExperimentConfig) -> dict:
    """The three objectives for one trial's images: quality's CAS and KID, and a real + synthetic probe."""
    table, _ = class_quality(subset, test, synthetic, features, classes, cfg.quality)
    index = {c: i for i, c in enumerate(classes)}
    both = pd.concat([subset, synthetic], ignore_index=True)
    probe = linear_probe(np.stack([features[d] for d in both["sha256"]]), both["label"].map(index).to_numpy(),
                         len(classes))
    predicted = probe(np.stack([features[d] for d in test["sha256"]])).argmax(1)
    accuracy = float((predicted == test["label"].map(index).to_numpy()).mean())
    return {"cas": float(table["cas_accuracy"].iloc[0]), "kid": float(np.nanmean(table["kid"])),
            "accuracy": accuracy}


def _make_images(tcfg: ExperimentConfig, paths: ExperimentPaths, jobs, sub_manifest: pd.DataFrame,
                 base: BaseModel) -> tuple[pd.DataFrame, list[float]]:
    """Train the trial's LoRAs (finetune) and sample its pools in this process (sample); the synthetic table."""
    lora_root = paths.search / "lora"
    for job in pending_jobs(jobs, lora_root):
        train_job(job, tcfg.generator, base, lora_root)
    loras = trained_table(jobs, lora_root)
    starts = start_images(jobs, sub_manifest)
    sizes = {target: tcfg.search.images_per_class for target in starts}  # per (LoRA, class it draws)
    plan = plan_images(tcfg, base, loras, sizes, starts, paths.search / "synthetic")
    seconds = render(plan, tcfg, base, use_ray=False)  # inside a Tune trial: its CPUs/GPUs are this process's
    return consolidate(plan, seconds), loras["final_loss"].tolist()


def run_search_trial(params: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                     weights: BackboneWeights) -> dict:
    """One search trial (also callable without Ray); writes search/trials/<key>.parquet and returns its row."""
    start = time.perf_counter()
    tcfg = point_config(cfg, params)
    manifest = load_manifest(paths)
    subset, test = search_subset(manifest, cfg.search)
    sub_manifest = pd.concat([subset, test], ignore_index=True)
    jobs = plan_loras(tcfg, sub_manifest, base.identity, folds=[cfg.search.fold])
    point = {k: params[k] for k in POINT}
    key = keys.search_trial_key(tcfg, point, [j.key for j in jobs], test,
                                features_identity(cfg, weights, paths, manifest))
    result_file = paths.search / "trials" / f"{key}.parquet"
    if not parquet_problem(result_file):  # the same point was already scored (Optuna may propose it again)
        return pd.read_parquet(result_file).iloc[0].to_dict()
    synthetic, losses = _make_images(tcfg, paths, jobs, sub_manifest, base)
    images = pd.concat([sub_manifest[["path", "sha256"]], synthetic[["path", "sha256"]]], ignore_index=True)
    features = quality_features(tcfg, weights, images, manifest, paths, use_ray=False)
    metrics = score(subset, test, synthetic, features, class_names(manifest), tcfg)
    row = {"search_key": key, **point, **metrics, "score": metrics[cfg.search.objective],
           "objective": cfg.search.objective, "fold": cfg.search.fold, "final_loss_mean": float(np.mean(losses)),
           "n_lora_images_per_class": cfg.search.images_per_class, "duration_s": time.perf_counter() - start}
    write_parquet(pd.DataFrame([row]), result_file)
    return row


def _checked_trial(params: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                   weights: BackboneWeights) -> dict:
    """run_search_trial inside a Ray worker, after checking that the GPUs it was given work."""
    if cfg.search.gpus_per_trial > 0:  # LoRA training and sampling (torch), then the classifier (TF)
        request = f"search trial: search.gpus_per_trial={cfg.search.gpus_per_trial:g}"
        require_torch_cuda(request)
        require_tf_gpu(request)
    return run_search_trial(params, cfg, paths, base, weights)


def _tune_trainable(params: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                    weights: BackboneWeights) -> None:
    row = _checked_trial(params, cfg, paths, base, weights)
    tune.report({k: row[k] for k in ("search_key", "score", "cas", "kid", "accuracy")})


def default_point(cfg: ExperimentConfig) -> dict:
    """The config's own LoRA settings as a search point: what the best trial has to beat."""
    g = cfg.generator
    return {"rank": g.rank, "alpha": g.alpha, "unet_lr": g.unet_lr, "text_encoder_lr": g.text_encoder_lr,
            "epochs": g.epochs, "repeats": g.repeats, "weight": cfg.sample.weights[0]}


def confirm(cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel, weights: BackboneWeights,
            best: dict) -> dict:
    """Score the best point and the defaults on every fold the search did not choose on (a best trial is
    selected on its own fold's noise; the other folds are data it never saw), as Ray tasks with the search
    trials' resources. Writes search/confirm.parquet."""
    ray = init_ray(cfg)
    s = cfg.search
    task = ray.remote(_checked_trial).options(num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)
    points = {"best": {k: best[k] for k in POINT}, "default": default_point(cfg)}
    runs = [(fold, settings, task.remote(point, dataclasses.replace(cfg, search=dataclasses.replace(s, fold=fold)),
                                         paths, base, weights))
            for fold in fold_ids(load_manifest(paths)) if fold != s.fold for settings, point in points.items()]
    done = ray.get([ref for _, _, ref in runs])
    rows = [{"fold": fold, "settings": settings, "score": float(row["score"]), "search_key": row["search_key"]}
            for (fold, settings, _), row in zip(runs, done)]
    table = pd.DataFrame(rows)
    write_parquet(table, paths.search / "confirm.parquet")
    scores = table.pivot(index="fold", columns="settings", values="score")
    sign = 1.0 if OBJECTIVE_MODE[cfg.search.objective] == "max" else -1.0
    gain = sign * (scores["best"] - scores["default"])  # > 0: the best point did better on that fold
    return {"folds": [int(f) for f in scores.index], "best_mean": float(scores["best"].mean()),
            "default_mean": float(scores["default"].mean()), "gain_mean": float(gain.mean()),
            "best_better_folds": int((gain > 0).sum()), "default_point": default_point(cfg)}


def _search_trial_id(run_name: str, trial) -> str:
    return f"{run_name}/{trial.trial_id}"  # Tune's id, kept by a restored search


def _search_params(trial) -> dict:
    return dict(trial.config)


def _search_files(paths: ExperimentPaths, trial, last_result: dict) -> list[Path]:
    key = last_result.get("search_key")
    return [paths.search / "trials" / f"{key}.parquet"] if key else []


def _tuner(cfg: ExperimentConfig, paths: ExperimentPaths, trainable, run_key: str):

    s = cfg.search
    storage = tune_storage(cfg, paths)  # s3://... stays a URI; local paths become absolute
    run_name = f"lora_search_{run_key}"  # a changed space, setting or data set starts a new search
    callbacks = tracker(cfg, paths, "search", functools.partial(_search_trial_id, run_name), _search_params,
                        functools.partial(_search_files, paths))
    if tune.Tuner.can_restore(f"{storage}/{run_name}"):
        tuner = tune.Tuner.restore(f"{storage}/{run_name}", trainable, resume_errored=True)
        with_callbacks(tuner, callbacks)
        return tuner
    return tune.Tuner(
        trainable, param_space=search_space(s),
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(seed=s.seed), metric="score",
                                    mode=OBJECTIVE_MODE[s.objective], num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent or None),
        run_config=tune.RunConfig(name=run_name, storage_path=storage, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1)))


def run_search(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Run (or resume) the Optuna search; writes search/results.parquet sorted best first and best.json."""
    refuse_axes(cfg, "the LoRA search (it explores its own space, search.*, on one config; run the axes with "
                     "`ooc-ray run`)")
    manifest = run_data(cfg, paths)  # skips an unchanged source
    if cfg.generator.pretrain.source:
        run_pretrain(cfg, paths)  # the base every trial's LoRAs train on; re-used while its inputs are unchanged
    weights = weights_on_cluster(cfg, cfg.classify, paths.models, manifest)
    base = generator_base(cfg, paths)  # built once, before any trial reads it
    s = cfg.search
    init_ray(cfg)
    require_resources(cfg, {"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial},
                      f"search: search.cpus_per_trial={s.cpus_per_trial:g}, search.gpus_per_trial={s.gpus_per_trial:g}")
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trainable, cfg=cfg, paths=paths, base=base, weights=weights),
        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    grid = _tuner(cfg, paths, trainable, keys.search_run_key(cfg, base.identity, weights.identity, manifest)).fit()
    # This search's trials only: search/trials/ keeps every search's (a changed setting adds, never overwrites).
    found = sorted({r.metrics["search_key"] for r in grid if r.metrics and "search_key" in r.metrics})
    if not found:
        raise StageError(f"search: no trial finished; see the Tune error files under {tune_storage(cfg, paths)}")
    results = pd.concat([pd.read_parquet(paths.search / "trials" / f"{k}.parquet") for k in found],
                        ignore_index=True)
    results = results.sort_values("score", ascending=OBJECTIVE_MODE[s.objective] == "min", ignore_index=True)
    write_parquet(results, paths.search / "results.parquet")
    best = results.iloc[0].to_dict()
    # How much the objective moves across trials: a best trial inside the others' spread is not yet a finding.
    scores = results["score"].astype(float)
    spread = {"n_trials": len(scores), "min": scores.min(), "max": scores.max(), "std": scores.std(ddof=1)
              if len(scores) > 1 else float("nan")}
    summary = {**{k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()},
               "spread": {k: float(v) for k, v in spread.items()}}
    note(f"search: best {s.objective} = {best['score']:.4f} with rank={best['rank']} alpha={best['alpha']} "
         f"unet_lr={best['unet_lr']:.2e} te_lr={best['text_encoder_lr']:.2e} epochs={best['epochs']} "
         f"repeats={best['repeats']} weight={best['weight']:.2f}; across {spread['n_trials']} trials "
         f"{s.objective} {spread['min']:.4f}..{spread['max']:.4f} (sd {spread['std']:.4f})")
    if s.confirm:
        checked = confirm(cfg, paths, base, weights, best)
        summary["confirm"] = checked
        note(f"search: confirming on folds {checked['folds']}: best settings {s.objective} "
             f"{checked['best_mean']:.4f} vs the config's own {checked['default_mean']:.4f}; better on "
             f"{checked['best_better_folds']} of {len(checked['folds'])} folds")
    atomic_write_text(paths.search / "best.json", json.dumps(summary, indent=2))
    return results
