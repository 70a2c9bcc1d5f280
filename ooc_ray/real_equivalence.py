"""How many real images is a synthetic image worth? From a run with an axis over classify.real_fraction: the real-only
accuracy against the real training set's size is the exchange curve; an arm that adds m synthetic images to n real
ones and reaches accuracy a is worth n* - n real images, where the curve reaches a at n* (Kwark et al. 2025 measure
the same "real-equivalent" value; it depends on n). Pure pandas and numpy, no files.

- The curves: each fold's real-only metric against its real training images, one point per fraction, linear
  between them; only sizes every paired fold measured count (the common domain).
- Worth: at a candidate worth x0, fold i's difference is its arm's metric minus its own curve at n_i + x0 m_i. The
  worth x is the smallest x0 at which the folds' mean difference reaches 0: where the mean curve first reaches
  the arm's mean (a dip in the curve is not lifted: the first size that measured a counts). Not estimable where
  the arm lies beyond the curves: above them at their largest common size (more real images than measured would
  be needed), or below them at their smallest.
- Uncertainty: the worths the folds cannot reject: the 95 % interval holds every x0 where the corrected
  resampled t-test (Nadeau and Bengio, as for the report's Δ) finds the differences' mean not different from 0,
  the test inverted, so the curve's and the arm's fold effects cancel. It always holds x (the mean difference is
  0 there). An end that reaches the curves' first or last common size is open ("below" / "beyond"; NaN in the
  CSV with ci_low_open / ci_high_open true). No interval with 1 paired fold, or when every fold gives the same
  difference (no spread). A set with gaps (a noisy curve) is given by its outermost worths.
  A percentile bootstrap over the folds, used before, held a known worth in 84 of 100 simulated 5-fold runs; this
  interval holds it in at least 95 % (tests/test_real_equivalence.py).
- Per size, each arm's mean with the corrected resampled t interval (Nadeau and Bengio) for the curve plot.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from ooc_ray.comparisons import METRIC_COLUMNS, NO_SPREAD, corrected_t, corrected_t_rejects
from ooc_ray.protocol import with_arms

FRACTION = "classify.real_fraction"
GRID = 2001  # candidate worths across the common domain; each boundary then bisected to float precision
ABOVE = "above the real-only curve: more real images than the largest size every fold measured would be needed"
BELOW = "below the real-only curve at its smallest size"


def _curve(sizes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One fold's curve by ascending size, two fractions that kept the same number of images (per-class rounding
    of a small class) as one point, their mean: np.interp would jump between them and drop one."""
    unique, which = np.unique(sizes, return_inverse=True)
    return unique, np.bincount(which, values) / np.bincount(which)


def _differences(x0: np.ndarray, curve_n: np.ndarray, curve_v: np.ndarray, arm: np.ndarray) -> np.ndarray:
    """(candidate worths x folds): each fold's arm metric minus its own real-only curve (linear between its
    measured sizes) at the fold's n + x0 m. Rows of curve_n / curve_v: one fold's sizes and metric; of `arm`:
    its n, m and metric."""
    return np.stack([v - np.interp(n + x0 * m, *_curve(cn, cv)) for cn, cv, (n, m, v) in zip(curve_n, curve_v, arm)],
                    1)


def _candidates(curve_n: np.ndarray, arm: np.ndarray, low: float, high: float, *more: float) -> np.ndarray:
    """Worths to evaluate: a grid over [low, high] and every fold's measured size as a worth, where the mean
    difference bends (linear between them, so no first crossing hides between two candidates)."""
    bends = ((curve_n - arm[:, :1]) / arm[:, 1:2]).ravel()
    return np.union1d(np.linspace(low, high, GRID), [b for b in (*bends, *more) if low <= b <= high])


def _domain(curve_n: np.ndarray, arm: np.ndarray) -> tuple[float, float]:
    """The worths at which every fold's n + x0 m lies on its measured curve (empty when low > high)."""
    return (float(np.max((curve_n.min(1) - arm[:, 0]) / arm[:, 1])),
            float(np.min((curve_n.max(1) - arm[:, 0]) / arm[:, 1])))


def _edge(holds: Callable[[np.ndarray], np.ndarray], outside: float, inside: float) -> float:
    """The point between `outside` (where `holds`, a test of candidate worths, is false) and `inside` (true)
    where it changes, by bisection."""
    for _ in range(60):  # 2^-60 of a grid step: below any printed digit
        middle = (outside + inside) / 2
        outside, inside = (outside, middle) if holds(np.array([middle]))[0] else (middle, inside)
    return inside


def point_worth(curve_n: np.ndarray, curve_v: np.ndarray, arm: np.ndarray) -> tuple[float, str]:
    """(x, '') with x the smallest worth at which the folds' mean difference reaches 0, or (NaN, why not)."""
    low, high = _domain(curve_n, arm)
    if low > high:
        return math.nan, "the folds' curves share no size"

    def reached(x0: np.ndarray) -> np.ndarray:  # the mean curve at or above the arm
        return _differences(x0, curve_n, curve_v, arm).mean(1) <= 0

    if _differences(np.array([low]), curve_n, curve_v, arm).mean() < 0:  # the curves start above the arm
        return math.nan, BELOW
    candidates = _candidates(curve_n, arm, low, high)
    at = np.flatnonzero(reached(candidates))
    if not len(at):
        return math.nan, ABOVE
    if at[0] == 0:
        return low, ""
    return _edge(reached, candidates[at[0] - 1], candidates[at[0]]), ""


def worth_interval(curve_n: np.ndarray, curve_v: np.ndarray, arm: np.ndarray, overlap: float, x: float) -> dict:
    """The worths the corrected t does not reject (module docstring) around the point worth x: low and high (NaN
    where open: low_open / high_open, with the curves' end in low_end / high_end), or `why` there are none."""
    low, high = _domain(curve_n, arm)
    out = {"low": math.nan, "high": math.nan, "low_open": False, "high_open": False, "low_end": low,
           "high_end": high, "why": ""}
    if len(arm) < 2:
        out["why"] = "1 paired fold"
    elif math.isnan(overlap):
        out["why"] = "no real only at this fraction: no n_test / n_train to correct by"
    elif corrected_t(_differences(np.array([x]), curve_n, curve_v, arm)[0], overlap)["undefined"] == NO_SPREAD:
        out["why"] = "every paired fold gives the same difference"
    if out["why"]:
        return out

    def kept(x0: np.ndarray) -> np.ndarray:
        return ~corrected_t_rejects(_differences(x0, curve_n, curve_v, arm), overlap)

    candidates = _candidates(curve_n, arm, low, high, x)
    inside = np.flatnonzero(kept(candidates))  # holds x: its mean difference is 0
    first, last = inside[0], inside[-1]
    out["low_open"], out["high_open"] = bool(first == 0), bool(last == len(candidates) - 1)
    if first:
        out["low"] = _edge(kept, candidates[first - 1], candidates[first])
    if last < len(candidates) - 1:
        out["high"] = _edge(kept, candidates[last + 1], candidates[last])
    return out


def _two(value: float) -> str:
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text  # an end at -1e-16 is 0


def _statement(x: float, interval: dict, reason: str) -> str:
    if reason:
        return f"not estimable ({reason})"
    if interval["why"]:
        text = f" (no interval: {interval['why']})"
    else:
        low = (f"below {_two(interval['low_end'])}, where the curves start," if interval["low_open"]
               else _two(interval["low"]))
        high = (f"beyond {_two(interval['high_end'])}, where the curves end" if interval["high_open"]
                else _two(interval["high"]))
        text = f" (95 % CI {low} to {high})"
    return f"1 synthetic image = {_two(x)} real images{text}"


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
    # (folds x fractions) of the curve's sizes and values, folds with every fraction finished (with a value) only
    sizes = real.pivot_table(index="fold", columns=FRACTION, values="n_train_real")
    values = real.pivot_table(index="fold", columns=FRACTION, values="value", dropna=False).reindex_like(sizes)
    finished = sizes.notna().all(1) & values.notna().all(1)
    sizes, values = sizes[finished], values[finished]
    out = []
    synthetic = rows[[a.needs_synthetic for a in rows["arm_"]]]
    for (arm_, mixing, fraction), group in synthetic.groupby(["arm_", "mixing", FRACTION], sort=False):
        own = group.drop_duplicates("fold").set_index("fold")[["n_train_real", "n_train_synthetic", "value"]]
        own = own.dropna()  # a trial without a value pairs with nothing
        folds = sorted(set(own.index) & set(sizes.index))  # paired: the folds both the arm and the curve finished
        if not folds:
            continue
        curve_n, curve_v, arm = sizes.loc[folds].to_numpy(), values.loc[folds].to_numpy(), own.loc[folds].to_numpy()
        n, m, value = arm.mean(0)
        x, reason = point_worth(curve_n, curve_v, arm)
        interval = ({"low": math.nan, "high": math.nan, "low_open": False, "high_open": False} if reason
                    else worth_interval(curve_n, curve_v, arm, float(overlaps.get(fraction, math.nan)), x))
        out.append({"arm": arm_.label_with_weight, "arm_id": arm_.id, "mixing": mixing, FRACTION: fraction,
                    "n_folds": len(folds), "n_real": n, "n_synthetic": m, "value": value,
                    "real_only_value": float(values.loc[folds, fraction].mean()) if fraction in values else math.nan,
                    "n_real_equivalent": n + x * m, "real_per_synthetic": x, "ci_low": interval["low"],
                    "ci_high": interval["high"], "ci_low_open": interval["low_open"],
                    "ci_high_open": interval["high_open"], "statement": _statement(x, interval, reason)})
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
