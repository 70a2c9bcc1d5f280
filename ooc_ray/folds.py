"""Cross-validation folds: stratified k-fold, or stratified *group* k-fold so that all images of one
group (cell line, well, patient, tiles of one site) land in the same fold and never straddle train/test."""
from __future__ import annotations

import warnings

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ooc_ray.config import FoldsConfig
from ooc_ray.data import DataError


def uses_groups(manifest: pd.DataFrame, cfg: FoldsConfig) -> bool:
    has_groups = bool((manifest["group"] != "").all())
    if cfg.strategy == "group" and not has_groups:
        raise DataError("folds.strategy 'group' needs a group column (data.group_column with a CSV source)")
    return cfg.strategy == "group" or (cfg.strategy == "auto" and has_groups)


def assign_folds(manifest: pd.DataFrame, cfg: FoldsConfig) -> pd.DataFrame:
    """Return (id, fold) where `fold` is the fold in which the image is held out."""
    counts = manifest["label"].value_counts()
    too_small = counts[counts < cfg.k]
    if len(too_small):
        raise DataError(
            f"class '{too_small.index[0]}' has {int(too_small.iloc[0])} images, fewer than folds.k={cfg.k}: "
            "every held-out fold needs each class"
        )
    y = manifest["label_index"].to_numpy()
    # Sort by id first: the split then depends only on the data's content and the seed, not on scan order.
    order = manifest["id"].argsort().to_numpy()
    fold = pd.Series(-1, index=manifest.index)
    grouped = uses_groups(manifest, cfg)
    if grouped:
        groups = manifest["group"].to_numpy()
        n_groups = len(set(groups))
        if n_groups < cfg.k:
            raise DataError(f"group-aware folds need at least folds.k={cfg.k} groups, found {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=cfg.k, shuffle=True, random_state=cfg.seed)
        splits = splitter.split(order, y[order], groups[order])
    else:
        splitter = StratifiedKFold(n_splits=cfg.k, shuffle=True, random_state=cfg.seed)
        splits = splitter.split(order, y[order])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # class-size warnings: checked above with a clear error
        for k, (_, test) in enumerate(splits):
            fold.iloc[order[test]] = k
    if grouped:
        # StratifiedGroupKFold can leave a class out of a fold when groups are few and lopsided.
        missing = [
            (k, c) for k in range(cfg.k) for c in counts.index
            if not ((fold == k) & (manifest["label"] == c)).any()
        ]
        if missing:
            k, c = missing[0]
            raise DataError(f"group-aware folds: fold {k} has no '{c}' images; use fewer folds or more groups")
    return pd.DataFrame({"id": manifest["id"].to_numpy(), "fold": fold.to_numpy().astype(int)})


def train_rows(manifest_with_folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    return manifest_with_folds[manifest_with_folds["fold"] != fold]


def test_rows(manifest_with_folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    return manifest_with_folds[manifest_with_folds["fold"] == fold]
