"""How many real images is a synthetic image worth? From a run with an axis over classify.real_fraction: the real-only
accuracy against the real training set's size is the exchange curve; an arm that adds m synthetic images to n real
ones and reaches accuracy a is worth n* - n real images, where the curve reaches a at n* (Kwark et al. 2025 measure
the same "real-equivalent" value; it depends on n). Pure pandas and numpy, no files.

- The curve: mean over folds of real only's metric at each fraction, against the mean real training images per fold;
  between measured sizes it is linear, and made non-decreasing (a running maximum): an accuracy reached at a smaller
  size counts as reached at every larger one.
- Worth: x = (n* - n) / m real images per synthetic image (negative: the synthetic images cost accuracy). Not
  estimable where a lies beyond the curve: above its highest point (more real images than measured would be
  needed) or below its lowest (fewer than the smallest fraction).
- Uncertainty: the folds resampled with replacement (paired: the same folds for the curve and the arm), x
  recomputed, its 2.5th and 97.5th percentiles; no interval when more than 10 % of resamples are not estimable,
  or with fewer than 3 paired folds.
  With k folds the resampling has k^k outcomes at most: read a 5-fold interval as rough (it held a known worth in
  84 of 100 simulated 5-fold runs).
- Per size, each arm's mean with the corrected resampled t interval (Nadeau and Bengio) for the curve plot.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ooc_ray.comparisons import METRIC_COLUMNS, corrected_t
from ooc_ray.protocol import with_arms

FRACTION = "classify.real_fraction"
BOOTSTRAP = 2000
MIN_ESTIMABLE = 0.9  # share of resamples that must give a value for an interval
MIN_FOLDS = 3  # folds resampled with replacement: 1 fold gives one resample (CI 0.54 to 0.54), 2 give 3, 3 give 10


def real_equivalent(sizes, accuracies, target: float) -> float:
    """n* where the non-decreasing, piecewise-linear curve (sizes, accuracies) first reaches `target`; NaN beyond
    its lowest or highest point."""
    order = np.argsort(sizes)
    n = np.asarray(sizes, float)[order]
    a = np.maximum.accumulate(np.asarray(accuracies, float)[order])
    if not a[0] <= target <= a[-1]:
        return math.nan
    i = int(np.searchsorted(a, target, side="left"))  # first point at or above the target
    if i == 0 or a[i] == target:
        return float(n[i])
    return float(n[i - 1] + (target - a[i - 1]) * (n[i] - n[i - 1]) / (a[i] - a[i - 1]))


def worth(curve_n: np.ndarray, curve_value: np.ndarray, n: float, m: float, value: float) -> float:
    """Real images per synthetic image: an arm of n real and m synthetic images reaching `value`, on the curve."""
    return (real_equivalent(curve_n, curve_value, value) - n) / m


def _statement(x: float, low: float, high: float, reason: str, n_folds: int) -> str:
    if reason:
        return f"not estimable ({reason})"
    if n_folds < MIN_FOLDS:
        interval = f" (no interval: {n_folds} paired fold{'s' * (n_folds != 1)}, too few to resample)"
    elif math.isnan(low):
        interval = f" (no interval: more than {1 - MIN_ESTIMABLE:.0%} of resamples off the curve)"
    else:
        interval = f" (95 % CI {low:.2f} to {high:.2f})"
    return f"1 synthetic image = {x:.2f} real images{interval}"


def _rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trial rows with their Arm, mixing and the tested metric as `value`."""
    return with_arms(trials).assign(value=trials[METRIC_COLUMNS[metric]])


def equivalence_table(trials: pd.DataFrame, metric: str, seed: int = 0) -> pd.DataFrame:
    """Per arm with synthetic images (and mixing) and fraction: real and synthetic images per fold, the arm's and
    real only's mean metric, n*, the worth x with its interval and a sentence. `trials`: one curve's trials (one
    value of every other axis) with a classify.real_fraction column."""
    rows = _rows(trials, metric)
    real = rows[[a.is_real for a in rows["arm_"]]].drop_duplicates("trial_key")
    # (folds x fractions) of the curve's sizes and values, folds with every fraction finished only
    sizes = real.pivot_table(index="fold", columns=FRACTION, values="n_train_real").dropna()
    values = real.pivot_table(index="fold", columns=FRACTION, values="value").loc[sizes.index]
    rng = np.random.default_rng(seed)
    out = []
    synthetic = rows[[a.needs_synthetic for a in rows["arm_"]]]
    for (arm_, mixing, fraction), group in synthetic.groupby(["arm_", "mixing", FRACTION], sort=False):
        own = group.drop_duplicates("fold").set_index("fold")[["n_train_real", "n_train_synthetic", "value"]]
        folds = sorted(set(own.index) & set(sizes.index))  # paired: the folds both the arm and the curve finished
        if not folds:
            continue
        curve_n, curve_v, arm = sizes.loc[folds].to_numpy(), values.loc[folds].to_numpy(), own.loc[folds].to_numpy()
        n, m, value = arm.mean(0)
        x = worth(curve_n.mean(0), curve_v.mean(0), n, m, value)
        reason = ""
        if math.isnan(x):
            reason = ("above the real-only curve: more real images than the largest fraction would be needed"
                      if value > curve_v.mean(0).max() else "below the real-only curve at its smallest fraction")
        # A resample is a row of fold weights (counts / k): the same folds for the curve and the arm.
        weights = np.stack([np.bincount(rng.integers(0, len(folds), len(folds)), minlength=len(folds))
                            for _ in range(BOOTSTRAP)]) / len(folds)
        boot = (np.array([worth(w @ curve_n, w @ curve_v, *(w @ arm)) for w in weights])
                if not reason and len(folds) >= MIN_FOLDS else np.array([]))
        ok = boot[~np.isnan(boot)]
        low, high = ((float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5)))
                     if len(ok) >= MIN_ESTIMABLE * BOOTSTRAP else (math.nan, math.nan))
        out.append({"arm": arm_.label_with_weight, "arm_id": arm_.id, "mixing": mixing, FRACTION: fraction,
                    "n_folds": len(folds), "n_real": n, "n_synthetic": m, "value": value,
                    "real_only_value": float(values.loc[folds, fraction].mean()) if fraction in values else math.nan,
                    "n_real_equivalent": n + x * m, "real_per_synthetic": x, "ci_low": low, "ci_high": high,
                    "statement": _statement(x, low, high, reason, len(folds))})
    return pd.DataFrame(out)


def size_curves(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per arm (and mixing) and fraction: mean real training images, the metric's mean over folds and its
    corrected 95 % interval (NaN without spread or with one fold), for the plot against real-set size."""
    rows = _rows(trials, metric).drop_duplicates("trial_key")
    real = rows[[a.is_real for a in rows["arm_"]]]
    # The corrected t's overlap term is the split's n_test / n_train: real only's at each fraction, for every arm.
    overlap = (real["n_test"] / real["n_train_real"]).groupby(real[FRACTION]).mean()
    out = []
    for (arm, mixing, fraction), group in rows.groupby(["arm_", "mixing", FRACTION], sort=False):
        if arm.control:
            continue
        # No real only at this fraction: no overlap term to correct by, so no interval (0 gave the plain t's).
        t = corrected_t(group["value"].to_numpy(), float(overlap.get(fraction, math.nan)))
        out.append({"arm": arm.label_with_weight, "order": arm.order, "mixing": mixing, FRACTION: fraction,
                    "n_real": float(group["n_train_real"].mean()), "mean": t["mean"], "ci_low": t["ci_low"],
                    "ci_high": t["ci_high"]})
    return pd.DataFrame(out)
