"""Does a quality measure predict usefulness? Across every pool of a run (variant x fold x LoRA weight), the rank
correlation of each quality measure with what the pool's images did to the classifier: the accuracy change of an
arm over real only on the same fold. Pure pandas and scipy, no files.

Fidelity and usefulness can diverge ("When Pretty Isn't Useful", 2026; CheXGenBench): a search or filter steered by
a measure that does not predict usefulness steers by noise, so the report says, per measure and arm, how well it
did on this run's data.

- Pairs: one per (variant, fold, weight) pool and arm with synthetic images (ratio or synthetic only, no control):
  the pool's measure (mean over its classes; none where a class has none) against metric(arm) - metric(real
  only) on that fold.
- Within folds: every pair of a fold subtracts the same real-only trial, and a fold's pools share its LoRAs and
  training images, so both sides carry a fold component. Correlated across folds, two independent fold
  components made "predicts" / "misleads" in 18-24 % of simulated reports where the measure predicts nothing
  (5-10 folds x 3 weights; nominal 5 %). So each side is centred on its mean over the pairs that share a
  real-only trial (a fold), a fold with one pair says nothing, and Spearman's rho of the centred values is the
  within-fold association: 3 % of null reports, and where fold components exist it finds a real association
  more often than the pooled rho (0.59 vs 0.26 at 5 folds x 3 weights, simulated).
- 95 % interval from Fisher's z with Fieller et al.'s (1957) variance 1.06 / (n_eff - 3), n_eff = pairs - folds
  (the degrees of freedom left after centring).
- Not estimable: n_eff below 4, a measure or change without spread (all ties, to 9 digits), or |rho| = 1 (no
  interval).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ooc_ray.comparisons import METRIC_COLUMNS
from ooc_ray.protocol import with_arms

# Which way is better for each measure that has a direction (+1: higher, -1: lower), as the search's objectives
# and the validity table read them. kid_to_weight0 and nn_distance_median have none (far from the base or from
# the nearest real image is neither good nor bad in itself).
MEASURE_DIRECTION = {"cas_accuracy": 1, "kid": -1, "fd": -1, "precision": 1, "recall": 1, "density": 1,
                     "coverage": 1, "vendi": 1, "memorised_fraction": -1, "real_confidence_median": 1}
FIELLER_VARIANCE = 1.06  # Var(atanh rho_s) ~ 1.06 / (n - 3) (Fieller, Hartley & Pearson 1957)
MIN_PAIRS = 4
Z95 = stats.norm.ppf(0.975)


def rank_correlation(x, y, blocks=None) -> tuple[float, float, float, int]:
    """(Spearman's rho, 95 % low, high, n_eff) over the finite pairs; NaNs where not estimable. `blocks`: each
    pair's block (the real-only trial it subtracts): both sides centred within blocks, n_eff = pairs - blocks,
    blocks of one pair dropped (module docstring). Without blocks, n_eff = pairs."""
    # Rounded to 9 digits: accuracy changes that are one image apart in exact arithmetic come out of the trial
    # rows as 0.04999999999999993 and 0.050000000000000044, which ranked as spread (and broke ties) that is not.
    x, y = np.round(np.asarray(x, float), 9), np.round(np.asarray(y, float), 9)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y, n = x[finite], y[finite], int(finite.sum())
    if blocks is not None:
        block = pd.Series(np.asarray(blocks)[finite])
        shared = block.map(block.value_counts()).to_numpy() > 1
        block, x, y = block[shared], x[shared], y[shared]
        x = np.round(x - pd.Series(x).groupby(block.to_numpy()).transform("mean").to_numpy(), 9)
        y = np.round(y - pd.Series(y).groupby(block.to_numpy()).transform("mean").to_numpy(), 9)
        n = len(x) - block.nunique()
    if n < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan, n
    rho = float(stats.spearmanr(x, y).statistic)
    if abs(rho) >= 1 - 1e-12:  # scipy gives 0.9999999999999999 for a perfect order of floats
        return float(np.sign(rho)), math.nan, math.nan, n
    half = Z95 * math.sqrt(FIELLER_VARIANCE / (n - 3))
    return rho, math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half), n


def pool_measures(quality: pd.DataFrame) -> pd.DataFrame:
    """One row per (fold, weight) pool: each measure with a direction, the mean over the pool's classes; NaN where
    a class has no value (k-NN measures of a class with at most quality.nn_k images): a mean over the other
    classes would not be comparable with other pools' (the demo's precision over 3 classes in one fold and 2 in
    the others gave rho 0.886 "predicts"; over the same 2 classes everywhere, 0.314 "no evidence")."""
    measures = [m for m in MEASURE_DIRECTION if m in quality.columns]
    return quality.groupby(["fold", "weight"])[measures].agg(lambda values: values.mean(skipna=False)).reset_index()


def usefulness_pairs(trials: pd.DataFrame, quality: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One variant's pairs: per trial of an arm with synthetic images, its key, fold, weight, arm name, mixing, the
    change of `metric` (report.metric) over real only on its fold (`change`), and its pool's measures."""
    metric = METRIC_COLUMNS[metric]
    trials = with_arms(trials)
    base = trials[[a.is_real for a in trials["arm_"]]].drop_duplicates("fold").set_index("fold")
    arms = trials[[a.needs_synthetic for a in trials["arm_"]]]
    arms = arms[arms["fold"].isin(base.index)]
    pairs = arms.assign(arm=[a.name for a in arms["arm_"]], change=arms[metric] - arms["fold"].map(base[metric]),
                        baseline=arms["fold"].map(base["trial_key"]))
    return pairs[["trial_key", "fold", "weight", "arm", "mixing", "change", "baseline"]].merge(
        pool_measures(quality), on=["fold", "weight"])


def measure_validity(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per arm (name and mixing) and measure: n_eff (pairs less folds), the within-fold rho, its interval, the
    direction that means better and a verdict: "predicts" (interval on the side of better), "misleads" (on the
    other side), "no evidence" (it holds 0) or "not estimable". A trial shared by several variants (synthetic
    only under a mixing axis: it mixes nothing) is one observation, however many variants list it: counted once
    per variant, 10 pools made n = 40 and a rho of 0.44 "predicts" (interval [0.14, 0.67] instead of [-0.28,
    0.85])."""
    pairs = pairs.drop_duplicates("trial_key")
    rows = []
    for (arm, mixing), group in pairs.groupby(["arm", "mixing"], sort=True):
        for measure, direction in MEASURE_DIRECTION.items():
            if measure not in group.columns:
                continue
            rho, low, high, n = rank_correlation(group[measure], group["change"], group["baseline"])
            if math.isnan(low):
                verdict = "not estimable"
            elif low * high <= 0:
                verdict = "no evidence"
            else:
                verdict = "predicts" if rho * direction > 0 else "misleads"
            rows.append({"arm": arm, "mixing": mixing, "measure": measure, "better": "higher" if direction > 0
                         else "lower", "n_eff": n, "rho": rho, "ci_low": low, "ci_high": high, "verdict": verdict})
    return pd.DataFrame(rows, columns=["arm", "mixing", "measure", "better", "n_eff", "rho", "ci_low", "ci_high",
                                       "verdict"])
