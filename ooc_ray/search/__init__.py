"""LoRA search: Ray Tune + Optuna over search.space (any generator or sample field an axis may vary), each trial
scored on several folds (ooc_ray.search.trial), poor trials stopped early by ASHA or the median rule at the
checkpoints of their LoRA training, and the best point confirmed against the config's own settings on folds the
search never scored on (ooc_ray.search.confirm).

The linear probe on quality.features stands in for the full classifier grid: seconds per trial, not hours. What
the search writes (search/): trials/<key>.parquet (a row per trial, updated at each checkpoint), results.parquet
(this search's trials, complete ones best first), confirm.parquet, best.json, and best.yaml: the experiment with
the winning point applied, which `ooc-ray run search/best.yaml` runs as it is (the full grid on every fold).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search.optuna import OptunaSearch

from ooc_ray import keys
from ooc_ray.backbones import BackboneWeights
from ooc_ray.checks import raise_problems, random_features_problem
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import run_data
from ooc_ray.diffusion.base import BaseModel
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import StageError, one_line
from ooc_ray.feature_cache import weights_on_cluster
from ooc_ray.fields import to_dict, with_values
from ooc_ray.gpu import require_keras_gpu, require_torch_cuda
from ooc_ray.io import atomic_write_text, write_parquet
from ooc_ray.logs import note, relevel, warn
from ooc_ray.paths import ExperimentPaths
from ooc_ray.pretrain import run_pretrain
from ooc_ray.raycluster import init_ray, ray_task, require_resources, tune_storage
from ooc_ray.search.confirm import confirm
from ooc_ray.protocol import plan_loras
from ooc_ray.search.space import (default_point, describe, max_epochs, outside, point_config, point_of, split_folds,
                                   tune_space)
from ooc_ray.search.trial import (OBJECTIVE_MODE, REPORTED, better_sign, final_row, fold_part, plan_part_loras,
                                   trial_reports)
from ooc_ray.tracking import tracker, with_callbacks
from ooc_ray.variants import refuse_axes


def _check_gpus(cfg: ExperimentConfig) -> None:
    """In a Ray worker: the GPUs this trial was given work (LoRA training and sampling on torch, the probe's
    features on classify.backend's framework)."""
    if cfg.search.gpus_per_trial > 0:
        request = f"search trial: search.gpus_per_trial={cfg.search.gpus_per_trial:g}"
        require_torch_cuda(request)
        require_keras_gpu(cfg.classify.backend, request)


def _checked_final_row(point: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                       weights: BackboneWeights, folds: list[int]) -> dict:
    _check_gpus(cfg)
    return final_row(point, cfg, paths, base, weights, folds)


def _tune_trainable(params: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                    weights: BackboneWeights, folds: list[int]) -> None:
    _check_gpus(cfg)
    for row in trial_reports(point_of(cfg.search.space, params), cfg, paths, base, weights, folds,
                             cfg.search.report_every):
        tune.report({k: row[k] for k in REPORTED})


def _scheduler(cfg: ExperimentConfig):
    """Ray Tune's early stopping on the epochs a trial has trained (its reports come every report_every)."""
    s, longest = cfg.search, max_epochs(cfg)
    if s.scheduler == "asha":
        return ASHAScheduler(time_attr="epochs_trained", max_t=longest, grace_period=min(s.report_every, longest),
                             reduction_factor=s.reduction_factor)
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="epochs_trained", grace_period=min(s.report_every, longest))
    return FIFOScheduler()


def _search_trial_id(run_name: str, trial) -> str:
    return f"{run_name}/{trial.trial_id}"  # Tune's id, kept by a restored search


def _search_params(trial) -> dict:
    return dict(trial.config)


def _finished_record(paths: ExperimentPaths, run_key: str) -> Path:
    """The record of a search that ran to its end: its trials' keys."""
    return paths.search / "runs" / f"{run_key}.json"


def _search_files(paths: ExperimentPaths, trial, last_result: dict) -> list[Path]:
    key = last_result.get("search_key")
    return [paths.search / "trials" / f"{key}.parquet"] if key else []


def _unfinished(cfg: ExperimentConfig, paths: ExperimentPaths, run_name: str, resume: bool) -> str | None:
    """The Tune folder of this config's unfinished search, to continue (resume); None for a new search. Checked
    before Ray starts: a config whose search was stopped part-way is refused without --resume (its trials would
    be started again under the same name), and --resume without one is refused."""
    folder = f"{tune_storage(cfg, paths)}/{run_name}"  # s3://... stays a URI; local paths become absolute
    if tune.Tuner.can_restore(folder):
        if not resume:
            raise StageError(f"search: an unfinished search of this config is in {folder} (stopped or killed); "
                             "`ooc-ray search <file> --resume` continues it, or remove that folder to start again")
        return folder
    if resume:
        raise StageError(f"search --resume: no unfinished search of this config in {folder} (a changed setting or "
                         "data set starts a new search); run without --resume")
    return None


def _tuner(cfg: ExperimentConfig, paths: ExperimentPaths, trainable, run_name: str, unfinished: str | None):
    """A new Tune search, or the unfinished one of this config (_unfinished) restored."""
    s = cfg.search
    callbacks = tracker(cfg, paths, "search", functools.partial(_search_trial_id, run_name), _search_params,
                        functools.partial(_search_files, paths))
    if unfinished:
        tuner = tune.Tuner.restore(unfinished, trainable, resume_errored=True)
        with_callbacks(tuner, callbacks)
        return tuner
    # The config's own settings are the first trial, where the space holds them: a point the search then picks
    # has beaten them on the search's folds, not only the other proposals.
    own, off = default_point(cfg), outside(s.space, default_point(cfg))
    if off:
        note(f"search: the config's own settings are outside search.space ({', '.join(off)}): not a trial")
    return tune.Tuner(
        trainable, param_space=tune_space(s.space),
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(seed=s.seed, points_to_evaluate=None if off else [own]),
                                    scheduler=_scheduler(cfg), metric="score",
                                    mode=OBJECTIVE_MODE[s.objective], num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent or None,
                                    # A worker keeps torch and diffusers imported across trials (~8 s of CPU
                                    # a trial start, measured); a trial holds no state between calls.
                                    reuse_actors=True, time_budget_s=s.time_budget_s or None),
        run_config=tune.RunConfig(name=run_name, storage_path=tune_storage(cfg, paths), verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1)))


def _results(paths: ExperimentPaths, found: list[str], objective: str) -> pd.DataFrame:
    """This search's trials (search/trials/ keeps every search's): complete ones first, each group best first."""
    results = pd.concat([pd.read_parquet(paths.search / "trials" / f"{k}.parquet") for k in found],
                        ignore_index=True)
    ascending = OBJECTIVE_MODE[objective] == "min"
    results["order"] = results["score"] if ascending else -results["score"]
    return results.sort_values(["complete", "order"], ascending=[False, True], ignore_index=True).drop(columns="order")


def write_best_yaml(cfg: ExperimentConfig, paths: ExperimentPaths, point: dict, summary: dict) -> Path:
    """search/best.yaml: this experiment with the winning point applied, whole (`ooc-ray run` takes it as is)."""
    checked = summary.get("confirm", {})
    header = [f"# {cfg.name} with the LoRA search's best point applied (search/best.json):",
              f"#   {describe(point)}",
              f"# search objective {summary['objective']} {summary['score']:.4f} (mean of folds {summary['folds']})"]
    if "folds" in checked:
        header.append(f"# confirmed on folds {checked['folds']}: {checked['verdict'] or 'no verdict'} "
                      f"(gain {checked['gain_mean']:+.4f} over the settings it replaces)")
    elif checked:
        header.append(f"# {checked['verdict']}")
    searched, grid = summary["lora_images"]["search"], summary["lora_images"]["grid"]
    if grid[1] > searched[1]:
        header.append(f"# the search trained each LoRA on {searched[0]}-{searched[1]} images "
                      f"(search.images_per_class); this config trains them on {grid[0]}-{grid[1]}, so its generator.epochs and repeats give "
                      f"{grid[0] / searched[1]:.1f}-{grid[1] / searched[1]:.1f}x the optimizer steps the search scored")
    text = "\n".join(header) + "\n" + yaml.safe_dump(to_dict(with_values(cfg, point)), sort_keys=False)
    atomic_write_text(paths.search / "best.yaml", text)
    return paths.search / "best.yaml"


def _search_trials(cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel, weights: BackboneWeights,
                   folds: list[int], run_key: str, unfinished: str | None) -> dict:
    """This search's record: the keys of its trials, from Tune (continuing `unfinished`, a restorable Tune
    folder), and the errors of those that failed."""
    s = cfg.search
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trainable, cfg=cfg, paths=paths, base=base, weights=weights, folds=folds),
        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    grid = _tuner(cfg, paths, trainable, f"lora_search_{run_key}", unfinished).fit()
    found = sorted({r.metrics["search_key"] for r in grid if r.metrics and "search_key" in r.metrics})
    failed = [one_line(r.error) for r in grid if r.error]
    if not found:
        raise StageError(f"search: no trial finished (e.g. {failed[0] if failed else 'none said why'}); see the "
                         f"Tune error files under {tune_storage(cfg, paths)}")
    if failed:  # a point whose training fails is not ranked: say so, or the search looks whole
        warn(f"search: {len(failed)} trial(s) failed and are not ranked, e.g. {failed[0]}")
    record = {"trials": found, "failed": failed}
    atomic_write_text(_finished_record(paths, run_key), json.dumps(record))
    return record


def _finished_trials(paths: ExperimentPaths, run_key: str) -> dict:
    """The record of this search, which ran to its end before; its failed trials are said again (not ranked)."""
    record = {"failed": [], **json.loads(_finished_record(paths, run_key).read_text())}
    note(f"search: this search finished before ({len(record['trials'])} trials); re-using its results")
    if record["failed"]:
        warn(f"search: {len(record['failed'])} trial(s) of it failed and are not ranked, e.g. {record['failed'][0]}")
    return record


def _summary(results: pd.DataFrame, cfg: ExperimentConfig) -> tuple[dict, dict]:
    """(the best complete trial's point, best.json's summary: its row, the spread over complete trials)."""
    complete = results[results["complete"]]
    if complete.empty:
        raise StageError("search: every trial was stopped early; raise search.num_samples or the time budget")
    best = complete.iloc[0].to_dict()
    point = {name: best[name] for name, _, _ in cfg.search.space}
    scores = complete["score"].astype(float)
    summary = {**{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in best.items()},
               "point": point, "stopped_early": int((~results["complete"]).sum()),
               "spread": {"n_trials": len(scores), "min": float(scores.min()), "max": float(scores.max()),
                          "std": float(scores.std(ddof=1)) if len(scores) > 1 else float("nan")}}
    se = f" ± {best['score_se']:.4f} (se over folds {best['folds']})" if len(best["folds"]) > 1 else \
        f" (fold {best['folds'][0]})"
    note(f"search: best {cfg.search.objective} {best['score']:.4f}{se}, one held-out image = "
         f"{best['resolution']:.4f}, with {describe(point)}; {len(scores)} trials complete "
         f"({scores.min():.4f}..{scores.max():.4f}), {summary['stopped_early']} stopped early")
    summary["lead_over_own"] = _lead_over_own(complete, best, cfg)
    return point, summary


def lora_images(cfg: ExperimentConfig, point: dict, manifest: pd.DataFrame, base: BaseModel, folds: list[int]
                ) -> dict[str, list[int]]:
    """The fewest and most training images of a LoRA at `point`: in the search (at most search.images_per_class
    per class of the search's folds) and in the grid that best.yaml runs (each fold's training images): epochs
    and repeats count passes over them, so the grid's LoRAs take that many times the search's optimizer steps."""
    pcfg = point_config(cfg, point)
    parts = [fold_part(manifest, fold, cfg.search, cfg.classify.real_fraction) for fold in folds]
    searched = [len(job.image_ids) for jobs in plan_part_loras(pcfg, parts, base) for job in jobs]
    grid = [len(job.image_ids) for job in plan_loras(pcfg, manifest, base.identity)]
    return {"search": [min(searched), max(searched)], "grid": [min(grid), max(grid)]}


def _lead_over_own(complete: pd.DataFrame, best: dict, cfg: ExperimentConfig) -> dict | None:
    """How far the best trial leads the config's own settings (the first trial) on the search's folds, fold by
    fold: the mean paired difference (> 0 is better), its standard error and the resolution. A lead inside two
    standard errors or one held-out image is said to be noise. None when the own settings did not run to the end."""
    own = complete[[all(row[k] == v for k, v in default_point(cfg).items()) for _, row in complete.iterrows()]]
    if own.empty:
        return None
    d = better_sign(cfg.search.objective) * (np.asarray(best["fold_scores"]) - np.asarray(own["fold_scores"].iloc[0]))
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    lead = float(d.mean())
    noise = lead <= best["resolution"] or not lead > 2 * se  # NaN se (one fold): no evidence either
    if lead > 0:
        note(f"search: the best point leads the config's own settings by {lead:+.4f} on the search's folds "
             f"(se {se:.4f}, one held-out image {best['resolution']:.4f})" + (": within noise" if noise else ""))
    return {"own_score": float(own["score"].iloc[0]), "lead": lead, "lead_se": se, "within_noise": bool(noise)}


def _confirmed(cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel, weights: BackboneWeights,
               point: dict, folds: list[int]) -> dict:
    s = cfg.search
    if point == default_point(cfg):
        note("search: the best point is the config's own settings; nothing to confirm")
        return {"verdict": "the config's own settings were the best point: nothing to confirm"}
    init_ray(cfg)
    task = ray_task(_checked_final_row, s.cpus_per_trial, s.gpus_per_trial, cfg.ray.max_retries)
    checked = confirm(cfg, paths, base, weights, point, folds, task)
    note(f"search: on folds {checked['folds']}, never scored by the search: best {checked['best_mean']:.4f}, "
         f"the config's own settings {checked['default_mean']:.4f}; gain {checked['gain_mean']:+.4f} "
         f"[{checked['gain_ci'][0]:+.4f}, {checked['gain_ci'][1]:+.4f}], corrected p {checked['corrected_p']:.3g}: "
         f"{checked['verdict']}")
    return checked


def run_search(cfg: ExperimentConfig, paths: ExperimentPaths, resume: bool = False) -> pd.DataFrame:
    """Run (or, resume, continue) the search; writes search/results.parquet, best.json and best.yaml."""
    refuse_axes(cfg, "the LoRA search (it explores its own space, search.*, on one config; run the axes with "
                     "`ooc-ray run`)")
    raise_problems(random_features_problem(cfg))  # its probe scores on quality.features, enabled or not
    manifest = run_data(cfg, paths)  # skips an unchanged source
    if cfg.generator.pretrain.source:
        run_pretrain(cfg, paths)  # the base every trial's LoRAs train on; re-used while its inputs are unchanged
    weights = weights_on_cluster(cfg, cfg.classify, paths.models, manifest)
    base = generator_base(cfg, paths)  # built once, before any trial reads it
    s = cfg.search
    relevel("optuna")
    folds, confirm_folds = split_folds(cfg, manifest)
    run_key = keys.search_run_key(cfg, base.identity, weights.identity, manifest)
    finished = _finished_record(paths, run_key)
    if finished.exists() and not resume:  # a search that ran to its end: its trials, re-used
        record = _finished_trials(paths, run_key)
    else:
        unfinished = _unfinished(cfg, paths, f"lora_search_{run_key}", resume)
        init_ray(cfg)
        require_resources(cfg, {"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial}, "search: search.cpus_per_trial="
                          f"{s.cpus_per_trial:g}, search.gpus_per_trial={s.gpus_per_trial:g}")
        record = _search_trials(cfg, paths, base, weights, folds, run_key, unfinished)
    results = _results(paths, record["trials"], s.objective)
    write_parquet(results, paths.search / "results.parquet")
    point, summary = _summary(results, cfg)
    summary["lora_images"] = lora_images(cfg, point, manifest, base, folds)
    summary["failed"] = record["failed"]  # the trials not ranked, by their errors
    if s.confirm:
        summary["confirm"] = _confirmed(cfg, paths, base, weights, point, confirm_folds)
    atomic_write_text(paths.search / "best.json", json.dumps(summary, indent=2, default=str))
    note(f"search: {write_best_yaml(cfg, paths, point, summary)} runs the winning settings: ooc-ray run <that file>")
    return results
