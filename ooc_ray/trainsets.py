"""Each trial's exact training and held-out sets, and the planned grid (ooc_ray.protocol's arithmetic applied to the
manifest and the synthetic table): what a trial reads is what its key holds.

ratio r: the real training fold plus round(r x n_train) synthetic images, split over classes in the training
fold's class proportions (largest-remainder rounding, so the per-class counts sum exactly), drawn without
replacement from that fold's pool of that LoRA weight. "synthetic only": n_train synthetic images in the same
proportions and no real ones. The held-out fold is always real images only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.classic import augmented_identity, augmented_path
from ooc_ray.config import ClassifyConfig, ExperimentConfig
from ooc_ray.data import class_names
from ooc_ray.errors import MissingInputError, TrainsetError
from ooc_ray.folds import ALL_FOLDS, fold_ids, held_out_rows, train_rows
from ooc_ray.io import parquet_problem, read_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.protocol import (PlannedTrial, TrialSpec, check_ratios, grid_points, largest_remainder, synthetic_count,
                              trial_config)
from ooc_ray.variants import Variant, each_variant

TRAINSET_COLUMNS = ["id", "path", "sha256", "label", "label_index", "source"]


class PoolIndex:
    """Row positions of a synthetic table per (fold, LoRA weight), found on first use, so that a grid does not
    scan the whole table once per trial: the table and the trials both grow with the LoRA weights, and the scans
    made plan_trials quadratic (200 weights, 6,005 trials over 660,600 rows: 40 s of scans, 5 s with the index;
    benchmarks/bench_scale.py)."""

    def __init__(self, synthetic: pd.DataFrame):
        self.synthetic = synthetic
        self._by_fold: dict | None = None

    def _build(self) -> dict:
        by = [self.synthetic["fold"].to_numpy(), self.synthetic["weight"].astype(float).to_numpy()]
        groups = self.synthetic.groupby(by, sort=False).indices  # positions per (fold, weight); NaN dropped
        by_fold: dict = {}
        for (fold, weight), positions in groups.items():
            by_fold.setdefault(fold, ([], []))
            by_fold[fold][0].append(weight)
            by_fold[fold][1].append(positions)
        return {fold: (np.array(ws, dtype=float), parts) for fold, (ws, parts) in by_fold.items()}

    def rows(self, fold: int, weight: float) -> pd.DataFrame:
        """synthetic[(fold == `fold`) & isclose(weight, `weight`)]: the same rows, order and index."""
        if self._by_fold is None:
            self._by_fold = self._build()
        weights, parts = self._by_fold.get(fold, (np.zeros(0), []))
        hits = [parts[i] for i in np.flatnonzero(np.isclose(weights, float(weight)))]
        positions = np.sort(np.concatenate(hits)) if hits else np.zeros(0, dtype=np.int64)
        return self.synthetic.iloc[positions]


def synthetic_pool(synthetic: pd.DataFrame, fold: int, weight: float, classes: list[str], split: str,
                   index: PoolIndex | None = None) -> pd.DataFrame:
    """Rows of the synthetic table that fold `fold`'s trials may draw from at `weight`, with label_index.

    split "fold": the pool of fold `fold`'s LoRAs (they never saw the held-out images); "all": the one pool of
    the LoRAs trained on every image (fold ALL_FOLDS, the paper's protocol). `index`: a PoolIndex of
    `synthetic`, kept across calls (plan_trials)."""
    missing = [c for c in ("id", "path", "sha256", "label", "fold", "weight") if c not in synthetic.columns]
    if missing:
        raise TrainsetError(f"synthetic table lacks column(s) {missing}; found {list(synthetic.columns)}")
    wanted = ALL_FOLDS if split == "all" else fold
    index = index if index is not None and index.synthetic is synthetic else PoolIndex(synthetic)
    rows = index.rows(wanted, weight)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise TrainsetError(f"synthetic table: label(s) {unknown} are not classes of the manifest {classes}")
    class_index = {c: i for i, c in enumerate(classes)}
    return rows.assign(label_index=rows["label"].map(class_index).astype(int))


def _draw(pool: pd.DataFrame, label_index: int, take: int, spec: TrialSpec, label: str, seed: int) -> pd.DataFrame:
    candidates = pool[pool["label_index"] == label_index].sort_values("id", kind="stable")
    if len(candidates) < take:
        raise TrainsetError(
            f"fold {spec.fold}, class '{label}', LoRA weight {spec.weight:g}: need {take} synthetic images, "
            f"the pool has {len(candidates)} (sample more images per class, or lower classify.ratios)")
    # One fixed permutation per (seed, fold, class), cut at `take`: the images of ratio 0.1 are a subset of
    # those of 0.25, and so on, so arms differ only by the added images (less noise in paired comparisons).
    order = np.random.default_rng([seed, spec.fold, label_index]).permutation(len(candidates))
    return candidates.iloc[order[:take]]


CONTROL_STREAM = 7  # seeds the controls' draws apart from the synthetic draws of the same (seed, fold, class)
AUGMENTED_MARK = "~aug"  # id of copy c of real image i: f"{i}~aug{c}"


def augmented_source(image_id: str) -> tuple[str, int]:
    """(the real image's id, the copy number) of a real_augmented row's id."""
    source, copy = image_id.rsplit(AUGMENTED_MARK, 1)
    return source, int(copy)


def control_rows(real: pd.DataFrame, spec: TrialSpec, n_extra: int, n_classes: int, seed: int,
                 augmented_dir: Path | None) -> pd.DataFrame:
    """The `n_extra` rows a control adds to the real training set, split over classes as synthetic images
    would be. Per class, real images in one seeded order, cycled: copy c of an image is its (c + 1)-th use.
    real_steps: the real rows again (more steps on the same images); real_augmented: classic augmentations
    (ooc_ray.classic), each with its identity as its digest, under `augmented_dir`."""
    if spec.control == "real_augmented" and augmented_dir is None:
        raise TrainsetError(f"fold {spec.fold}: the real_augmented control needs a folder for its images")
    per_class = largest_remainder(n_extra, np.bincount(real["label_index"], minlength=n_classes))
    parts = []
    for c, take in enumerate(per_class):
        candidates = real[real["label_index"] == c]  # sorted by id (train_rows)
        if not take:
            continue
        order = np.random.default_rng([seed, spec.fold, c, CONTROL_STREAM]).permutation(len(candidates))
        uses = np.arange(int(take))
        rows = candidates.iloc[order[uses % len(candidates)]]
        if spec.control == "real_steps":
            parts.append(rows.assign(source="real")[TRAINSET_COLUMNS])
            continue
        copies = uses // len(candidates)
        identity = [augmented_identity(sha, copy) for sha, copy in zip(rows["sha256"], copies)]
        parts.append(rows.assign(id=[f"{i}{AUGMENTED_MARK}{c}" for i, c in zip(rows["id"], copies)], sha256=identity,
                                 path=[augmented_path(augmented_dir, i) for i in identity],
                                 source="augmented")[TRAINSET_COLUMNS])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TRAINSET_COLUMNS)


def build_testset(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The held-out fold: real images only, sorted by id (stable predictions file order), with each image's
    `file` (as its source names it) for the predictions table."""
    test = held_out_rows(manifest, fold)
    if test.empty:
        raise TrainsetError(f"fold {fold}: no held-out images (folds present: {fold_ids(manifest)})")
    # reindex: a manifest from before the `file` column still plans (the report); classify refuses it.
    return test.assign(source="real").reindex(columns=TRAINSET_COLUMNS + ["file"]).reset_index(drop=True)


def build_trainset(manifest: pd.DataFrame, synthetic: pd.DataFrame | None, spec: TrialSpec, *, seed: int = 0,
                   split: str = "fold", classes: list[str] | None = None, pools: PoolIndex | None = None,
                   augmented_dir: Path | None = None, fraction: float = 1.0) -> pd.DataFrame:
    """Training rows (TRAINSET_COLUMNS, source "real", "synthetic" or "augmented") of one trial. Deterministic for
    equal inputs; the row order of the inputs does not matter (pools are sorted by id). `pools`: a PoolIndex of
    `synthetic`, for a loop over trials (as plan_trials): without it each call indexes the whole table.
    `augmented_dir`: where the real_augmented control's images live; `fraction`: classify.real_fraction."""
    classes = classes if classes is not None else class_names(manifest)
    real = train_rows(manifest, spec.fold, fraction)
    if real.empty:
        raise TrainsetError(f"fold {spec.fold}: no training images")
    if spec.ratio < 0:
        raise TrainsetError(f"fold {spec.fold}: ratio {spec.ratio} < 0")
    n_synth = synthetic_count(spec, len(real))
    parts = [] if spec.synthetic_only else [real.assign(source="real")[TRAINSET_COLUMNS]]
    if spec.control:
        parts.append(control_rows(real, spec, n_synth, len(classes), seed, augmented_dir))
    elif n_synth > 0:
        if spec.weight is None or math.isnan(spec.weight):
            raise TrainsetError(f"fold {spec.fold}, ratio {spec.ratio:g}: synthetic images need a LoRA weight")
        if synthetic is None or synthetic.empty:
            raise TrainsetError(f"fold {spec.fold}, ratio {spec.ratio:g}, weight {spec.weight:g}: "
                                "the synthetic table is empty")
        pool = synthetic_pool(synthetic, spec.fold, spec.weight, classes, split, index=pools)
        per_class = largest_remainder(n_synth, np.bincount(real["label_index"], minlength=len(classes)))
        for c, take in enumerate(per_class):
            if take:
                drawn = _draw(pool, c, int(take), spec, classes[c], seed)
                parts.append(drawn.assign(source="synthetic")[TRAINSET_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    out["label_index"] = out["label_index"].astype(int)
    return out


def plan_trials(cfg: ExperimentConfig, manifest: pd.DataFrame, synthetic: pd.DataFrame | None,
                weights_id: str, augmented_dir: Path | None = None) -> list[PlannedTrial]:
    """Every trial of the grid with its sets and key. Building every training set here (pandas only) also
    makes a pool that is too small fail before any trial starts, naming the fold, class and weight.
    `augmented_dir`: where the real_augmented control's images are (ExperimentPaths.augmented)."""
    check_ratios(manifest, cfg)
    classes = class_names(manifest)
    pools = PoolIndex(synthetic) if synthetic is not None else None  # indexes on first use only
    planned = []
    for spec in grid_points(cfg, fold_ids(manifest)):
        train = build_trainset(manifest, synthetic if spec.needs_synthetic else None, spec,
                               seed=cfg.classify.seed, split=cfg.generator.split, classes=classes, pools=pools,
                               augmented_dir=augmented_dir, fraction=cfg.classify.real_fraction)
        test = build_testset(manifest, spec.fold)
        wtag = "w-" if spec.weight is None else f"w{spec.weight:g}"
        tcfg = trial_config(cfg, spec)
        digest = keys.trial_key(tcfg, spec.point(), classes, train, test, weights_id)
        key = f"fold{spec.fold}-{spec.as_arm.key_fragment}-{wtag}-{digest}"
        planned.append(PlannedTrial(spec, key, train, test))
    return planned


def usable_synthetic(synthetic: pd.DataFrame, scores: pd.DataFrame | None, min_score: float,
                     measure: str = "real_confidence") -> pd.DataFrame:
    """The synthetic table less the images the quality filter drops (their `measure`, quality.filter_measure,
    below quality.filter_min_confidence); applied here, not read from a stored flag, so a new threshold needs no
    quality re-run. An image without a score (a class with no more than quality.nn_k real images) is an error,
    never silently dropped or kept."""
    if min_score <= 0:
        return synthetic
    if scores is None:
        raise TrainsetError("quality.filter_min_confidence is set but there are no synthetic scores: "
                            "run the quality stage first")
    if measure not in scores.columns:
        raise TrainsetError(f"quality.filter_measure {measure}: the synthetic scores have no such column (scored by "
                            "an older version): run the quality stage again")
    drawn = scores[scores["id"].isin(synthetic["id"])]
    if drawn[measure].isna().any():
        raise TrainsetError(f"quality.filter_measure {measure}: {int(drawn[measure].isna().sum())} synthetic images "
                            "have no score (their class has no more real training images than quality.nn_k); "
                            "lower quality.nn_k or filter on real_confidence")
    keep = set(drawn.loc[drawn[measure] >= min_score, "id"])
    return synthetic[synthetic["id"].isin(keep)].reset_index(drop=True)


def current_synthetic(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """synthetic.parquet, if it was sampled with cfg's settings (keys.sample_settings); else an error naming the
    file and what to run: a table from before a generator or sampling setting changed would be trained on,
    scored and reported under the new settings."""
    synthetic = read_parquet(paths.synthetic_table, "ooc-ray sample")
    if "sample_settings" not in synthetic.columns:
        raise MissingInputError(f"{paths.synthetic_table} was written before its settings were recorded, so whether "
                                "it is this config's cannot be told: run `ooc-ray sample` once (full install; it "
                                "re-uses every image)")
    if (synthetic["sample_settings"] != keys.sample_settings(cfg)).any():
        raise MissingInputError(f"{paths.synthetic_table} was sampled with other generator or sample settings than "
                                "this config's: run `ooc-ray sample` (it re-uses every image that is still current), "
                                "or `ooc-ray run`")
    return synthetic


def draw_table(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | None:
    """The synthetic images the grid's trials may draw from (synthetic.parquet less what the quality filter
    drops), or None when the grid has no synthetic arm."""
    if not any(spec.needs_synthetic for spec in grid_points(cfg, [0])):
        return None
    synthetic = current_synthetic(cfg, paths)
    if cfg.quality.filter_min_confidence <= 0:
        return synthetic
    if parquet_problem(paths.synthetic_scores):
        raise MissingInputError(f"quality.filter_min_confidence is set but {paths.synthetic_scores} is missing: "
                                "run the quality stage first")
    return usable_synthetic(synthetic, pd.read_parquet(paths.synthetic_scores), cfg.quality.filter_min_confidence,
                            cfg.quality.filter_measure)


def plan_grid(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame,
              weights_id: Callable[[ClassifyConfig], str]) -> list[tuple[Variant, list[PlannedTrial]]]:
    """Every variant of the config's axes (config.variants) with its planned trials, each drawing from that
    variant's synthetic table. A trial two variants share (real only across sampling settings) has one key and
    appears in both lists. `weights_id`: the identity of the classifier weights a classify section uses."""
    out = []
    for variant, vpaths in each_variant(cfg, paths):
        table = draw_table(variant.cfg, vpaths)
        out.append((variant, plan_trials(variant.cfg, manifest, table, weights_id(variant.cfg.classify),
                                         paths.augmented)))
    return out
