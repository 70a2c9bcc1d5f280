"""Comparing a grid arm with real only: the tests a reviewer accepts for cross-validated accuracies.

k-fold scores are not independent samples: two folds' training sets share (k-2)/(k-1) of their images, so the
plain paired t-test over folds underestimates the variance and rejects too often (Nadeau & Bengio 2003,
"Inference for the generalization error"; Bouckaert & Frank 2004 for repeated CV). The corrected resampled
t-test multiplies the variance of the J paired differences by (1/J + n_test/n_train) instead of 1/J, with J - 1
degrees of freedom. Beside it, a paired bootstrap over held-out images (both arms predict the same images in
each fold), resampling whole images so that an image's repeats move together. Holm's step-down correction keeps
the family-wise error of one table's arms at alpha. Every function here is pure numpy/scipy.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


def corrected_t(differences, test_train_ratio: float, alpha: float = ALPHA) -> dict:
    """Nadeau-Bengio corrected resampled t-test of the mean of J paired differences (arm - real, one per
    (repeat, fold)); `test_train_ratio` = n_test / n_train of one fold (1 / (k - 1) for k-fold CV).
    Returns mean, se, t, df, p (two-sided) and the (1 - alpha) confidence interval of the mean."""
    d = np.asarray(differences, dtype=float)
    j = len(d)
    out = {"mean": float(d.mean()) if j else math.nan, "se": math.nan, "t": math.nan, "df": j - 1, "p": math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if j < 2:
        return out
    se = math.sqrt((1 / j + test_train_ratio) * d.var(ddof=1))
    half = stats.t.ppf(1 - alpha / 2, j - 1) * se
    out.update(se=se, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if se > 0:
        out["t"] = out["mean"] / se
        out["p"] = float(2 * stats.t.sf(abs(out["t"]), j - 1))
    elif out["mean"] != 0:  # every difference equal and non-zero: no spread to test against
        out["p"] = 0.0
    return out


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order; NaNs stay NaN and do not
    count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        out[i] = min(1.0, running)
    return out


def paired_bootstrap(image_ids, arm_correct, real_correct, n_boot: int = 2000, seed: int = 0,
                     alpha: float = ALPHA) -> dict:
    """Percentile bootstrap CI of accuracy(arm) - accuracy(real only) over held-out predictions paired by
    (repeat, fold, image). Resamples images (with all their repeats) with replacement, so the interval reflects
    which images happen to be held out, not only the classifiers' randomness."""
    ids = np.asarray(image_ids)
    diff = np.asarray(arm_correct, dtype=float) - np.asarray(real_correct, dtype=float)
    codes, per = np.unique(ids, return_inverse=True)
    sums = np.bincount(per, weights=diff, minlength=len(codes))
    counts = np.bincount(per, minlength=len(codes)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(codes), size=(n_boot, len(codes)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "n_images": len(codes),
            "n_boot": n_boot}


def _corrected_se(sd: float, j: int, test_train_ratio: float) -> float:
    return math.sqrt((1 / j + test_train_ratio) * sd ** 2)


def minimum_detectable_effect(sd: float, j: int, test_train_ratio: float, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """The smallest true mean difference the corrected t-test detects with probability `power` at two-sided
    level `alpha`, with J paired differences of standard deviation `sd` (normal approximation of the
    non-central t: (t_{1-alpha/2} + t_{power}) x corrected se, both with J - 1 df)."""
    if j < 2 or not math.isfinite(sd):
        return math.nan
    return (stats.t.ppf(1 - alpha / 2, j - 1) + stats.t.ppf(power, j - 1)) * _corrected_se(sd, j, test_train_ratio)


def repeats_to_detect(effect: float, sd: float, k: int, alpha: float = ALPHA, power: float = POWER,
                      max_repeats: int = 100) -> int | None:
    """How many repeats of k-fold CV the corrected t-test needs to detect `effect`; None when even `max_repeats`
    do not: the correction's floor, sd x sqrt(1 / (k - 1)), does not shrink with repeats."""
    ratio = 1 / (k - 1)
    for repeats in range(1, max_repeats + 1):
        if minimum_detectable_effect(sd, k * repeats, ratio, alpha, power) <= effect:
            return repeats
    return None


def equivalence(differences, test_train_ratio: float, margin: float, alpha: float = ALPHA) -> dict:
    """Two one-sided tests (TOST, Schuirmann 1987) on the corrected resampled t: is the true mean difference
    inside (-margin, +margin)? p = the larger of the two one-sided p-values of H0 "mean <= -margin" and
    H0 "mean >= +margin"; equivalent at level alpha exactly when the (1 - 2 alpha) corrected CI lies inside the
    margin. So "no benefit" can be stated as a result, not read from a non-significant difference."""
    d = np.asarray(differences, dtype=float)
    j = len(d)
    out = {"p": math.nan, "ci_low": math.nan, "ci_high": math.nan, "margin": margin}
    if j < 2:
        return out
    mean, df = float(d.mean()), j - 1
    se = math.sqrt((1 / j + test_train_ratio) * d.var(ddof=1))
    if se == 0:  # every difference equal: inside the margin or not, with certainty
        out.update(p=0.0 if abs(mean) < margin else 1.0, ci_low=mean, ci_high=mean)
        return out
    p_lower = stats.t.sf((mean + margin) / se, df)  # H0: mean <= -margin
    p_upper = stats.t.cdf((mean - margin) / se, df)  # H0: mean >= +margin
    half = stats.t.ppf(1 - alpha, df) * se
    out.update(p=float(max(p_lower, p_upper)), ci_low=mean - half, ci_high=mean + half)
    return out
