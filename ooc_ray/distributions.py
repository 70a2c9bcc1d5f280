"""How a set of synthetic images covers a set of real ones, on any feature vectors (rows = images): pure numpy,
no files, no models. The quality stage computes each per class and pool (ooc_ray.measures.class_quality).

- Frechet distance (FD; FID on Inception features): ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^1/2), the
  distance between two Gaussians fitted to the sets (covariances with ddof = 1). Biased upwards at small n (a
  few hundred images per class here): compare values at equal set sizes only; KID is the unbiased one.
- Precision and recall (Kynkaenniemi et al. 2019): the real manifold is the union of balls around each real
  image with the distance to its k-th nearest real neighbour as radius; precision is the fraction of synthetic
  images inside it (fidelity), recall the fraction of real images inside the synthetic manifold (diversity).
- Density and coverage (Naeem et al. 2020): density counts how many real balls hold each synthetic image (mean,
  divided by k: ~1 when the two sets are alike, robust to real outliers); coverage is the fraction of real
  images whose ball holds at least one synthetic image.
- Vendi score (Friedman & Dieng 2023): exp of the Shannon entropy of the eigenvalues of K / n, K the cosine
  similarity matrix of a set: the effective number of distinct images (1 for n copies, n for n orthogonal ones).

A ball includes its boundary (distance <= radius). A set too small for a measure gives NaN, never a value
computed on fewer neighbours than asked for.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FD between Gaussians fitted to the two sets; NaN with fewer than 2 images in either."""
    if min(len(real), len(synthetic)) < 2:
        return float("nan")
    mu = real.mean(0) - synthetic.mean(0)
    s_real = np.atleast_2d(np.cov(real, rowvar=False))
    s_syn = np.atleast_2d(np.cov(synthetic, rowvar=False))
    # Tr (S_r S_s)^1/2 = sum of the square roots of the eigenvalues of S_r^1/2 S_s S_r^1/2, a symmetric PSD
    # matrix: eigh stays real and stable where scipy's sqrtm of the non-symmetric product turns complex on the
    # singular covariances of n < d images.
    values, vectors = np.linalg.eigh(s_real)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root @ s_syn @ root)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(mu @ mu + np.trace(s_real) + np.trace(s_syn) - 2 * cross)


def kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row of x (itself excluded)."""
    within = cdist(x, x)  # from differences: a point on a ball's boundary stays on it
    np.fill_diagonal(within, np.inf)
    return np.sort(within, axis=1)[:, k - 1]


def _inside(points: np.ndarray, centres: np.ndarray, k: int) -> np.ndarray:
    """(len(points), len(centres)) booleans: point j lies in the k-NN ball of centre i."""
    return cdist(points, centres) <= kth_neighbour_radii(centres, k)[None, :]


def image_neighbourhood(real: np.ndarray, synthetic: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per synthetic image: 1.0 where it lies inside the real images' k-NN balls, else 0.0 (its share of
    precision), and the real balls holding it over k (its share of density); NaN where there are no more than k
    real images."""
    if len(real) <= k:
        return np.full(len(synthetic), np.nan), np.full(len(synthetic), np.nan)
    inside = _inside(synthetic, real, k)
    return inside.any(1).astype(float), inside.sum(1) / k


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int) -> tuple[float, float]:
    """(precision, recall) with k-NN balls; NaN where a set has no more than k images."""
    if min(len(real), len(synthetic)) <= k:
        return float("nan"), float("nan")
    precision = _inside(synthetic, real, k).any(1).mean()
    recall = _inside(real, synthetic, k).any(1).mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, synthetic: np.ndarray, k: int) -> tuple[float, float]:
    """(density, coverage) with the real images' k-NN balls; NaN where a set has no more than k real images or
    no synthetic image."""
    if len(real) <= k or len(synthetic) == 0:
        return float("nan"), float("nan")
    inside = _inside(synthetic, real, k)  # synthetic j in the ball of real i
    density = inside.sum() / (k * len(synthetic))
    coverage = inside.any(0).mean()
    return float(density), float(coverage)


def vendi_score(x: np.ndarray) -> float:
    """Effective number of distinct rows under the cosine similarity; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    values = np.clip(np.linalg.eigvalsh(unit @ unit.T / len(x)), 0, None)
    values = values[values > 0]
    return float(np.exp(-(values * np.log(values)).sum()))
