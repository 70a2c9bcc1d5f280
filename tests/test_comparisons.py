"""The report's statistics against independent computations: a corrected t worked by hand, Holm's worked
example, the bootstrap's coverage on simulated data with a known effect (images and groups), the power from the
non-central t by simulation, the two-way replicate decomposition against statsmodels and by simulation, the
Bayesian correlated t against its authors' package (baycomp), and the degenerate cases: no spread, one fold,
duplicate partitions."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ooc_ray.comparisons import (NO_SPREAD, bayesian_correlated_t, cluster_bootstrap, corrected_t, equivalence, holm,
                                 metric_from_confusion, minimum_detectable_effect, paired_bootstrap,
                                 paired_differences, pooled_replicates_t, power, replicate_components,
                                 repeats_to_detect)


def test_corrected_t_worked_by_hand():
    # 5-fold CV, differences (arm - real) per fold; n_test / n_train = 1/4.
    # mean 0.016; sample variance 0.00053; corrected variance (1/5 + 1/4) x 0.00053 = 0.0002385;
    # se 0.0154434; t = 1.03604 on 4 df; t_0.975,4 = 2.776445 (tables: 2.776); CI 0.016 -/+ 0.042878.
    out = corrected_t([0.01, 0.03, -0.02, 0.04, 0.02], 1 / 4)
    assert out["mean"] == pytest.approx(0.016)
    assert out["se"] == pytest.approx(0.0154434, abs=1e-7)
    assert out["t"] == pytest.approx(1.03604, abs=1e-5) and out["df"] == 4
    assert out["p"] == pytest.approx(0.358706, abs=1e-6)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((-0.026878, 0.058878), abs=1e-6)
    # The plain paired t on the same numbers (variance / J only) claims more: t = 1.554, p = 0.195.
    plain = stats.ttest_1samp([0.01, 0.03, -0.02, 0.04, 0.02], 0.0)
    assert plain.pvalue == pytest.approx(0.1951, abs=1e-4)
    assert plain.pvalue < out["p"]


def test_corrected_t_degenerate_cases():
    assert math.isnan(corrected_t([0.02], 0.25)["p"])  # one difference: no variance, no test
    assert math.isnan(corrected_t([0.0, 0.0, 0.0], 0.25)["p"])  # nothing moved: no test
    # 5 folds of 18 held-out images, one more image right in every fold: identical gains, no spread to test
    # against. p = 0 and a zero-width CI would read "better"; the test is undefined and says so.
    one_more = [(k + 1) / 18 - k / 18 for k in (10, 11, 12, 13, 14)]  # 1/18 computed five ways: float noise
    assert np.std(one_more) > 0
    for d in ([0.02, 0.02, 0.02], one_more):
        for out in (corrected_t(d, 0.25), equivalence(d, 0.25, 0.02), bayesian_correlated_t(d, 0.25, 0.02)):
            assert out["undefined"] == NO_SPREAD
            assert all(math.isnan(v) for k, v in out.items() if k in ("p", "ci_low", "ci_high", "p_better"))
    nan_variance = corrected_t([0.1, float("inf"), 0.2], 0.25)  # a NaN variance gave p = 0 as well
    assert math.isnan(nan_variance["p"]) and nan_variance["undefined"].startswith("undefined variance")
    assert corrected_t([0.02], 0.25)["undefined"].startswith("fewer than 2")


def test_holm_worked_example():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06;
    # 0.04 x 1 = 0.04 -> 0.06 (monotone). Back in input order: 0.03, 0.06, 0.06, 0.02.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.5, float("nan"), 0.6])  # NaN (an arm equal to real only) is not a test: m = 2
    np.testing.assert_allclose(adjusted, [1.0, np.nan, 1.0])
    np.testing.assert_allclose(holm([0.01, float("nan"), 0.04]), [0.02, np.nan, 0.04])


def test_paired_bootstrap_covers_a_known_effect():
    """200 simulated test sets of 300 images: real only right with p = 0.70, the arm with p = 0.75 (correlated
    through a shared image difficulty); the 95 % interval holds the true +0.05 in ~95 % of them."""
    rng = np.random.default_rng(1)
    hits, widths = 0, []
    for sim in range(200):
        difficulty = rng.uniform(size=300)
        real = difficulty < 0.70
        arm = difficulty < 0.75  # the same images plus 5 % more: true difference exactly +0.05 per image set
        flip = rng.uniform(size=300) < 0.2  # and some independent noise in both
        real = np.where(flip, rng.uniform(size=300) < 0.70, real)
        arm = np.where(flip, rng.uniform(size=300) < 0.75, arm)
        ci = paired_bootstrap(np.arange(300), arm, real, n_boot=1000, seed=sim)
        hits += ci["ci_low"] <= 0.05 <= ci["ci_high"]
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert 0.90 <= hits / 200 <= 0.99
    assert 0.02 < np.mean(widths) < 0.12


def test_bootstrap_resamples_images_with_all_their_repeats():
    """Two repeats of the same images: the interval is that of one pass over the images (resampling pairs
    would pretend to have twice as many independent images and give a narrower interval)."""
    rng = np.random.default_rng(0)
    arm, real = rng.uniform(size=200) < 0.8, rng.uniform(size=200) < 0.7
    once = paired_bootstrap(np.arange(200), arm, real, seed=3)
    twice = paired_bootstrap(np.tile(np.arange(200), 2), np.tile(arm, 2), np.tile(real, 2), seed=3)
    assert twice["n_images"] == 200
    assert (twice["ci_low"], twice["ci_high"]) == pytest.approx((once["ci_low"], once["ci_high"]), abs=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_minimum_detectable_effect_has_the_power_it_claims(k):
    """Simulate paired differences ~ N(mde, sd) whose fold-to-fold variance the correction models as
    sd^2 (1/J + ratio): the corrected t rejects in 80 % of runs, within Monte Carlo error (4,000 runs: sd of the
    rate 0.006). The normal-quantile shortcut it replaces fell short at small k (0.73-0.77 at k = 2-3)."""
    sd, ratio = 0.03, 1 / (k - 1)
    mde = minimum_detectable_effect(sd, k, ratio)
    shortcut = (stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * math.sqrt((1 / k + ratio) * sd ** 2)
    assert power(mde, sd, k, ratio) == pytest.approx(0.8, abs=1e-9)
    rng = np.random.default_rng(k)
    runs = 4000

    def rejection_rate(effect: float) -> float:
        # Differences whose mean carries the extra, shared variance ratio x sd^2 the folds' overlap causes.
        d = effect + rng.normal(0, sd * math.sqrt(ratio), size=(runs, 1)) + rng.normal(0, sd, size=(runs, k))
        se = np.sqrt((1 / k + ratio) * d.var(axis=1, ddof=1))
        return float(np.mean(2 * stats.t.sf(np.abs(d.mean(axis=1) / se), k - 1) < 0.05))

    assert rejection_rate(mde) == pytest.approx(0.80, abs=0.025)
    if k == 3:
        assert rejection_rate(shortcut) < 0.78  # what "80 %" meant before


def test_repeats_needed_and_the_floor_no_repeat_count_passes():
    # 5-fold: the corrected se never falls below sd x sqrt(1/4), so the MDE floor is ~2.8 x 0.5 x sd.
    assert repeats_to_detect(0.02, sd=0.03, k=5) is None
    needed = repeats_to_detect(0.06, sd=0.03, k=5)
    assert needed is not None and needed > 1
    assert minimum_detectable_effect(0.03, 5 * needed, 0.25) <= 0.06 < minimum_detectable_effect(0.03, 5 * (needed - 1), 0.25)
    # With the measured n_test/n_train (here smaller than 1/(k-1): uneven folds), fewer repeats can do.
    assert repeats_to_detect(0.06, sd=0.03, k=5, test_train_ratio=0.2) <= needed


def test_sensitivity_counts_the_repeats_the_design_has():
    """Under a 3-repeat design that already detects 0.02, the line says so: never "2 repeats" (fewer than it
    has), and the repeats it asks for are in all."""
    from ooc_ray.report.render import sensitivity_text
    from ooc_ray.report.tables import design_sensitivity

    table = pd.DataFrame({"diff_sd": [0.009, 0.009], "n_pairs": [15, 15], "max_abs_diff": [0.05, 0.03]})
    info = design_sensitivity(table, k=5, repeats=3, ratio=0.25)
    assert info["need"][0.02] == 2 and info["j"] == 15 and not info["too_small"]
    text = sensitivity_text(info)
    assert "0.02: this design (3 repeats)" in text and "2 repeats" not in text and "Warning" not in text
    assert f"**{minimum_detectable_effect(0.009, 15, 0.25):.3f}**" in text
    info = design_sensitivity(table.assign(diff_sd=0.02, max_abs_diff=0.02), k=5, repeats=1, ratio=0.25)
    assert info["need"][0.02] is None and "no number of repeats" in sensitivity_text(info)
    assert info["too_small"] and "too small to say anything" in sensitivity_text(info)  # MDE above 0.02
    few = design_sensitivity(table.assign(n_pairs=3), k=3, repeats=1, ratio=0.5)
    assert few["too_small"] and "(2 degrees of freedom)" in sensitivity_text(few)
    # An unfinished grid (one arm over 4 of 15 folds): the most any arm pairs, 15, not a median of the pairs
    # finished so far (9.5 -> 9, which stated a wider MDE); and never k x repeats where repeats share a held-out
    # fold (group folds: 6 groups, k = 5, 2 repeats pair 7 distinct folds, not 10).
    unfinished = design_sensitivity(table.assign(n_pairs=[15, 4]), k=5, repeats=3, ratio=0.25)
    assert unfinished["j"] == 15 and unfinished["mde"] == pytest.approx(minimum_detectable_effect(0.009, 15, 0.25))
    assert design_sensitivity(table.assign(n_pairs=[7, 7]), k=5, repeats=2, ratio=0.25)["j"] == 7


def test_tost_worked_by_hand():
    """The differences of test_corrected_t_worked_by_hand, margin 0.05: se 0.0154434 (with the overlap term
    n_test/n_train = 1/4); the upper test t = (0.016 - 0.05) / se = -2.2016 on 4 df, one-sided p 0.04624 (tables:
    between 0.025 and 0.05); the lower t = 4.2737, p 0.0065; TOST p = the larger. 90 % CI 0.016 -/+ 2.131847 se.
    Without the overlap term the same numbers would give p 0.0149: the correction matters here."""
    from ooc_ray.comparisons import equivalence

    out = equivalence([0.01, 0.03, -0.02, 0.04, 0.02], 1 / 4, 0.05)
    assert out["p"] == pytest.approx(0.046244, abs=2e-6)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.016 - 0.032923, 0.016 + 0.032923), abs=2e-6)


def test_tost_is_two_one_sided_t_tests_and_holds_its_size():
    """Without the overlap term (ratio 0) the TOST p is the larger of scipy's one-sided one-sample t-tests of the
    differences shifted by the margin; at a true difference on the margin it rejects at most alpha of the time."""
    from ooc_ray.comparisons import equivalence

    st = stats

    rng = np.random.default_rng(3)
    d = rng.normal(0.004, 0.01, size=10)
    lower = st.ttest_1samp(d + 0.02, 0.0, alternative="greater").pvalue  # H0: mean <= -margin
    upper = st.ttest_1samp(d - 0.02, 0.0, alternative="less").pvalue  # H0: mean >= +margin
    out = equivalence(d, 0.0, 0.02)
    assert out["p"] == pytest.approx(max(lower, upper), rel=1e-9)
    assert (out["p"] < 0.05) == (-0.02 < out["ci_low"] and out["ci_high"] < 0.02)  # the 90 % CI inside the margin
    # The corrected variance widens it: the same differences are further from equivalence with n_test/n_train 1/4.
    assert equivalence(d, 0.25, 0.02)["p"] > out["p"]
    on_margin = [equivalence(rng.normal(0.02, 0.01, size=10), 0.0, 0.02)["p"] < 0.05 for _ in range(2000)]
    assert np.mean(on_margin) <= 0.05 + 0.015  # its size: 2,000 simulations, sd of the rate ~0.005
    inside = [equivalence(rng.normal(0.0, 0.01, size=10), 0.0, 0.02)["p"] < 0.05 for _ in range(200)]
    assert np.mean(inside) > 0.9  # and power where the truth is well inside


def test_verdicts():
    from ooc_ray.comparisons import verdict

    assert verdict(0.03, 0.01, 0.9, 0.02) == "better" and verdict(-0.03, 0.01, 0.9, 0.02) == "worse"
    assert verdict(0.001, 0.8, 0.01, 0.02) == "equivalent (±0.02)"
    assert verdict(0.01, 0.3, 0.3, 0.02) == "inconclusive" and verdict(float("nan"), 1, 1, 0.02) == ""


def test_bayesian_correlated_t_equals_its_authors_package():
    """baycomp (Benavoli, Corani, Demsar, Zaffalon) computes the same posterior from the same corrected variance;
    its runs argument sets n_test/n_train to 1/(k - 1). With no margin, P(better) is one minus the corrected t's
    one-sided p."""
    import baycomp

    rng = np.random.default_rng(5)
    for k, runs in ((5, 1), (3, 4), (10, 2)):
        real = rng.uniform(0.6, 0.8, size=k * runs)
        arm = real + rng.normal(0.01, 0.02, size=k * runs)
        ours = bayesian_correlated_t(arm - real, 1 / (k - 1), 0.02)
        worse, equivalent, better = baycomp.CorrelatedTTest.probs(real, arm, rope=0.02, runs=runs)
        assert (ours["p_worse"], ours["p_equivalent"], ours["p_better"]) == pytest.approx((worse, equivalent, better),
                                                                                          abs=1e-12)
        test = corrected_t(arm - real, 1 / (k - 1))
        one_sided = test["p"] / 2 if test["t"] > 0 else 1 - test["p"] / 2
        assert bayesian_correlated_t(arm - real, 1 / (k - 1), 0.0)["p_better"] == pytest.approx(1 - one_sided)


def test_replicate_decomposition_equals_statsmodels_two_way_anova():
    """Replicates crossed with folds, one trial per cell: the mean squares are those of a two-way ANOVA without
    interaction (statsmodels' anova_lm), the components their method-of-moments combinations."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(2)
    scores = 0.7 + rng.normal(0, 0.02, (4, 1)) + rng.normal(0, 0.05, (1, 6)) + rng.normal(0, 0.03, (4, 6))
    frame = pd.DataFrame([{"acc": scores[r, f], "rep": str(r), "fold": str(f)} for r in range(4) for f in range(6)])
    anova = anova_lm(smf.ols("acc ~ C(rep) + C(fold)", frame).fit())
    ms = anova["sum_sq"] / anova["df"]
    out = replicate_components(scores)
    assert (out["ms_rep"], out["ms_fold"], out["ms_resid"]) == pytest.approx(
        (ms["C(rep)"], ms["C(fold)"], ms["Residual"]), rel=1e-10)
    assert out["var_generator"] == pytest.approx(max(0.0, (ms["C(rep)"] - ms["Residual"]) / 6))
    assert out["var_fold"] == pytest.approx((ms["C(fold)"] - ms["Residual"]) / 4)
    assert out["share_low"] <= out["share"] <= out["share_high"]


def test_replicate_share_is_unbiased_and_its_interval_covers_the_truth():
    """2,000 simulated replicate x fold tables (3 replicates crossed with 5 folds, a true generator share of 9 %
    of the within-fold variance, large fold effects): the generator variance is estimated without bias, the
    exact interval covers the true share in 95 % of runs (Monte Carlo sd 0.005), and the share is not floored to
    0 in most runs, as the nested formula (var(replicate means) - var(fold) / folds) was (~70 %)."""
    rng = np.random.default_rng(9)
    var_gen, var_resid, var_fold, truth = 0.09, 0.91, 4.0, 0.09
    estimates, covered, nested_zero = [], 0, 0
    for _ in range(2000):
        scores = (rng.normal(0, math.sqrt(var_gen), (3, 1)) + rng.normal(0, math.sqrt(var_fold), (1, 5))
                  + rng.normal(0, math.sqrt(var_resid), (3, 5)))
        out = replicate_components(scores)
        estimates.append((out["ms_rep"] - out["ms_resid"]) / 5)  # unfloored: the floor would bias it up
        covered += out["share_low"] <= truth <= out["share_high"]
        nested_zero += scores.mean(axis=1).var(ddof=1) - scores.var(axis=1, ddof=1).mean() / 5 <= 0
    assert np.mean(estimates) == pytest.approx(var_gen, abs=0.03)  # sd of the mean over 2,000 runs: ~0.012
    assert covered / 2000 == pytest.approx(0.95, abs=0.015)
    assert nested_zero / 2000 > 0.6  # what the nested formula did with the same tables


def test_replicates_pooled_test_holds_its_level_with_a_generator_effect():
    """An arm whose true effect is 0 but whose generator draws move it (var_gen as large as the folds'): the test
    of the replicate-averaged fold differences alone rejects far above 5 %; the pooled test, which counts the
    generator's variance over its R draws, holds 5 % within Monte Carlo error."""
    rng = np.random.default_rng(4)
    pooled, naive = 0, 0
    for _ in range(2000):
        d = rng.normal(0, 0.03, (3, 1)) + rng.normal(0, 0.03, (1, 5)) + rng.normal(0, 0.01, (3, 5))
        pooled += pooled_replicates_t(d, 0.0)["p"] < 0.05
        naive += corrected_t(d.mean(axis=0), 0.0)["p"] < 0.05
    assert 0.02 <= pooled / 2000 <= 0.065 and naive / 2000 > 0.10


def test_duplicate_partitions_count_once():
    """Four repeats of one partition (5 groups in 5 folds) are one partition: J = 5, not 20, and the CI is that of
    the one partition's five differences (counting all 20 made it ~38 % narrower here)."""
    rng = np.random.default_rng(0)
    real = pd.Series(rng.uniform(0.6, 0.8, 5))
    arm = real + rng.normal(0.01, 0.03, 5)
    repeated_real = pd.Series(np.tile(real.to_numpy(), 4))  # fold ids 0..19, repeat r = ids 5r..5r+4
    repeated_arm = pd.Series(np.tile(arm.to_numpy(), 4) + rng.normal(0, 0.001, 20))  # retrained: a little noise
    signatures = {fold: f"heldout-{fold % 5}" for fold in range(20)}
    once = corrected_t(paired_differences(real, arm)["differences"], 0.25)
    pairs = paired_differences(repeated_real, repeated_arm, signatures)
    assert pairs["n_pairs"] == 5
    counted_once = corrected_t(pairs["differences"], 0.25)
    counted_twenty = corrected_t(repeated_arm - repeated_real, 0.25)
    width = counted_once["ci_high"] - counted_once["ci_low"]
    assert width == pytest.approx(once["ci_high"] - once["ci_low"], rel=0.05)
    assert (counted_twenty["ci_high"] - counted_twenty["ci_low"]) / width < 0.7


def test_metrics_from_confusion_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        y, p = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
        conf = confusion_matrix(y, p, labels=[0, 1, 2])
        assert metric_from_confusion(conf, "accuracy") == pytest.approx(accuracy_score(y, p))
        assert metric_from_confusion(conf, "balanced_accuracy") == pytest.approx(balanced_accuracy_score(y, p))
        assert metric_from_confusion(conf, "f1_macro") == pytest.approx(
            f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0))


def _grouped_fold_data(rng, groups=24, per_group=12, folds=3):
    """Held-out predictions of two classifiers over grouped folds: each group (a well) has its own difficulty, so
    its images are right or wrong together. The arm is right on the real classifier's images plus 5 % more:
    the true per-fold difference is +0.05 in expectation over groups."""
    group = np.repeat(np.arange(groups), per_group)
    fold = group % folds
    difficulty = rng.uniform(size=groups)[group] * 0.8 + rng.uniform(size=len(group)) * 0.2
    real_right, arm_right = difficulty < 0.65, difficulty < 0.70
    return group, fold, arm_right, real_right


def test_bootstrap_over_groups_covers_where_the_image_bootstrap_does_not():
    """Folds that keep groups apart: resampling groups covers the true difference in about 95 % of simulated runs;
    resampling images, as if they were independent, covers it far less often. Both are centred on the per-fold
    mean difference (the table's Δ), not on the image mean."""
    rng = np.random.default_rng(11)
    truth = 0.05
    by_group = by_image = 0
    runs = 300
    for sim in range(runs):
        group, fold, arm_right, real_right = _grouped_fold_data(rng)
        grouped = paired_bootstrap(group, arm_right, real_right, folds=fold, n_boot=500, seed=sim)
        images = paired_bootstrap(np.arange(len(group)), arm_right, real_right, folds=fold, n_boot=500, seed=sim)
        by_group += grouped["ci_low"] <= truth <= grouped["ci_high"]
        by_image += images["ci_low"] <= truth <= images["ci_high"]
        per_fold = pd.Series(arm_right.astype(float) - real_right).groupby(fold).mean().mean()
        assert grouped["mean"] == pytest.approx(per_fold) and images["mean"] == pytest.approx(per_fold)
    assert by_group / runs >= 0.89 and by_image / runs <= 0.8


def test_bootstrap_of_balanced_accuracy_is_centred_on_the_per_fold_difference():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    fold = np.arange(60) % 3
    arm, real = np.where(rng.uniform(size=60) < 0.8, y, (y + 1) % 3), np.where(rng.uniform(size=60) < 0.6, y, 0)
    out = cluster_bootstrap(np.arange(60), fold, y, arm, real, 3, "balanced_accuracy", n_boot=300)
    by_hand = np.mean([balanced_accuracy_score(y[fold == f], arm[fold == f])
                       - balanced_accuracy_score(y[fold == f], real[fold == f]) for f in range(3)])
    assert out["mean"] == pytest.approx(by_hand) and out["ci_low"] < by_hand < out["ci_high"]


def test_the_group_bootstrap_gives_no_interval_with_too_few_groups_in_a_fold():
    """Groups resampled across folds together: with few per fold a fold drops out of many resamples and a group
    drawn twice changes nothing, so the interval shrank to the spread of subset means (coverage of a known
    difference 0.72 with 1-2 groups per fold). Below MIN_CLUSTERS_PER_FOLD in any fold: no interval, saying
    how many; from it on, an interval as before."""
    from ooc_ray.comparisons import MIN_CLUSTERS_PER_FOLD

    rng = np.random.default_rng(4)
    for groups, interval in ((3, False), (3 * MIN_CLUSTERS_PER_FOLD, True)):  # 3 folds: 1 or 5 groups each
        group, fold, arm_right, real_right = _grouped_fold_data(rng, groups=groups)
        out = paired_bootstrap(group, arm_right, real_right, folds=fold, n_boot=200)
        per_fold = pd.Series(arm_right.astype(float) - real_right).groupby(fold).mean().mean()
        assert out["mean"] == pytest.approx(per_fold) and out["fewest_per_fold"] == groups // 3
        assert math.isnan(out["ci_low"]) != interval and math.isnan(out["ci_high"]) != interval


def test_wilcoxon_ties_differences_that_are_equal_in_whole_images():
    """real 16, 17, 16, 15, 10 of 20 right; arm 19, 20, 17, 16, 9: differences +3, +3, +1, +1, -1 images. Exact
    signed-rank p with mid-ranks (ranks 4.5, 4.5, 2, 2, 2; W- = 2): 8 of 32 sign patterns as extreme, 0.25.
    Float noise in the accuracies had broken the ties: 0.1875."""
    real = pd.Series([16, 17, 16, 15, 10]) / 20
    arm = pd.Series([19, 20, 17, 16, 9]) / 20
    out = paired_differences(real, arm)
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon([3, 3, 1, 1, -1]).pvalue) == pytest.approx(0.25)


def test_a_replicate_table_with_an_unfinished_trial_is_undefined_not_zero():
    """max(0, nan) is 0 in Python: one missing cell printed a generator sd and a fold sd of 0.000."""
    scores = np.array([[0.8, 0.7, 0.9], [0.75, np.nan, 0.85]])
    out = replicate_components(scores)
    assert out["undefined"] == "missing cells (trials not finished)"
    assert all(math.isnan(out[k]) for k in ("var_generator", "var_fold", "share", "share_low"))
