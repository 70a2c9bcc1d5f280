"""The distribution measures (ooc_ray.distributions) against small cases worked by hand, an independent
computation (scipy's matrix square root) and simulations whose answer is known."""
import math

import numpy as np
import pytest
from scipy.linalg import sqrtm

from ooc_ray.distributions import density_coverage, frechet_distance, precision_recall, vendi_score


def column(*values: float) -> np.ndarray:
    return np.array(values, dtype=float)[:, None]


def test_frechet_distance_of_hand_worked_sets():
    # 1-D: means 1 and 3, variances (ddof 1) 2 and 8: (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 4 + 10 - 8 = 6
    assert frechet_distance(column(0, 2), column(1, 5)) == pytest.approx(6.0)
    # 2-D, both centred at 0: covariances diag(4/3, 16/3) and diag(16/3, 4/3) (the four corners (+-1, +-2) and
    # (+-2, +-1)); (S_r S_s)^1/2 = diag(8/3, 8/3): 20/3 + 20/3 - 2 * 16/3 = 8/3
    corners = np.array([[1, 2], [-1, -2], [1, -2], [-1, 2]], dtype=float)
    assert frechet_distance(corners, corners[:, ::-1]) == pytest.approx(8 / 3)
    assert frechet_distance(corners, corners) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(frechet_distance(column(1), column(1, 2)))  # one image has no covariance


def test_frechet_distance_agrees_with_scipy_sqrtm_and_with_the_gaussians_it_estimates():
    rng = np.random.default_rng(0)
    real, synthetic = rng.normal(size=(300, 5)), rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
    s_r, s_s = np.cov(real, rowvar=False), np.cov(synthetic, rowvar=False)
    mu = real.mean(0) - synthetic.mean(0)
    independent = mu @ mu + np.trace(s_r + s_s - 2 * sqrtm(s_r @ s_s).real)
    assert frechet_distance(real, synthetic) == pytest.approx(independent, rel=1e-8)
    # N(0, I) against N((3, 0), 4 I) in 2-D: 9 + Tr(I + 4 I - 2 * 2 I) = 9 + 2 = 11
    big = frechet_distance(rng.normal(size=(40_000, 2)), rng.normal([3, 0], 2, size=(40_000, 2)))
    assert big == pytest.approx(11.0, abs=0.15)


def test_precision_recall_density_coverage_of_a_hand_worked_case():
    """Real 0, 1, 3 and synthetic 0.5, 0.6, 10 on a line, k = 1.
    Real radii (nearest other real): 1, 1, 2. Synthetic radii: 0.1, 0.1, 9.4.
    precision: 0.5 and 0.6 lie in the ball (0, 1), 10 in none: 2/3.
    recall: real 0 lies in no synthetic ball (0.5 +- 0.1, 0.6 +- 0.1, 10 +- 9.4); 1 and 3 in 10's: 2/3.
    density: 0.5 lies in the balls of 0 and 1, so does 0.6, 10 in none: (2 + 2 + 0) / (k * 3) = 4/3.
    coverage: the balls of 0 and 1 hold a synthetic image, that of 3 (radius 2) none: 2/3."""
    real, synthetic = column(0, 1, 3), column(0.5, 0.6, 10)
    assert precision_recall(real, synthetic, k=1) == pytest.approx((2 / 3, 2 / 3))
    assert density_coverage(real, synthetic, k=1) == pytest.approx((4 / 3, 2 / 3))
    # A ball holds its boundary: 2 is at distance 1 from real 1, whose radius is 1.
    assert density_coverage(column(0, 1), column(2), k=1) == pytest.approx((1.0, 0.5))
    assert precision_recall(column(0, 1), column(2, 2.5), k=1) == pytest.approx((0.5, 0.0))  # radii 0.5: recall 0


def test_too_small_sets_give_nan_not_fewer_neighbours():
    assert all(math.isnan(v) for v in precision_recall(column(0, 1), column(0, 1, 2), k=2))
    assert all(math.isnan(v) for v in precision_recall(column(0, 1, 2), column(0, 1), k=2))
    assert all(math.isnan(v) for v in density_coverage(column(0, 1), column(0, 1, 2), k=2))
    assert all(math.isnan(v) for v in density_coverage(column(0, 1, 2), column(), k=1))
    assert math.isnan(vendi_score(np.zeros((0, 3))))


def test_density_and_coverage_of_one_distribution_match_their_expected_values():
    """Naeem et al. 2020: for real and synthetic sets from one distribution, E[density] = 1 and E[coverage] =
    1 - prod_{i=1..k} (N - i) / (M + N - i) (N real, M synthetic images); a shifted set scores lower on all."""
    rng = np.random.default_rng(1)
    n, k = 400, 5
    expected_coverage = 1 - np.prod([(n - i) / (2 * n - i) for i in range(1, k + 1)])  # 0.969
    same = np.array([density_coverage(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), k) for _ in range(10)])
    assert same[:, 0].mean() == pytest.approx(1.0, abs=0.05)
    assert same[:, 1].mean() == pytest.approx(expected_coverage, abs=0.01)
    shifted = density_coverage(rng.normal(size=(n, 3)), rng.normal(1.5, 1, size=(n, 3)), k)
    assert shifted[0] < 0.6 and shifted[1] < 0.8
    precision, recall = precision_recall(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), k)
    assert precision > 0.9 and recall > 0.9
    collapsed = precision_recall(rng.normal(size=(n, 3)), rng.normal(0, 0.2, size=(n, 3)), k)
    assert collapsed[0] > 0.95 and collapsed[1] < 0.5  # faithful but not diverse: recall says so


def test_vendi_score_counts_distinct_images():
    # [1, 0] twice and [0, 1]: K / 3 has eigenvalues 2/3, 1/3, 0: exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8899
    assert vendi_score(np.array([[1, 0], [1, 0], [0, 1]], dtype=float)) == pytest.approx(1.889882, abs=1e-6)
    assert vendi_score(np.ones((5, 4))) == pytest.approx(1.0)
    assert vendi_score(np.eye(3) * 7) == pytest.approx(3.0)
    assert vendi_score(np.array([[2.0, 0.0], [0.0, 0.5]])) == pytest.approx(2.0)  # cosine: scale does not count
