"""Measure validity (ooc_ray.measure_validity): Spearman's rho and its interval against a hand-worked case and a
simulation with a known answer, the degenerate cases, and the pairing of pools with accuracy changes on trial and
quality tables built by hand."""
import math

import numpy as np
import pandas as pd
import pytest

from ooc_ray.measure_validity import measure_validity, rank_correlation, usefulness_pairs


def test_rank_correlation_of_a_hand_worked_case():
    # ranks differ by -1, 1, -1, 1, 0: rho = 1 - 6 * 4 / (5 * 24) = 0.8; z = atanh(0.8) = 1.0986,
    # half width 1.96 * sqrt(1.06 / 2) = 1.4269: tanh(-0.3283) = -0.3170, tanh(2.5255) = 0.9873
    rho, low, high, n = rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert (rho, n) == (pytest.approx(0.8), 5)
    assert (low, high) == (pytest.approx(-0.3170, abs=1e-4), pytest.approx(0.9873, abs=1e-4))


def test_degenerate_cases_are_not_estimable():
    assert all(math.isnan(v) for v in rank_correlation([1, 1, 1, 1, 1], [1, 2, 3, 4, 5])[:3])  # no spread
    assert all(math.isnan(v) for v in rank_correlation([1, 2, 3], [3, 1, 2])[:3])  # n < 4
    rho, low, high, n = rank_correlation([1, 2, 3, 4, np.nan], [1, 2, 3, 4, 0])  # NaN pairs dropped: n = 4
    assert rho == 1.0 and math.isnan(low) and math.isnan(high) and n == 4  # |rho| = 1: no interval


def test_interval_covers_the_population_rank_correlation_in_simulation():
    """Bivariate normal with Pearson rho 0.6: population Spearman rho = (6 / pi) asin(0.3) = 0.5824."""
    rng = np.random.default_rng(0)
    truth = 6 / math.pi * math.asin(0.3)
    cov = [[1, 0.6], [0.6, 1]]
    results = np.array([rank_correlation(*rng.multivariate_normal([0, 0], cov, size=30).T)[:3] for _ in range(2000)])
    covered = (results[:, 1] <= truth) & (truth <= results[:, 2])
    assert results[:, 0].mean() == pytest.approx(truth, abs=0.02)
    assert 0.93 <= covered.mean() <= 0.97


def trial_table(rows):
    frame = pd.DataFrame(rows, columns=["fold", "weight", "ratio", "synthetic_only", "control", "accuracy"])
    return frame.assign(mixing="concat", trial_key=[f"t{i}" for i in range(len(frame))])


def test_pools_pair_with_their_folds_accuracy_change_and_the_verdicts_follow():
    """16 pools (8 folds x 2 weights); each fold's real-only accuracy differs, so a pool paired with another
    fold's real trial would break the changes. The change follows the pool's precision: precision and fd
    (built to fall as the change rises) predict it, kid (built to rise with it: lower should be better) misleads,
    coverage has no spread, vendi is noise."""
    rng = np.random.default_rng(3)
    folds, weights = range(8), (1.0, 0.5)
    real_acc = {f: 0.6 + 0.02 * f for f in folds}
    quality, trials, expected = [], [], {}
    for f in folds:
        trials.append((f, np.nan, 0.0, False, "", real_acc[f]))
        trials.append((f, np.nan, 1.0, False, "real_steps", 0.99))  # a control: never paired
        for w in weights:
            precision = rng.uniform(0.2, 0.9)
            change = 0.2 * precision + rng.normal(0, 0.01)
            expected[f, w] = change
            trials.append((f, w, 1.0, False, "", real_acc[f] + change))
            for label, offset in (("a", -0.05), ("b", 0.05)):  # the pool's value is the mean over its classes
                quality.append({"fold": f, "weight": w, "label": label, "precision": precision + offset,
                                "fd": 10 - 5 * precision + offset + rng.normal(0, 0.05), "kid": precision + offset,
                                "coverage": 0.5, "vendi": rng.uniform(1, 5), "nn_distance_median": 1.0})
    pairs = usefulness_pairs(trial_table(trials), pd.DataFrame(quality), "accuracy")
    assert len(pairs) == 16 and set(pairs["arm"]) == {"real+100%"} and set(pairs["mixing"]) == {"concat"}
    for row in pairs.itertuples():
        assert row.change == pytest.approx(expected[row.fold, row.weight])
    table = measure_validity(pairs).set_index("measure")
    assert set(table.index) == {"precision", "fd", "kid", "coverage", "vendi"}  # nn_distance_median: no direction
    assert table.loc["precision", "verdict"] == "predicts" and table.loc["precision", "rho"] > 0.9
    assert table.loc["fd", "verdict"] == "predicts" and table.loc["fd", "rho"] < -0.9
    assert table.loc["kid", "verdict"] == "misleads" and table.loc["kid", "better"] == "lower"
    assert table.loc["coverage", "verdict"] == "not estimable"
    assert table.loc["vendi", "verdict"] == "no evidence" and (table["n_eff"] == 16 - 8).all()  # pools - folds


def test_a_trial_listed_by_several_variants_is_one_observation():
    """Under a classify.mixing axis every variant lists the shared synthetic-only trials (they mix nothing): the
    report concatenates each variant's pairs, and four variants must not make 10 pools into 40 observations
    (the same rho with an interval half as wide turned "no evidence" into "predicts")."""
    rng = np.random.default_rng(3)
    trials, quality = [], []
    for f in range(5):
        trials.append((f, np.nan, 0.0, False, "", 0.7))
        for w in (1.0, 0.8):
            precision = rng.uniform(0.2, 0.9)
            trials.append((f, w, 1.0, True, "", 0.5 + 0.1 * precision + rng.normal(0, 0.2)))
            quality.append({"fold": f, "weight": w, "label": "a", "precision": precision})
    pairs = usefulness_pairs(trial_table(trials), pd.DataFrame(quality), "accuracy")
    alone = measure_validity(pairs)
    listed_four_times = measure_validity(pd.concat([pairs.assign(variant=m) for m in "abcd"], ignore_index=True))
    pd.testing.assert_frame_equal(listed_four_times, alone)
    assert (alone["n_eff"] == 10 - 5).all()


def test_a_pool_where_a_class_has_no_value_has_none_rather_than_a_mean_over_fewer_classes():
    """k-NN measures have no value for a class with at most k images in a pool (the demo's 'bad' class in two of
    three folds). A pool's mean over its other classes is another quantity (here class 'b' sits 0.5 above 'a'):
    such pools have no value, and only the others are compared."""
    rng = np.random.default_rng(5)
    trials, quality = [], []
    for f in range(10):
        trials.append((f, np.nan, 0.0, False, "", 0.7))
        complete = f < 5  # folds 5-9: class b has too few images for the measure
        for w in (1.0, 0.8):
            trials.append((f, w, 1.0, False, "", 0.7 + rng.normal(0, 0.05)))
            quality.append({"fold": f, "weight": w, "label": "a", "precision": rng.uniform(0.2, 0.3)})
            quality.append({"fold": f, "weight": w, "label": "b",
                            "precision": rng.uniform(0.7, 0.8) if complete else np.nan})
    pairs = usefulness_pairs(trial_table(trials), pd.DataFrame(quality), "accuracy")
    assert pairs.groupby("fold")["precision"].apply(lambda v: v.isna().all()).to_dict() == {f: f >= 5 for f in range(10)}
    assert measure_validity(pairs).set_index("measure").loc["precision", "n_eff"] == 10 - 5  # folds 0-4's pools


def test_the_correlation_is_within_folds_and_a_fold_component_on_both_sides_is_no_evidence():
    """Every pair of a fold subtracts the same real-only trial, and its pools share the fold's LoRAs: both sides
    carry a fold component. Two independent fold components, correlated across folds, gave 'predicts' or
    'misleads' in ~19 % of simulated reports where nothing predicts (nominal 5 %); centred within folds, at most
    the nominal rate. A within-fold association is still found. And a hand-worked case: 2 folds x 3 pools,
    centred by fold, equals scipy's Spearman of the centred values with n_eff = 6 - 2."""
    from scipy import stats

    fold = np.repeat(np.arange(2), 3)
    measure, change = np.array([1.0, 2.0, 3.0, 10.0, 12.0, 11.0]), np.array([0.1, 0.3, 0.2, 0.5, 0.7, 0.6])
    # centred by hand: fold means 2 and 11, 0.2 and 0.6 (ties kept as ties: mid-ranks)
    by_hand = stats.spearmanr([-1, 0, 1, -1, 1, 0], [-1, 1, 0, -1, 1, 0]).statistic
    rho, low, high, n = rank_correlation(measure, change, fold)
    assert n == 4 and rho == pytest.approx(by_hand) == pytest.approx(0.75) and low < rho < high
    rng = np.random.default_rng(8)
    wrong = pooled_wrong = found = 0
    runs = 1000
    for _ in range(runs):
        fold = np.repeat(np.arange(5), 3)  # 5 folds x 3 LoRA weights
        quality_of_pool = rng.normal(0, 1.0, 15)
        measure = rng.normal(0, 2.0, 5)[fold] + quality_of_pool
        change = rng.normal(0, 0.02, 15) - rng.normal(0, 0.04, 5)[fold]  # the fold's real-only trial's noise
        low, high = rank_correlation(measure, change, fold)[1:3]
        wrong += low * high > 0
        low, high = rank_correlation(measure, change)[1:3]
        pooled_wrong += low * high > 0
        low, high = rank_correlation(measure, change + 0.02 * quality_of_pool, fold)[1:3]
        found += low > 0
    assert wrong / runs <= 0.06 and pooled_wrong / runs >= 0.12 and found / runs >= 0.4, (wrong, pooled_wrong, found)


def test_a_perfect_order_of_floats_and_changes_apart_only_by_float_noise_have_no_interval():
    """scipy's Spearman of a perfect order of floats is 0.9999999999999999, not 1: it printed [1.000, 1.000]
    "predicts". And pools that each moved accuracy by one image of 20 differ only by float noise (0.04999999999999993,
    0.050000000000000044): no spread, not a rank order to correlate with."""
    measure = [0.11, 0.52, 0.23, 0.94, 0.35]
    rho, low, high, n = rank_correlation(measure, [0.1 + 0.3 * m for m in measure])
    assert (rho, n) == (1.0, 5) and math.isnan(low) and math.isnan(high)
    change = [a - b for a, b in ((0.85, 0.8), (0.9, 0.85), (0.75, 0.7), (0.95, 0.9), (0.65, 0.6))]
    assert np.ptp(change) > 0  # the noise this guards against
    assert all(math.isnan(v) for v in rank_correlation(measure, change)[:3])
