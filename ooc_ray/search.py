"""LoRA hyperparameter search: Ray Tune + Optuna over rank, alpha, UNet/TE learning rates, epochs, repeats and
the sampling LoRA weight. One trial = fine-tune one LoRA per class on a small subset of one fold's training
images, sample `search.images_per_class` images per class, and score them on frozen-backbone features against
that fold's real held-out images. Objectives (search.objective):
  cas       accuracy on real held-out images of a linear classifier trained on the synthetic images only (max)
  kid       mean per-class KID between synthetic and real training images (min)
  accuracy  held-out accuracy of a linear classifier on real subset + synthetic images (max)
The linear probe on cached features stands in for the full EfficientNet grid: it costs seconds, not hours, so
the search can afford many trials; confirm the winner with the full grid (experiments/<name>.yaml).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ooc_ray.config import ConfigError, ExperimentConfig, slice_key, to_dict
from ooc_ray.io import atomic_path, read_parquet, write_parquet
from ooc_ray.paths import ExperimentPaths

OBJECTIVE_MODE = {"cas": "max", "kid": "min", "accuracy": "max"}


def search_space(cfg: ExperimentConfig) -> dict:
    from ray import tune

    s = cfg.search
    return {
        "rank": tune.choice(list(s.rank)),
        "alpha": tune.choice(list(s.alpha)),
        "unet_lr": tune.loguniform(*s.unet_lr),
        "text_encoder_lr": tune.loguniform(*s.text_encoder_lr),
        "epochs": tune.randint(s.epochs[0], s.epochs[1] + 1),  # randint's upper bound is exclusive
        "repeats": tune.randint(s.repeats[0], s.repeats[1] + 1),
        "weight": tune.uniform(*s.weight),
    }


def search_subset(manifest: pd.DataFrame, cfg: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(LoRA training subset: up to images_per_class per class from the fold's training images, held-out fold)."""
    s = cfg.search
    folds = sorted(manifest["fold"].unique())
    if s.fold not in folds:
        raise ConfigError(f"search.fold: {s.fold} is not one of the folds {folds}")
    train = manifest[manifest["fold"] != s.fold]
    train = train.sort_values("id")
    subset = pd.concat([rows.sample(min(len(rows), s.images_per_class), random_state=s.seed)
                        for _, rows in train.groupby("label")])
    return subset.sort_values("id"), manifest[manifest["fold"] == s.fold]


def trial_generator(cfg: ExperimentConfig, params: dict):
    return dataclasses.replace(
        cfg.generator, rank=int(params["rank"]), alpha=float(params["alpha"]), unet_lr=float(params["unet_lr"]),
        text_encoder_lr=float(params["text_encoder_lr"]), epochs=int(params["epochs"]),
        repeats=int(params["repeats"]),
    )


def _sample_plan(loras: list[dict], cfg: ExperimentConfig, weight: float, n: int, out: Path) -> pd.DataFrame:
    from ooc_ray.sample import image_seed

    s = cfg.sample
    rows = []
    for lora in loras:
        for i in range(n):
            rows.append({
                "id": f"{lora['lora_key']}-{i:04d}", "path": str(out / lora["lora_key"] / f"{i:04d}.png"),
                "label": lora["label"], "lora_key": lora["lora_key"], "lora_dir": lora["dir"],
                "lora_file": lora["file"], "weight": weight, "index": i, "prompt": lora["prompt"],
                "negative_prompt": s.negative_prompt, "seed": image_seed(s.seed, lora["lora_key"], weight, i),
                "steps": s.steps, "cfg": s.cfg, "strength": 1.0, "init_path": "",
                "width": s.output_size or s.resolution, "height": s.output_size or s.resolution,
            })
    return pd.DataFrame(rows)


def score(objective: str, subset: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame,
          features: dict, classes: list[str]) -> dict:
    """All three objectives for one trial's images (the chosen one is reported as `score`)."""
    from ooc_ray.quality import kid, linear_probe

    index = {c: i for i, c in enumerate(classes)}

    def xy(df):
        return np.stack([features[p] for p in df["path"]]), df["label"].map(index).to_numpy()

    x_real, y_real = xy(subset)
    x_test, y_test = xy(test)
    x_syn, y_syn = xy(synthetic)
    n = len(classes)
    cas = float((linear_probe(x_syn, y_syn, n)(x_test).argmax(1) == y_test).mean())
    mixed = linear_probe(np.vstack([x_real, x_syn]), np.concatenate([y_real, y_syn]), n)
    accuracy = float((mixed(x_test).argmax(1) == y_test).mean())
    kids = [kid(x_real[y_real == c], x_syn[y_syn == c], subsets=5, subset_size=50, seed=c)[0] for c in range(n)]
    out = {"cas": cas, "kid": float(np.nanmean(kids)), "accuracy": accuracy}
    out["score"] = out[objective]
    return out


def run_search_trial(params: dict, cfg: ExperimentConfig, root: str, base_path: str) -> dict:
    """One search trial (also callable without Ray); writes search/trials/<key>.parquet and returns its row."""
    from ooc_ray.data import class_names, load_manifest
    from ooc_ray.finetune import ALL_FOLDS, LoraJob, train_job
    from ooc_ray.quality import embed
    from ooc_ray.sample import SampleWorker, _pending_batches

    start = time.perf_counter()
    paths = ExperimentPaths(Path(root))
    gcfg = trial_generator(cfg, params)
    weight = float(params["weight"])
    key = slice_key(to_dict(gcfg), weight, cfg.search.fold, cfg.search.images_per_class, cfg.search.seed)
    result_file = paths.search / "trials" / f"{key}.parquet"
    if result_file.exists():  # the same point was already scored (Optuna may propose it again)
        return read_parquet(result_file).iloc[0].to_dict()
    manifest = load_manifest(paths)
    classes = class_names(manifest)
    subset, test = search_subset(manifest, cfg)
    work = paths.search / "work" / key
    loras = []
    for label in classes:
        rows = subset[subset["label"] == label]
        prompt = gcfg.prompt.format(label=label, group="")
        job = LoraJob(f"{label}_{key}", ALL_FOLDS, label, "", prompt, tuple(rows["id"]), tuple(rows["path"]))
        meta = train_job(job, gcfg, base_path, work / "lora")
        loras.append({"lora_key": job.key, "label": label, "prompt": prompt, "dir": str(work / "lora" / job.key),
                      "file": meta["file"], "final_loss": meta.get("final_loss")})
    plan = _sample_plan(loras, cfg, weight, cfg.search.images_per_class, work / "images")
    worker = SampleWorker(base_path, "txt2img", cfg.sample.sampler, cfg.sample.resolution)
    for batch in _pending_batches(plan, cfg.sample.batch_size):
        worker(batch)
    features = embed(subset["path"].tolist() + test["path"].tolist() + plan["path"].tolist(), cfg, paths.features)
    metrics = score(cfg.search.objective, subset, test, plan, features, classes)
    row = {"search_key": key, **{k: params[k] for k in sorted(params)}, **metrics,
           "objective": cfg.search.objective, "fold": cfg.search.fold,
           "final_loss_mean": float(np.mean([lora["final_loss"] for lora in loras])),
           "n_lora_images_per_class": cfg.search.images_per_class, "duration_s": time.perf_counter() - start}
    write_parquet(pd.DataFrame([row]), result_file)
    return row


def _tune_trainable(params: dict, cfg: ExperimentConfig, root: str, base_path: str) -> None:
    from ray import tune

    row = run_search_trial(params, cfg, root, base_path)
    tune.report({k: row[k] for k in ("score", "cas", "kid", "accuracy")})


def run_search(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Run (or resume) the Optuna search; writes search/results.parquet sorted best first and best.json."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from ooc_ray.raycluster import init_ray
    from ooc_ray.tiny_sd import resolve_base

    from ooc_ray.classify.grid import tune_storage
    from ooc_ray.classify.model import with_backbone_weights
    from ooc_ray.data import run_data

    cfg = with_backbone_weights(cfg, paths, run_data(cfg, paths))  # run_data skips an unchanged source
    base_path = resolve_base(cfg.generator.base, paths.models)  # built once, before any trial reads it
    init_ray(cfg)
    mode = OBJECTIVE_MODE[cfg.search.objective]
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trainable, cfg=cfg, root=str(paths.root), base_path=base_path),
        {"cpu": max(1.0, cfg.classify.cpus_per_trial), "gpu": cfg.generator.gpus},
    )
    storage = tune_storage(cfg, paths)  # s3://... stays a URI; local paths become absolute
    run_name = f"lora_search_{slice_key(cfg.search, cfg.generator, cfg.sample)}"
    if tune.Tuner.can_restore(f"{storage}/{run_name}"):
        tuner = tune.Tuner.restore(f"{storage}/{run_name}", trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(seed=cfg.search.seed), metric="score", mode=mode,
                num_samples=cfg.search.num_samples,
                max_concurrent_trials=cfg.classify.max_concurrent or None,
            ),
            run_config=tune.RunConfig(name=run_name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    tuner.fit()
    results = pd.concat([pd.read_parquet(f) for f in sorted((paths.search / "trials").glob("*.parquet"))],
                        ignore_index=True)
    results = results.sort_values("score", ascending=mode == "min", ignore_index=True)
    write_parquet(results, paths.search / "results.parquet")
    best = results.iloc[0].to_dict()
    with atomic_path(paths.search / "best.json") as tmp:
        tmp.write_text(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()}, indent=2))
    print(f"[ooc-ray] search: best {cfg.search.objective} = {best['score']:.4f} with "
          f"rank={best['rank']} alpha={best['alpha']} unet_lr={best['unet_lr']:.2e} "
          f"te_lr={best['text_encoder_lr']:.2e} epochs={best['epochs']} repeats={best['repeats']} "
          f"weight={best['weight']:.2f}")
    return results
