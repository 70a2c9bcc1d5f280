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
- Uncertainty: the worths the folds cannot reject. At a candidate worth x0, fold i's difference is its arm's metric
  minus its own real-only curve (linear between its measured sizes) at n_i + x0 m_i; the 95 % interval holds every
  x0 on the curves where the corrected resampled t-test (Nadeau and Bengio, as for the report's Δ) finds those
  differences' mean not different from 0: the test inverted, so the curve's and the arm's fold effects cancel
  and the interval is as wide as the report's other corrected intervals. An end that reaches the last size
  every fold measured is open ("at least"). No interval with 1 paired fold, or when every fold gives the same
  difference (no spread).
  A percentile bootstrap over the folds, used before, held a known worth in 84 of 100 simulated 5-fold runs; this
  interval holds it in at least 95 % (tests/test_real_equivalence.py).
- Per size, each arm's mean with the corrected resampled t interval (Nadeau and Bengio) for the curve plot.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ooc_ray.comparisons import METRIC_COLUMNS, NO_SPREAD, corrected_t, corrected_t_rejects
from ooc_ray.protocol import with_arms

FRACTION = "classify.real_fraction"
GRID = 2001  # candidate worths between the curves' ends; each end refined by bisection to 1e-9 of the range


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


def _differences(x0: np.ndarray, curve_n: np.ndarray, curve_v: np.ndarray, arm: np.ndarray) -> np.ndarray:
    """(candidate worths x folds): each fold's arm metric minus its own real-only curve (linear between its
    measured sizes) at the fold's n + x0 m."""
    return np.stack([v - np.interp(n + x0 * m, cn, cv) for cn, cv, (n, m, v) in zip(curve_n, curve_v, arm)], 1)


def worth_interval(curve_n: np.ndarray, curve_v: np.ndarray, arm: np.ndarray, overlap: float,
                   x: float) -> dict:
    """The worths the corrected t does not reject (module docstring), as low and high (NaN where the interval
    reaches the curves' common end: `low_open` / `high_open` give that end) or `why` there is none. Rows of
    curve_n / curve_v: one fold's sizes (ascending) and metric; of `arm`: its n, m and metric. A set with gaps
    is given by its outermost worths (wider, never narrower)."""
    out = {"low": math.nan, "high": math.nan, "low_open": math.nan, "high_open": math.nan, "why": ""}
    lo = float(np.max((curve_n[:, 0] - arm[:, 0]) / arm[:, 1]))  # where every fold's curve is measured
    hi = float(np.min((curve_n[:, -1] - arm[:, 0]) / arm[:, 1]))
    if len(arm) < 2:
        out["why"] = "1 paired fold"
    elif math.isnan(overlap):
        out["why"] = "no real only at this fraction: no n_test / n_train to correct by"
    elif lo > hi:
        out["why"] = "the folds' curves share no size"
    elif corrected_t(_differences(np.array([min(max(x, lo), hi)]), curve_n, curve_v, arm)[0],
                     overlap)["undefined"] == NO_SPREAD:
        out["why"] = "every paired fold gives the same difference"
    if out["why"]:
        return out
    candidates = np.union1d(np.linspace(lo, hi, GRID), [min(max(x, lo), hi)])

    def kept(x0: np.ndarray) -> np.ndarray:
        return ~corrected_t_rejects(_differences(x0, curve_n, curve_v, arm), overlap)

    inside = np.flatnonzero(kept(candidates))
    if not len(inside):
        out["why"] = "no worth on the curves fits every fold"
        return out

    def edge(rejected: float, accepted: float) -> float:
        for _ in range(60):  # the acceptance boundary between the two, to far below the printed 2 decimals
            middle = (rejected + accepted) / 2
            rejected, accepted = (rejected, middle) if kept(np.array([middle]))[0] else (middle, accepted)
        return accepted

    first, last = inside[0], inside[-1]
    out["low_open"], out["high_open"] = (lo if first == 0 else math.nan), (hi if last == len(candidates) - 1
                                                                           else math.nan)
    if first:
        out["low"] = edge(candidates[first - 1], candidates[first])
    if last < len(candidates) - 1:
        out["high"] = edge(candidates[last + 1], candidates[last])
    return out


def _statement(x: float, interval: dict, reason: str) -> str:
    if reason:
        return f"not estimable ({reason})"
    if interval["why"]:
        text = f" (no interval: {interval['why']})"
    else:
        low = (f"below {interval['low_open']:.2f}, where the curves start," if math.isnan(interval["low"])
               else f"{interval['low']:.2f}")
        high = (f"beyond {interval['high_open']:.2f}, where the curves end" if math.isnan(interval["high"])
                else f"{interval['high']:.2f}")
        text = f" (95 % CI {low} to {high})"
    return f"1 synthetic image = {x:.2f} real images{text}"


def _rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trial rows with their Arm, mixing and the tested metric as `value`."""
    return with_arms(trials).assign(value=trials[METRIC_COLUMNS[metric]])


def _overlaps(real: pd.DataFrame) -> pd.Series:
    """The corrected t's overlap term, the split's n_test / n_train: real only's mean at each fraction, used for
    every arm at that fraction."""
    return (real["n_test"] / real["n_train_real"]).groupby(real[FRACTION]).mean()


def equivalence_table(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per arm with synthetic images (and mixing) and fraction: real and synthetic images per fold, the arm's and
    real only's mean metric, n*, the worth x with its interval and a sentence. `trials`: one curve's trials (one
    value of every other axis) with a classify.real_fraction column."""
    rows = _rows(trials, metric)
    real = rows[[a.is_real for a in rows["arm_"]]].drop_duplicates("trial_key")
    overlaps = _overlaps(real)
    # (folds x fractions) of the curve's sizes and values, folds with every fraction finished only
    sizes = real.pivot_table(index="fold", columns=FRACTION, values="n_train_real").dropna()
    values = real.pivot_table(index="fold", columns=FRACTION, values="value").loc[sizes.index]
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
        interval = ({"low": math.nan, "high": math.nan, "why": reason} if reason
                    else worth_interval(curve_n, curve_v, arm, float(overlaps.get(fraction, math.nan)), x))
        out.append({"arm": arm_.label_with_weight, "arm_id": arm_.id, "mixing": mixing, FRACTION: fraction,
                    "n_folds": len(folds), "n_real": n, "n_synthetic": m, "value": value,
                    "real_only_value": float(values.loc[folds, fraction].mean()) if fraction in values else math.nan,
                    "n_real_equivalent": n + x * m, "real_per_synthetic": x, "ci_low": interval["low"],
                    "ci_high": interval["high"], "statement": _statement(x, interval, reason)})
    return pd.DataFrame(out)


def size_curves(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per arm (and mixing) and fraction: mean real training images, the metric's mean over folds and its
    corrected 95 % interval (NaN without spread or with one fold), for the plot against real-set size."""
    rows = _rows(trials, metric).drop_duplicates("trial_key")
    overlap = _overlaps(rows[[a.is_real for a in rows["arm_"]]])
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
