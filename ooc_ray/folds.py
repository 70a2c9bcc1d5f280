"""Cross-validation folds, and the one train/held-out split of a fold that every stage uses.

Stratified k-fold, or stratified *group* k-fold so that all images of one group (cell line, well, patient,
tiles of one site) land in the same fold and never straddle train and test. Repeated (folds.repeats = R):
R independent k-fold partitions, each with its own shuffle seed. A fold id carries its repeat: fold id
r x k + f is fold f of repeat r, so repeat 0's ids are 0..k-1 exactly as without repeats, and everything keyed
by a fold id (LoRAs, pools, trials) is per (repeat, fold) with no other change. The manifest holds one fold
column per repeat (keys.fold_columns).

A real fraction (classify.real_fraction < 1) keeps part of each training fold, per class, in a fixed order per
(fold, class) hashed from the image ids: the first round(f x n) of that order, so a smaller fraction's images are
always inside a larger one's; the held-out fold stays whole. The LoRAs, pools, quality and trials of that fraction
learn from those images only.
"""
from __future__ import annotations

import hashlib
import math
import warnings

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ooc_ray.config import FoldsConfig
from ooc_ray.errors import DataError
from ooc_ray.keys import fold_columns

ALL_FOLDS = -1  # the "fold" of artifacts trained on every image (generator.split: all): nothing is held out
# Repeat r > 0 shuffles with folds.seed + REPEAT_SEED_STEP x r: far from the seeds people pick by hand.
REPEAT_SEED_STEP = 1000
# A repeat whose partition equals an earlier repeat's is drawn again with seed + 1, + 2, ... (group k-fold with few
# groups: 6 groups in 5 folds gave 2 distinct partitions of 4 repeats); after this many draws it is refused.
REDRAWS = 50


def n_folds(manifest: pd.DataFrame) -> int:
    """k: folds per repeat."""
    return int(manifest["fold"].max()) + 1


def _split(manifest: pd.DataFrame, fold: int) -> tuple[str, int]:
    """(fold column, fold within its repeat) of a fold id."""
    repeat, within = divmod(fold, n_folds(manifest))
    column = "fold" if repeat == 0 else f"fold_r{repeat}"
    if column not in manifest.columns:
        raise DataError(f"fold {fold}: repeat {repeat} is not in this manifest (folds {fold_ids(manifest)})")
    return column, within


def round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(0.25 * 658) = 164); the paper's "x% more" reads as half-up.
    # The 1e-9 absorbs float error such as 0.1 * 30 = 3.0000000000000004 -> 3, 0.15 * 10 = 1.4999999999999998.
    return int(math.floor(x + 0.5 + 1e-9))


def fraction_order(fold: int, image_id: str) -> str:
    """An image's place in the real-fraction order of `fold`: a hash, so no scan order or class size moves it."""
    return hashlib.sha256(f"real_fraction|{fold}|{image_id}".encode()).hexdigest()


def _fraction_of(rows: pd.DataFrame, fold: int, fraction: float) -> pd.DataFrame:
    """The first round(fraction x n) images of each class in the fold's order; DataError naming every class
    that would keep none."""
    kept, empty = [], []
    for label, group in rows.groupby("label", sort=True):
        n = round_half_up(fraction * len(group))
        if n < 1:
            empty.append(f"{label!r} ({len(group)} images)")
        order = group["id"].map(lambda image_id: fraction_order(fold, image_id)).sort_values(kind="stable")
        kept.append(group.loc[order.index[:n]])
    if empty:
        where = "the data set" if fold == ALL_FOLDS else f"fold {fold}'s training images"
        raise DataError(f"classify.real_fraction {fraction:g} keeps no image of class {', '.join(empty)} of {where}")
    return pd.concat(kept)


def train_rows(manifest: pd.DataFrame, fold: int, fraction: float = 1.0) -> pd.DataFrame:
    """Images a model of `fold` may learn from: all but the held-out fold (all of them for ALL_FOLDS), or their
    nested `fraction` per class (classify.real_fraction); sorted by id so that everything drawn from them is
    independent of scan order."""
    if fold == ALL_FOLDS:
        rows = manifest
    else:
        column, within = _split(manifest, fold)
        rows = manifest[manifest[column] != within]
    if fraction < 1:
        rows = _fraction_of(rows, fold, fraction)
    return rows.sort_values("id", kind="stable")


def held_out_rows(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The held-out images of `fold`, sorted by id."""
    column, within = _split(manifest, fold)
    return manifest[manifest[column] == within].sort_values("id", kind="stable")


def fold_ids(manifest: pd.DataFrame) -> list[int]:
    """Every fold id of every repeat: r x k + f."""
    k = n_folds(manifest)
    return [r * k + int(f) for r, column in enumerate(fold_columns(manifest)) for f in sorted(manifest[column].unique())]


def uses_groups(manifest: pd.DataFrame, cfg: FoldsConfig) -> bool:
    has_groups = bool((manifest["group"] != "").all())
    if cfg.strategy == "group" and not has_groups:
        raise DataError("folds.strategy 'group' needs a group column (data.group_column with a CSV source)")
    return cfg.strategy == "group" or (cfg.strategy == "auto" and has_groups)


def _check_class_sizes(manifest: pd.DataFrame, k: int) -> None:
    counts = manifest["label"].value_counts()
    too_small = counts[counts < k]
    if len(too_small):
        named = ", ".join(f"'{label}' has {int(n)}" for label, n in too_small.items())
        raise DataError(f"classes with fewer images than folds.k={k} (every held-out fold needs each class): {named}")


def assign_folds(manifest: pd.DataFrame, cfg: FoldsConfig) -> pd.DataFrame:
    """(id, fold[, fold_r1, ...]): per repeat, the fold (0..k-1) in which the image is held out. Every repeat is a
    partition no earlier repeat has: the corrected t-test counts J = repeats x k distinct folds, and a repeated
    partition would count its folds twice (a CI ~38 % too narrow with 4 repeats of one partition)."""
    _refuse_repeats_that_cannot_differ(manifest, cfg)
    out = pd.DataFrame({"id": manifest["id"].to_numpy()})
    seen: set[frozenset] = set()
    for repeat in range(cfg.repeats):
        column = "fold" if repeat == 0 else f"fold_r{repeat}"
        seed = cfg.seed + REPEAT_SEED_STEP * repeat
        for draw in range(REDRAWS + 1):
            fold = _assign_once(manifest, cfg, seed + draw)
            partition = frozenset(frozenset(out["id"][fold == f]) for f in range(cfg.k))
            if partition not in seen:
                break
        else:
            raise DataError(f"folds.repeats={cfg.repeats}: repeat {repeat} found no partition other than the "
                            f"{len(seen)} before it in {REDRAWS + 1} draws ({_groups_text(manifest)} in "
                            f"folds.k={cfg.k} folds); use fewer repeats, fewer folds or more groups")
        seen.add(partition)
        out[column] = fold
    return out


def _groups_text(manifest: pd.DataFrame) -> str:
    groups = sorted(manifest["group"].unique())
    return f"{len(groups)} groups ({', '.join(groups[:8])}{', ...' if len(groups) > 8 else ''})"


def _refuse_repeats_that_cannot_differ(manifest: pd.DataFrame, cfg: FoldsConfig) -> None:
    """k groups in k folds: one group per fold is the only partition there is, whatever the seed."""
    if cfg.repeats > 1 and uses_groups(manifest, cfg) and manifest["group"].nunique() == cfg.k:
        raise DataError(f"folds.repeats={cfg.repeats}: {_groups_text(manifest)} in folds.k={cfg.k} folds can be "
                        "split only one way (one group per fold), so every repeat would be the same partition; "
                        "use folds.repeats: 1, or fewer folds than groups")


def held_out_signatures(manifest: pd.DataFrame) -> dict[int, str]:
    """fold id -> a digest of the images it holds out. Two fold ids with one signature are the same fold (a
    repeat that drew an earlier repeat's partition, in folds.parquet written before that was refused)."""
    k, out = n_folds(manifest), {}
    for repeat, column in enumerate(fold_columns(manifest)):
        for within, ids in manifest.groupby(column, sort=True)["id"]:
            out[repeat * k + int(within)] = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return out


def _assign_once(manifest: pd.DataFrame, cfg: FoldsConfig, seed: int) -> pd.Series:
    """One k-fold partition: each image's held-out fold."""
    _check_class_sizes(manifest, cfg.k)
    y = manifest["label_index"].to_numpy()
    # Sort by id first: the split then depends only on the ids, labels, groups and the seed, not on scan order.
    order = manifest["id"].argsort().to_numpy()
    fold = pd.Series(-1, index=manifest.index)
    grouped = uses_groups(manifest, cfg)
    if grouped:
        groups = manifest["group"].to_numpy()
        if len(set(groups)) < cfg.k:
            raise DataError(f"group-aware folds need at least folds.k={cfg.k} groups, found {len(set(groups))}")
        splitter = StratifiedGroupKFold(n_splits=cfg.k, shuffle=True, random_state=seed)
        splits = splitter.split(order, y[order], groups[order])
    else:
        splits = StratifiedKFold(n_splits=cfg.k, shuffle=True, random_state=seed).split(order, y[order])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # class-size warnings: checked above with a clear error
        for k, (_, test) in enumerate(splits):
            fold.iloc[order[test]] = k
    if grouped:
        # StratifiedGroupKFold can leave a class out of a fold when groups are few and lopsided.
        for k in range(cfg.k):
            for label in sorted(manifest["label"].unique()):
                if not ((fold == k) & (manifest["label"] == label)).any():
                    raise DataError(f"group-aware folds: fold {k} has no '{label}' images; use fewer folds or "
                                    "more groups")
    return fold.to_numpy().astype(int)
