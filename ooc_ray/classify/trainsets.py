"""Training and test sets of one classifier trial, as pure functions of the tables (DESIGN.md "Exact semantics").

ratio r: the real training fold plus round(r x n_train) synthetic images, split over classes in the training
fold's class proportions (largest-remainder rounding, so the per-class counts sum exactly), drawn without
replacement from that fold's pool of that LoRA weight. "synthetic only": n_train synthetic images in the same
proportions and no real ones. The held-out fold is always real images only.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ooc_ray.data import DataError

COLUMNS = ["id", "path", "label_index", "source"]


class TrainsetError(DataError):
    """A trial's training set cannot be built (pool too small, weight missing); the message names the trial."""


def round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(0.25 * 658) = 164); the paper's "x% more" reads as half-up.
    # The 1e-9 absorbs float error such as 0.1 * 30 = 3.0000000000000004 -> 3, 0.15 * 10 = 1.4999999999999998.
    return int(math.floor(x + 0.5 + 1e-9))


def largest_remainder(total: int, counts) -> np.ndarray:
    """Split `total` over classes proportionally to integer `counts`; the parts sum exactly to `total`.

    Each class gets floor(total * c / n); the leftover units go to the largest remainders (ties: lower
    class index). Integer arithmetic, so no float rounding can move a unit."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total < 0 or n <= 0:
        raise ValueError(f"largest_remainder: need total >= 0 and positive counts, got {total}, {counts.tolist()}")
    base = (total * counts) // n
    remainder = (total * counts) % n
    short = int(total - base.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder first, then class index
    base[order[:short]] += 1
    return base


def real_train(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Real images used for training when `fold` is held out (manifest needs the `fold` column)."""
    if "fold" not in manifest.columns:
        raise TrainsetError("manifest has no `fold` column: load it with ooc_ray.data.load_manifest")
    return manifest[manifest["fold"] != fold].sort_values("id", kind="stable")


def build_testset(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The held-out fold: real images only, sorted by id (stable predictions file order)."""
    if "fold" not in manifest.columns:
        raise TrainsetError("manifest has no `fold` column: load it with ooc_ray.data.load_manifest")
    test = manifest[manifest["fold"] == fold].sort_values("id", kind="stable")
    if test.empty:
        raise TrainsetError(f"fold {fold}: no held-out images (folds present: {sorted(manifest['fold'].unique())})")
    return test.assign(source="real")[COLUMNS].reset_index(drop=True)


def synthetic_pool(synthetic: pd.DataFrame, fold: int, weight: float, classes: list[str],
                   generator_split: str = "fold") -> pd.DataFrame:
    """Rows of the synthetic table from fold `fold`'s LoRA at `weight`, with label_index added.

    generator_split "fold": rows whose fold is str(fold) (the LoRA never saw the held-out images).
    "all": rows with fold "all" (one LoRA on every image, the paper's protocol); if the table has none,
    the per-fold rows are used (still valid: any pool is allowed under the looser protocol)."""
    missing = [c for c in ("id", "path", "label", "fold", "weight") if c not in synthetic.columns]
    if missing:
        raise TrainsetError(f"synthetic table lacks column(s) {missing}; found {list(synthetic.columns)}")
    # The sample stage writes int folds with -1 (finetune.ALL_FOLDS) for split "all"; accept "all" too.
    folds = synthetic["fold"].astype(str).replace({"-1": "all"})
    wanted = "all" if generator_split == "all" and (folds == "all").any() else str(fold)
    rows = synthetic[(folds == wanted) & np.isclose(synthetic["weight"].astype(float), float(weight))]
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise TrainsetError(f"synthetic table: label(s) {unknown} are not classes of the manifest {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return rows.assign(label_index=rows["label"].map(index).astype(int))


def _draw(pool: pd.DataFrame, label_index: int, take: int, *, fold: int, weight: float, label: str,
          seed: int) -> pd.DataFrame:
    candidates = pool[pool["label_index"] == label_index].sort_values("id", kind="stable")
    if len(candidates) < take:
        raise TrainsetError(
            f"fold {fold}, class '{label}', LoRA weight {weight:g}: need {take} synthetic images, "
            f"the pool has {len(candidates)} (sample more images per class, or lower classify.ratios)"
        )
    # One fixed permutation per (seed, fold, class), cut at `take`: the images of ratio 0.1 are a subset of
    # those of 0.25, and so on, so arms differ only by the added images (less noise in paired comparisons).
    order = np.random.default_rng([seed, fold, label_index]).permutation(len(candidates))
    return candidates.iloc[order[:take]]


def build_trainset(manifest: pd.DataFrame, synthetic: pd.DataFrame | None, fold: int, ratio: float,
                   weight: float | None, synthetic_only: bool = False, seed: int = 0,
                   generator_split: str = "fold", classes: list[str] | None = None) -> pd.DataFrame:
    """Training rows (id, path, label_index, source in {"real", "synthetic"}) of one trial.

    Deterministic for equal inputs (row order of the inputs does not matter: pools are sorted by id)."""
    from ooc_ray.data import class_names

    classes = classes if classes is not None else class_names(manifest)
    real = real_train(manifest, fold)
    n_train = len(real)
    if n_train == 0:
        raise TrainsetError(f"fold {fold}: no training images")
    if ratio < 0:
        raise TrainsetError(f"fold {fold}: ratio {ratio} < 0")
    n_synth = n_train if synthetic_only else round_half_up(ratio * n_train)
    parts = [] if synthetic_only else [real.assign(source="real")[COLUMNS]]
    if n_synth > 0:
        if weight is None or (isinstance(weight, float) and math.isnan(weight)):
            raise TrainsetError(f"fold {fold}, ratio {ratio:g}: synthetic images need a LoRA weight, got {weight}")
        if synthetic is None or synthetic.empty:
            raise TrainsetError(f"fold {fold}, ratio {ratio:g}, weight {weight:g}: the synthetic table is empty")
        pool = synthetic_pool(synthetic, fold, weight, classes, generator_split)
        per_class = largest_remainder(n_synth, np.bincount(real["label_index"], minlength=len(classes)))
        for c, take in enumerate(per_class):
            if take:
                drawn = _draw(pool, c, int(take), fold=fold, weight=weight, label=classes[c], seed=seed)
                parts.append(drawn.assign(source="synthetic")[COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    out["label_index"] = out["label_index"].astype(int)
    return out
