"""The report's statistics against independent computations: a corrected t worked by hand, Holm's worked
example, the bootstrap's coverage on simulated data with a known effect, the power arithmetic by simulation."""
import math

import numpy as np
import pytest
from scipy import stats

from ooc_ray.comparisons import corrected_t, holm, minimum_detectable_effect, paired_bootstrap, repeats_to_detect


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
    assert corrected_t([0.02, 0.02, 0.02], 0.25)["p"] == 0.0  # identical non-zero gains in every fold


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


def test_minimum_detectable_effect_has_the_power_it_claims():
    """Simulate paired differences ~ N(mde, sd) whose fold-to-fold variance the correction models as
    sd^2 (1/J + ratio): the corrected t rejects in ~80 % of runs."""
    sd, k, ratio = 0.03, 5, 1 / 4
    mde = minimum_detectable_effect(sd, k, ratio)
    assert mde == pytest.approx((2.776445 + 0.940965) * math.sqrt(0.45) * 0.03, abs=1e-6)  # t quantiles, 4 df
    rng = np.random.default_rng(0)
    rejected = 0
    for _ in range(2000):
        # Differences whose mean carries the extra, shared variance ratio x sd^2 the folds' overlap causes.
        d = mde + rng.normal(0, sd * math.sqrt(ratio)) + rng.normal(0, sd, size=k)
        rejected += corrected_t(d, ratio)["p"] < 0.05
    assert 0.72 <= rejected / 2000 <= 0.88


def test_repeats_needed_and_the_floor_no_repeat_count_passes():
    # 5-fold: the corrected se never falls below sd x sqrt(1/4), so the MDE floor is ~2.8 x 0.5 x sd.
    assert repeats_to_detect(0.02, sd=0.03, k=5) is None
    needed = repeats_to_detect(0.06, sd=0.03, k=5)
    assert needed is not None and needed > 1
    assert minimum_detectable_effect(0.03, 5 * needed, 0.25) <= 0.06 < minimum_detectable_effect(0.03, 5 * (needed - 1), 0.25)


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
    from ooc_ray.report import verdict

    assert verdict(0.03, 0.01, 0.9, 0.02) == "better" and verdict(-0.03, 0.01, 0.9, 0.02) == "worse"
    assert verdict(0.001, 0.8, 0.01, 0.02) == "equivalent (±0.02)"
    assert verdict(0.01, 0.3, 0.3, 0.02) == "inconclusive" and verdict(float("nan"), 1, 1, 0.02) == ""
