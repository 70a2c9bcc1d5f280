"""Comparing a grid arm with real only: the tests a methods reviewer accepts for cross-validated scores.

k-fold scores are not independent samples: two folds' training sets share (k-2)/(k-1) of their images, so the
plain paired t-test over folds underestimates the variance and rejects too often (Nadeau & Bengio 2003; Bouckaert
& Frank 2004 for repeated CV). The corrected resampled t-test multiplies the variance of the J paired differences
by (1/J + n_test/n_train) instead of 1/J, with J - 1 degrees of freedom; the Bayesian correlated t-test (Corani &
Benavoli 2015) reads the same corrected variance as a posterior. Beside them a paired bootstrap over held-out
clusters (images, or the groups the folds keep apart), Holm's step-down correction over a stated family, TOST
equivalence, the design's power from the non-central t, and the two-way decomposition of generation replicates
crossed with folds. A test that cannot mean anything (no spread, one fold) says why and gives no p-value.
Every function here is pure numpy/scipy/pandas.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from ooc_ray.keys import fold_columns

ALPHA = 0.05
POWER = 0.8
# Accuracies are multiples of 1/n_test (>= 1e-4 for any real test fold): a spread below this is float noise
# (1/18 - 1/18 computed two ways differs by ~1e-17), not a measured difference.
SPREAD_TOLERANCE = 1e-9
# The cluster bootstrap resamples clusters across folds together: with few per fold, a fold drops out of many
# resamples and a cluster drawn twice changes nothing, so the interval shrinks to the spread of subset means
# (coverage of a known difference, 5 folds: 0.72 with 1-2 groups per fold, 0.81 with 3, 0.90 with 5, 0.93 with
# 10). Fewer than this many in any fold: no interval.
MIN_CLUSTERS_PER_FOLD = 5
NO_SPREAD = "no spread: test undefined"
TOO_FEW = "fewer than 2 paired folds: test undefined"
# report.metric -> the trial column that holds it (balanced accuracy is the macro recall).
METRIC_COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "recall_macro", "f1_macro": "f1_macro"}


def _spread(d: np.ndarray) -> tuple[float, str]:
    """(sample sd of the differences, '' or why no test can be made of them)."""
    if len(d) < 2:
        return math.nan, TOO_FEW
    sd = float(np.std(d, ddof=1))
    if not math.isfinite(sd):
        return sd, "undefined variance: test undefined"
    return sd, NO_SPREAD if sd <= SPREAD_TOLERANCE else ""


def _corrected_se(sd, j: int, test_train_ratio: float):
    """The corrected standard error of a mean of J differences of sample sd `sd` (a float or an array of them)."""
    return np.sqrt((1 / j + test_train_ratio) * np.square(sd))


def corrected_t_rejects(differences: np.ndarray, test_train_ratio: float, alpha: float = ALPHA) -> np.ndarray:
    """Per row of J paired differences: does the two-sided corrected resampled t-test reject a mean of 0 at
    `alpha`, i.e. does corrected_t's (1 - alpha) CI leave 0 out? A row without spread rejects unless its mean is
    0 to SPREAD_TOLERANCE. For inverting the test over many candidate values at once."""
    d = np.atleast_2d(np.asarray(differences, dtype=float))
    j = d.shape[1]
    mean, sd = d.mean(1), d.std(1, ddof=1)
    half = stats.t.ppf(1 - alpha / 2, j - 1) * _corrected_se(sd, j, test_train_ratio)
    return np.where(sd <= SPREAD_TOLERANCE, np.abs(mean) > SPREAD_TOLERANCE, np.abs(mean) > half)


def corrected_t(differences, test_train_ratio: float, alpha: float = ALPHA) -> dict:
    """Nadeau-Bengio corrected resampled t-test of the mean of J paired differences (arm - real, one per distinct
    (repeat, fold)); `test_train_ratio` = n_test / n_train of one fold (1 / (k - 1) for k-fold CV).
    Returns mean, se, t, df, p (two-sided), the (1 - alpha) CI of the mean, and `undefined`: '' or why there is
    no test (one fold, or no spread: every fold moved by the same amount, p would be 0 and the CI a point)."""
    d = np.asarray(differences, dtype=float)
    j = len(d)
    out = {"mean": float(d.mean()) if j else math.nan, "se": math.nan, "t": math.nan, "df": j - 1, "p": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "undefined": ""}
    sd, out["undefined"] = _spread(d)
    if out["undefined"]:
        return out
    se = _corrected_se(sd, j, test_train_ratio)
    half = stats.t.ppf(1 - alpha / 2, j - 1) * se
    t = out["mean"] / se
    out.update(se=se, t=t, p=float(2 * stats.t.sf(abs(t), j - 1)), ci_low=out["mean"] - half,
               ci_high=out["mean"] + half)
    return out


def equivalence(differences, test_train_ratio: float, margin: float, alpha: float = ALPHA) -> dict:
    """Two one-sided tests (TOST, Schuirmann 1987) on the corrected resampled t: is the true mean difference
    inside (-margin, +margin)? p = the larger of the two one-sided p-values of H0 "mean <= -margin" and
    H0 "mean >= +margin"; equivalent at level alpha exactly when the (1 - 2 alpha) corrected CI lies inside the
    margin. So "no benefit" can be stated as a result, not read from a non-significant difference."""
    d = np.asarray(differences, dtype=float)
    j = len(d)
    out = {"p": math.nan, "ci_low": math.nan, "ci_high": math.nan, "margin": margin, "undefined": ""}
    sd, out["undefined"] = _spread(d)
    if out["undefined"]:
        return out
    mean, df, se = float(d.mean()), j - 1, _corrected_se(sd, j, test_train_ratio)
    p_lower = stats.t.sf((mean + margin) / se, df)  # H0: mean <= -margin
    p_upper = stats.t.cdf((mean - margin) / se, df)  # H0: mean >= +margin
    half = stats.t.ppf(1 - alpha, df) * se
    out.update(p=float(max(p_lower, p_upper)), ci_low=mean - half, ci_high=mean + half)
    return out


def bayesian_correlated_t(differences, test_train_ratio: float, margin: float) -> dict:
    """The Bayesian correlated t-test (Corani & Benavoli 2015; Benavoli et al. 2017, JMLR 18(77)): the posterior
    of the mean difference is Student t with J - 1 df, located at the mean difference, scaled by the corrected
    se (their rho / (1 - rho) is n_test / n_train). P(worse), P(equivalent) and P(better) are its mass below
    -margin, inside the region of practical equivalence (+-margin) and above +margin."""
    d = np.asarray(differences, dtype=float)
    out = {"p_worse": math.nan, "p_equivalent": math.nan, "p_better": math.nan, "undefined": ""}
    sd, out["undefined"] = _spread(d)
    if out["undefined"]:
        return out
    posterior = stats.t(len(d) - 1, loc=float(d.mean()), scale=_corrected_se(sd, len(d), test_train_ratio))
    worse, not_better = float(posterior.cdf(-margin)), float(posterior.cdf(margin))
    out.update(p_worse=worse, p_equivalent=not_better - worse, p_better=1.0 - not_better)
    return out


def verdict(diff: float, holm_p: float, tost_p: float, margin: float, undefined: str = "") -> str:
    """What a row supports at 5 %: better or worse than real only (corrected t, Holm-adjusted), equivalent within
    the margin (TOST on the corrected t), or neither; a row whose test is undefined supports nothing."""
    if isinstance(undefined, str) and undefined:
        return "undefined (" + undefined.split(":")[0] + ")"
    if math.isnan(diff):
        return ""
    if holm_p < ALPHA:
        return "better" if diff > 0 else "worse"
    if tost_p < ALPHA:
        return f"equivalent (±{margin:g})"
    return "inconclusive"


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order; NaNs (no test) stay NaN
    and do not count towards the family size."""
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


def paired_differences(real: pd.Series, other: pd.Series, signatures: dict | None = None) -> dict:
    """Paired per-fold differences of `other` against real only (both indexed by fold id), the plain paired t
    and Wilcoxon p beside them. `signatures` (fold id -> its held-out set, folds.held_out_signatures): folds
    that hold out the same images (a repeat that drew an earlier repeat's partition) are one fold, their
    differences averaged, so J counts distinct folds only."""
    both = pd.concat([real.rename("real"), other.rename("other")], axis=1).dropna()
    if signatures is not None and len(both):
        both = both.groupby(both.index.map(signatures), sort=False).mean()
    diff = both["other"] - both["real"]
    out = {"n_pairs": len(both), "mean_diff": float(diff.mean()) if len(both) else math.nan,
           "t_p": math.nan, "wilcoxon_p": math.nan, "differences": diff.to_numpy()}
    if not _spread(diff.to_numpy())[1]:
        out["t_p"] = float(stats.ttest_rel(both["other"], both["real"]).pvalue)
        # Signed ranks of the differences rounded to 9 digits: +1 image on two folds must tie (mid-ranks), not
        # be told apart by float noise (p 0.1875 for the exact 0.25).
        rounded = np.round(diff.to_numpy(), 9)
        if (rounded != 0).any():
            out["wilcoxon_p"] = float(stats.wilcoxon(rounded).pvalue)
    return out


# ---------------------------------------------------------------------------------------------- bootstrap


def metric_from_confusion(confusion: np.ndarray, metric: str) -> np.ndarray:
    """`metric` of confusion matrices (..., C, C; rows = true class), as the trials compute it with scikit-learn:
    accuracy; balanced accuracy = macro recall over the classes present; macro F1 with 0 where a class has no
    true and no predicted image (zero_division=0). NaN for an empty matrix."""
    confusion = np.asarray(confusion, dtype=float)
    total = confusion.sum(axis=(-2, -1))
    diag = np.diagonal(confusion, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return diag.sum(axis=-1) / total
        true = confusion.sum(axis=-1)
        if metric == "balanced_accuracy":
            present = true > 0
            recall = np.where(present, diag / np.maximum(true, 1), 0.0)
            return recall.sum(axis=-1) / present.sum(axis=-1)
        if metric == "f1_macro":
            denominator = true + confusion.sum(axis=-2)
            f1 = np.where(denominator > 0, 2 * diag / np.where(denominator > 0, denominator, 1), 0.0)
            return f1.mean(axis=-1) * np.where(total > 0, 1, np.nan)
    raise ValueError(f"metric {metric!r}: not one of {list(METRIC_COLUMNS)}")


def cluster_bootstrap(clusters, folds, y_true, arm_pred, real_pred, n_classes: int, metric: str = "accuracy",
                      n_boot: int = 2000, seed: int = 0, alpha: float = ALPHA) -> dict:
    """Percentile bootstrap CI of the mean over folds of metric(arm) - metric(real only) on the held-out
    predictions of both, paired by (fold, image): the same quantity as the table's per-fold mean difference.
    Resamples whole clusters with replacement, every prediction of a cluster in every fold together: images, or
    with grouped folds the groups (wells, patients), whose images are not independent (resampling images there
    covered a true difference in 80 % of simulated runs, not 95 %)."""
    clusters, folds = np.asarray(clusters), np.asarray(folds)
    codes, cluster_of = np.unique(clusters, return_inverse=True)
    fold_codes, fold_of = np.unique(folds, return_inverse=True)
    n, f, c2 = len(codes), len(fold_codes), n_classes * n_classes

    def counts(pred) -> np.ndarray:  # (clusters, folds x C x C) confusion counts
        cell = fold_of * c2 + np.asarray(y_true, dtype=int) * n_classes + np.asarray(pred, dtype=int)
        out = np.zeros((n, f * c2))
        np.add.at(out, (cluster_of, cell), 1.0)
        return out

    arm, real = counts(arm_pred), counts(real_pred)

    def difference(weights: np.ndarray) -> np.ndarray:  # weights: (draws, clusters) -> (draws,)
        shape = (len(weights), f, n_classes, n_classes)
        per_fold = (metric_from_confusion((weights @ arm).reshape(shape), metric)
                    - metric_from_confusion((weights @ real).reshape(shape), metric))
        return np.nanmean(per_fold, axis=1)

    fewest = min((len(np.unique(cluster_of[fold_of == i])) for i in range(f)), default=0)
    mean = float(difference(np.ones((1, n)))[0])
    if fewest < MIN_CLUSTERS_PER_FOLD:  # see MIN_CLUSTERS_PER_FOLD
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n_clusters": n, "n_boot": 0,
                "fewest_per_fold": fewest}
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    boot = difference(draws)
    low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high), "n_clusters": n, "n_boot": n_boot,
            "fewest_per_fold": fewest}


def paired_bootstrap(cluster_ids, arm_correct, real_correct, folds=None, n_boot: int = 2000, seed: int = 0,
                     alpha: float = ALPHA) -> dict:
    """cluster_bootstrap of accuracy from per-prediction correctness (one fold when `folds` is None)."""
    arm_correct = np.asarray(arm_correct, dtype=bool)
    folds = np.zeros(len(arm_correct), dtype=int) if folds is None else folds
    # Correct = predicted class 0 of true class 0, wrong = class 1: accuracy of that confusion is the hit rate.
    out = cluster_bootstrap(cluster_ids, folds, np.zeros(len(arm_correct), dtype=int), ~arm_correct,
                            ~np.asarray(real_correct, dtype=bool), 2, "accuracy", n_boot, seed, alpha)
    return {**out, "n_images": out["n_clusters"]}


# ---------------------------------------------------------------------------------------------- power


def power(effect: float, sd: float, j: int, test_train_ratio: float, alpha: float = ALPHA) -> float:
    """Probability that the two-sided corrected t-test rejects at `alpha` when the true mean difference is
    `effect` and the J paired differences have sd `sd`: the non-central t with J - 1 df and non-centrality
    effect / corrected se (exact where the differences are normal with the overlap the correction models)."""
    df = j - 1
    # scipy.special's distribution functions, not scipy.stats's objects: the same numbers (to 1 ulp, checked
    # against stats.nct.sf/cdf and stats.t.ppf) at ~1.5 us a call instead of ~45 us. A report's design
    # sensitivity evaluates power ~8,000 times (repeats_to_detect's brentq per repeat): 2.8 s of its 5.8 s.
    critical = special.stdtrit(df, 1 - alpha / 2)
    nc = abs(effect) / _corrected_se(sd, j, test_train_ratio)
    # The far tail's mass is below 1e-10 once nc > 0 is large, where the non-central t's cdf may be NaN (nc ~ 20).
    far = float(np.nan_to_num(special.nctdtr(df, nc, -critical), nan=0.0))
    return float(1.0 - special.nctdtr(df, nc, critical)) + far


def minimum_detectable_effect(sd: float, j: int, test_train_ratio: float, alpha: float = ALPHA,
                              power_wanted: float = POWER) -> float:
    """The smallest true mean difference the corrected t-test detects with probability `power_wanted` at
    two-sided level `alpha`, from the non-central t (a normal-quantile shortcut gave 0.73-0.77 power at k = 2-3
    while labelled 80 %)."""
    if j < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    se = _corrected_se(sd, j, test_train_ratio)
    high = se
    while power(high, sd, j, test_train_ratio, alpha) < power_wanted:  # nc doubles: at most ~6 steps to 80 %
        high *= 2
    return float(optimize.brentq(lambda e: power(e, sd, j, test_train_ratio, alpha) - power_wanted, 0.0, high))


def repeats_to_detect(effect: float, sd: float, k: int, test_train_ratio: float | None = None, alpha: float = ALPHA,
                      power_wanted: float = POWER, max_repeats: int = 100) -> int | None:
    """How many repeats of k-fold CV in all the corrected t-test needs to detect `effect` (1 = plain k-fold);
    None when even `max_repeats` do not: the correction's floor, sd x sqrt(n_test / n_train), does not shrink
    with repeats. `test_train_ratio`: as measured (default 1 / (k - 1))."""
    ratio = 1 / (k - 1) if test_train_ratio is None else test_train_ratio
    for repeats in range(1, max_repeats + 1):
        if minimum_detectable_effect(sd, k * repeats, ratio, alpha, power_wanted) <= effect:
            return repeats
    return None


# ---------------------------------------------------------------------------------------------- replicates


def replicate_components(scores, alpha: float = ALPHA) -> dict:
    """Two-way decomposition of an R x F table (generation replicate x fold, one trial per cell): replicates are
    crossed with folds (every replicate runs on the same folds), so the replicates' mean square is compared with
    the residual's, not with the fold-to-fold variance. Random effects, method of moments:
        var_generator = (MS_rep - MS_resid) / F,  var_fold = (MS_fold - MS_resid) / R,  var_resid = MS_resid,
    each floored at 0. `share`: the generator's share of the variance of one trial within a fold,
    var_generator / (var_generator + var_resid), with its exact (1 - alpha) interval from
    MS_rep / MS_resid ~ (1 + F var_generator / var_resid) x F(R - 1, (R - 1)(F - 1)) (normal model).
    Undefined (NaN, with why) for fewer than 2 replicates or folds, or no residual spread."""
    x = np.asarray(scores, dtype=float)
    r, f = x.shape
    out = {"replicates": r, "folds": f, "ms_rep": math.nan, "ms_fold": math.nan, "ms_resid": math.nan,
           "var_generator": math.nan, "var_fold": math.nan, "var_resid": math.nan, "share": math.nan,
           "share_low": math.nan, "share_high": math.nan, "undefined": ""}
    if r < 2 or f < 2:
        out["undefined"] = "fewer than 2 replicates or folds"
        return out
    if np.isnan(x).any():  # max(0, nan) is 0: an unfinished trial printed sd 0.000 with no word
        out["undefined"] = "missing cells (trials not finished)"
        return out
    grand = x.mean()
    rows, cols = x.mean(axis=1), x.mean(axis=0)
    df_rep, df_fold, df_resid = r - 1, f - 1, (r - 1) * (f - 1)
    ms_rep = f * float(((rows - grand) ** 2).sum()) / df_rep
    ms_fold = r * float(((cols - grand) ** 2).sum()) / df_fold
    ms_resid = float(((x - rows[:, None] - cols[None, :] + grand) ** 2).sum()) / df_resid
    out.update(ms_rep=ms_rep, ms_fold=ms_fold, ms_resid=ms_resid, var_fold=max(0.0, (ms_fold - ms_resid) / r),
               var_resid=ms_resid, var_generator=max(0.0, (ms_rep - ms_resid) / f))
    if ms_resid <= SPREAD_TOLERANCE ** 2:
        out["undefined"] = NO_SPREAD
        return out
    out["share"] = out["var_generator"] / (out["var_generator"] + ms_resid)
    ratio = ms_rep / ms_resid
    bounds = []
    for quantile in (1 - alpha / 2, alpha / 2):
        theta = max(0.0, (ratio / stats.f.ppf(quantile, df_rep, df_resid) - 1) / f)  # var_generator / var_resid
        bounds.append(theta / (1 + theta))
    out["share_low"], out["share_high"] = bounds
    return out


def pooled_replicates_t(differences, test_train_ratio: float, alpha: float = ALPHA) -> dict:
    """The corrected t of an arm pooled over R generation replicates: an R x F table of paired differences
    (replicate r's arm - real only, per fold), modelled as d = mu + generator_r + fold_f + residual. The mean over
    every cell estimates mu; its variance holds the generator's share var_generator / R beside the folds'
    corrected term (1/F + n_test/n_train) x var(fold means), so a claim about the method generalises over
    generator draws, not only over folds. Degrees of freedom by Satterthwaite. Returns corrected_t's keys."""
    x = np.asarray(differences, dtype=float)
    r, f = x.shape
    parts = replicate_components(x, alpha)
    fold_means = x.mean(axis=0)
    base = corrected_t(fold_means, test_train_ratio, alpha)
    if base["undefined"] or r < 2:
        return base
    fold_term = (1 / f + test_train_ratio) * float(np.var(fold_means, ddof=1))
    generator_term = parts["var_generator"] / r
    se = math.sqrt(fold_term + generator_term)
    # Satterthwaite over the mean squares the two terms are made of (fold: MS_fold / R with F - 1 df; generator:
    # (MS_rep - MS_resid) / (F R)); a generator term floored at 0 leaves the folds' df.
    pieces = [(fold_term, f - 1)]
    if generator_term > 0:
        pieces += [(parts["ms_rep"] / (f * r), r - 1), (-parts["ms_resid"] / (f * r), (r - 1) * (f - 1))]
    df = (fold_term + generator_term) ** 2 / sum(v ** 2 / d for v, d in pieces)
    t = base["mean"] / se
    half = stats.t.ppf(1 - alpha / 2, df) * se
    return {**base, "se": se, "t": t, "df": df, "p": float(2 * stats.t.sf(abs(t), df)),
            "ci_low": base["mean"] - half, "ci_high": base["mean"] + half}


# ---------------------------------------------------------------------------------------------- baseline


def naive_baseline(manifest: pd.DataFrame) -> dict:
    """Majority-class accuracy: of the whole set, and per fold of every repeat (predict the training folds'
    majority)."""
    overall = manifest["label"].value_counts(normalize=True).iloc[0]
    per_fold = [acc for column in fold_columns(manifest) for acc in _majority_per_fold(manifest, column)]
    return {"overall": float(overall), "per_fold_mean": float(np.mean(per_fold))}


def _majority_per_fold(manifest: pd.DataFrame, column: str) -> list[float]:
    """Held-out accuracy of the training majority, per fold of one repeat's fold `column`."""
    # From counts, not by filtering and sorting the manifest once per fold: with folds growing with the data that
    # loop was quadratic (500 folds of 164 of 82,000 images: 10 s, now 0.2 s; benchmarks/bench_scale.py).
    held = manifest.groupby([column, "label"]).size()
    total = manifest["label"].value_counts(sort=False)
    # A tie goes where train_rows(...)["label"].value_counts().idxmax() sends it: to the label met first in the
    # training rows sorted by id. Per label: its first image in id order, and its first in any other fold.
    ordered = manifest.sort_values("id", kind="stable")
    labels, folds = ordered["label"].to_numpy(), ordered[column].to_numpy()
    first = {}
    for label in total.index:
        pos = np.flatnonzero(labels == label)
        other = pos[folds[pos] != folds[pos[0]]]
        first[label] = (folds[pos[0]], pos[0], other[0] if len(other) else None)
    per_fold = []
    for fold in sorted(int(f) for f in manifest[column].unique()):
        train = {label: n - int(held.get((fold, label), 0)) for label, n in total.items()}
        met_first = {label: (elsewhere if first_fold == fold else at)
                     for label, (first_fold, at, elsewhere) in first.items()}
        most = max(train.values())
        if most == 0:
            raise ValueError(f"fold {fold}: no training images")  # as value_counts().idxmax() raised
        majority = min((label for label, n in train.items() if n == most), key=met_first.get)
        per_fold.append(int(held.get((fold, majority), 0)) / int(held.loc[fold].sum()))  # == (test == majority).mean()
    return per_fold
