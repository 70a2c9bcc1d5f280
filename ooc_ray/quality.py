"""Quality stage: synthetic quality per class (ooc_ray.measures: KID, CAS, memorisation, what the LoRA changes),
on frozen-backbone features or weight-free image statistics (quality.features; no Inception download needed),
one quality table per variant of the axes.

- What the LoRA changes, per class: KID between a pool and the LoRA-weight-0.0 pool of its fold (the base
  alone), and over all folds pooled, MMD^2 between the two with a permutation p-value.
- Optional filter: every synthetic image gets per-image scores (quality.filter_measure: a linear classifier's
  confidence in its class, trained on the fold's real training images; whether it lies inside the class's real
  k-NN balls; how many hold it); with quality.filter_min_confidence > 0, images scoring less are dropped from the
  pools the classify stage draws from (synthetic_scores.parquet column `keep`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ooc_ray import image_statistics, keys
from ooc_ray.backbones import BackboneWeights
from ooc_ray.checks import raise_problems, random_features_problem
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import class_names, load_manifest
from ooc_ray.feature_cache import cache_dir, clean_view, embed, weights_on_cluster
from ooc_ray.folds import ALL_FOLDS, fold_ids, held_out_rows, train_rows
from ooc_ray.io import parquet_problem, write_parquet
from ooc_ray.logs import note
from ooc_ray.measures import class_quality, kid_to_control, lora_effect
from ooc_ray.paths import ExperimentPaths
from ooc_ray.trainsets import current_synthetic
from ooc_ray.variants import each_variant, per_variant, variants

TABLE_VERSION = 3  # part of the key: bump when a measure or column changes, so older tables are not re-used


def pools(manifest: pd.DataFrame, synthetic: pd.DataFrame, split: str, fraction: float = 1.0):
    """(fold, weight, real train, real test, synthetic pool) for every pool the classify stage draws from; the real
    training images are the trials' own (classify.real_fraction)."""
    for fold in fold_ids(manifest):
        for weight in sorted(synthetic["weight"].unique(), reverse=True):
            pool_fold = ALL_FOLDS if split == "all" else fold
            pool = synthetic[(synthetic["fold"] == pool_fold) & (synthetic["weight"] == weight)]
            yield fold, float(weight), train_rows(manifest, fold, fraction), held_out_rows(manifest, fold), pool


def features_identity(cfg: ExperimentConfig, weights: BackboneWeights, paths: ExperimentPaths,
                      manifest: pd.DataFrame) -> str:
    """What quality's measures are computed on (quality.features), for the keys of the tables made from them.
    Image statistics are standardised on the manifest's images, so their identity holds the manifest's content
    (a search trial's key names only its own images: another fold's new image would change its scores)."""
    if cfg.quality.features == "image_statistics":
        reference = keys.table_digest(manifest, keys.IMAGE_COLUMNS)
        return f"{image_statistics.identity(cfg.sample.output_size or cfg.sample.resolution)}-{reference}"
    return cache_dir(clean_view(cfg.classify), weights, paths.features).name


def quality_features(cfg: ExperimentConfig, weights: BackboneWeights, images: pd.DataFrame, manifest: pd.DataFrame,
                     paths: ExperimentPaths, use_ray: bool = True) -> dict[str, np.ndarray]:
    """sha256 -> feature vector for `images` (columns path, sha256), as quality.features says."""
    if cfg.quality.features == "image_statistics":
        return image_statistics.image_statistics(images, manifest, cfg.sample.output_size or cfg.sample.resolution)
    return embed(cfg, weights, images, paths.features, use_ray=use_ray)


def _score_pools(cfg: ExperimentConfig, manifest, synthetic, features) -> tuple[pd.DataFrame, pd.DataFrame]:
    classes = class_names(manifest)
    tables, scores, by_pool = [], [], {}
    for fold, weight, train, test, pool in pools(manifest, synthetic, cfg.generator.split,
                                                  cfg.classify.real_fraction):
        table, score = class_quality(train, test, pool, features, classes, cfg.quality)
        tables.append(table.assign(fold=fold, weight=weight))
        scores.append(score.assign(fold=fold, weight=weight))
        by_pool[fold, weight] = pool
    for table in tables:
        control = by_pool.get((table["fold"].iloc[0], 0.0))
        table["kid_to_weight0"] = (np.nan if control is None or table["weight"].iloc[0] == 0.0 else
                                   kid_to_control(by_pool[table["fold"].iloc[0], table["weight"].iloc[0]], control,
                                                  features, classes, cfg.quality))
    quality = pd.concat(tables, ignore_index=True)
    quality = quality.merge(lora_effect(by_pool, features, classes), on=["weight", "label"], how="left")
    front = ["fold", "weight", "label"]
    quality = quality[front + [col for col in quality.columns if col not in front]]
    # With split "all" one pool serves every fold: keep each image's strictest scores over the folds (the least
    # confident, outside any fold's real balls if one says so, the nearest to a real image, memorised by any).
    strictest = {"nn_distance": "min", "memorised": "max", "real_confidence": "min", "precision": "min",
                 "density": "min", "weight": "first"}
    per_image = pd.concat(scores, ignore_index=True).groupby("id", sort=False).agg(strictest).reset_index()
    per_image["keep"] = per_image[cfg.quality.filter_measure] >= cfg.quality.filter_min_confidence
    return quality, per_image


def _refresh_keep(cfg: ExperimentConfig, paths: ExperimentPaths) -> None:
    """synthetic_scores.parquet's `keep` for the current filter settings (grid fields, outside the tables' key: the
    scores are re-used when only the filter changes, its column must not then say what an earlier filter kept)."""
    scores = pd.read_parquet(paths.synthetic_scores)
    keep = scores[cfg.quality.filter_measure] >= cfg.quality.filter_min_confidence
    if not keep.equals(scores["keep"]):
        write_parquet(scores.assign(keep=keep), paths.synthetic_scores)


def quality_tables(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame) -> pd.DataFrame:
    """One variant's quality.parquet (fold, weight, label, KID, CAS, memorisation) and synthetic_scores.parquet
    (per image), re-used while their key (settings, features, images, pools) is unchanged."""
    weights = weights_on_cluster(cfg, cfg.classify, paths.models, manifest)
    synthetic = current_synthetic(cfg, paths)
    key = keys.quality_key(cfg, features_identity(cfg, weights, paths, manifest), manifest, synthetic,
                           TABLE_VERSION)
    problems = [f"{p} ({parquet_problem(p)})" for p in (paths.quality, paths.synthetic_scores) if parquet_problem(p)]
    if not problems:
        done = pd.read_parquet(paths.quality)
        if len(done) and (done["quality_key"] == key).all():
            note("quality: inputs unchanged, re-used")
            _refresh_keep(cfg, paths)
            return done
    elif any("missing" not in p for p in problems):
        note(f"quality: damaged output {', '.join(problems)}: computing it again")
    images = pd.concat([manifest[["path", "sha256"]], synthetic[["path", "sha256"]]], ignore_index=True)
    features = quality_features(cfg, weights, images, manifest, paths)
    quality, per_image = _score_pools(cfg, manifest, synthetic, features)
    quality = quality.assign(quality_key=key)
    write_parquet(per_image, paths.synthetic_scores)
    write_parquet(quality, paths.quality)  # last: its key marks the pair complete
    return quality


def run_quality(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | list[pd.DataFrame]:
    """The quality table of every variant of the axes; returns it (with axes, the tables in variant order)."""
    # `ooc-ray quality` runs with quality.enabled false too, where the config's own check does not look
    raise_problems(list(dict.fromkeys(p for variant in variants(cfg) for p in random_features_problem(variant.cfg))))
    manifest = load_manifest(paths)
    return per_variant(cfg, [quality_tables(variant.cfg, vpaths, manifest) for variant, vpaths in each_variant(cfg, paths)])
