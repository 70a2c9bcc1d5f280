"""Measures of synthetic images against real ones, on any feature vectors (rows = images): pure numpy and
scikit-learn, no files, no models. The quality stage and the LoRA search both use them.

- KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018),
  averaged over random subsets; unbiased, so unlike FID it is fair at the few hundred images per class here.
- MMD^2 with a permutation p-value: is there evidence that two image sets differ (what a LoRA changes)?
- CAS (classification accuracy score): a linear classifier trained on synthetic images only, tested on real
  held-out images; per-class recall says which classes the generator captures.
- Memorisation: cosine distance from each synthetic image to its nearest real training image, flagged when closer
  than the 5th percentile of real-to-nearest-other-real distances.
- Real confidence: a linear classifier trained on real images scores each synthetic image (the quality filter).
- Frechet distance, precision/recall, density/coverage and the Vendi score (ooc_ray.distributions), per class.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from ooc_ray.config import QualityConfig
from ooc_ray.distributions import (density_coverage, frechet_distance, image_neighbourhood, precision_recall,
                                   vendi_score)

MEMORISED_PERCENTILE = 5.0


def _cubic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3 between every row of x and every row of y."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 10, subset_size: int = 50, seed: int = 0
        ) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) between two feature sets (rows = images)."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = _cubic(x, x), _cubic(y, y), _cubic(x, y)
        # unbiased: drop the diagonals (self-similarity) of the within-set terms
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 1000, seed: int = 0
                         ) -> tuple[float, float]:
    """(unbiased MMD^2 with KID's kernel on all of x and y, permutation p-value): is there any evidence that the
    two image sets come from different distributions? p counts the relabelled splits whose MMD^2 is at least
    the observed one, plus the observed split itself ((b + 1) / (permutations + 1), never 0)."""
    if min(len(x), len(y)) < 2:
        return float("nan"), float("nan")
    both = np.vstack([x, y])
    k = _cubic(both, both)
    n, m = len(x), len(y)

    def statistic(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        kxx, kyy = k[np.ix_(a, a)], k[np.ix_(b, b)]
        return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * k[np.ix_(a, b)].mean())

    observed = statistic(np.arange(n + m))
    # A split with the same sets (x and y swapped, when n == m) gives the same value up to rounding: count it.
    threshold = observed - 1e-9 * max(abs(observed), 1.0)
    rng = np.random.default_rng(seed)
    at_least = sum(statistic(rng.permutation(n + m)) >= threshold for _ in range(permutations))
    return observed, (at_least + 1) / (permutations + 1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_real(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(distance of each fake to its nearest real, that real's row index, memorisation threshold)."""
    real_u, fake_u = _unit(real), _unit(fake)
    index = NearestNeighbors(n_neighbors=min(2, len(real)), metric="euclidean").fit(real_u)
    rr, _ = index.kneighbors(real_u)
    # column 0 is each real image itself (distance 0); column 1 its nearest other real image
    real_nn = rr[:, -1] ** 2 / 2  # squared euclidean on unit vectors / 2 = cosine distance
    threshold = float(np.percentile(real_nn, MEMORISED_PERCENTILE))
    fd, fi = index.kneighbors(fake_u, n_neighbors=1)
    return fd[:, 0] ** 2 / 2, fi[:, 0], threshold


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, n_classes: int, seed: int = 0):
    """Standardised multinomial logistic regression: the cheapest faithful 'classifier on these features'."""
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(x_train), y_train)

    def predict_proba(x: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(x), n_classes))
        probs[:, model.classes_] = model.predict_proba(scaler.transform(x))
        return probs

    return predict_proba


def stack_features(df: pd.DataFrame, features: dict[str, np.ndarray], classes: list[str]):
    index = {c: i for i, c in enumerate(classes)}
    x = np.stack([features[d] for d in df["sha256"]]) if len(df) else np.zeros((0, 1))
    return x, df["label"].map(index).to_numpy()


def _memorisation(x_real, y_real, x_syn, y_syn, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    dist, memorised = np.full(len(y_syn), np.nan), np.zeros(len(y_syn), bool)
    for c in range(n_classes):
        real_c, syn_c = y_real == c, y_syn == c
        if syn_c.any() and real_c.sum() >= 2:
            d, _, threshold = nearest_real(x_real[real_c], x_syn[syn_c])
            dist[syn_c], memorised[syn_c] = d, d < threshold
    return dist, memorised


def class_quality(real_train: pd.DataFrame, real_test: pd.DataFrame, synthetic: pd.DataFrame,
                  features: dict[str, np.ndarray], classes: list[str], qcfg: QualityConfig
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class quality rows and per-synthetic-image scores for one (fold, weight) pool.

    `features` maps image sha256 -> feature vector; frames need columns sha256, label (and id for synthetic)."""
    n = len(classes)
    x_real, y_real = stack_features(real_train, features, classes)
    x_test, y_test = stack_features(real_test, features, classes)
    x_syn, y_syn = stack_features(synthetic, features, classes)
    if len(set(y_syn)) > 1:
        cas_pred = linear_probe(x_syn, y_syn, n)(x_test).argmax(1)
    else:  # a pool with one class can only ever predict that class
        cas_pred = np.full(len(y_test), y_syn[0] if len(y_syn) else -1)
    confidence = linear_probe(x_real, y_real, n)(x_syn)[np.arange(len(y_syn)), y_syn] if len(y_syn) else np.zeros(0)
    dist, memorised = _memorisation(x_real, y_real, x_syn, y_syn, n)
    inside, density_each = np.full(len(y_syn), np.nan), np.full(len(y_syn), np.nan)
    rows = []
    for c, label in enumerate(classes):
        real_c, syn_c, test_c = y_real == c, y_syn == c, y_test == c
        inside[syn_c], density_each[syn_c] = image_neighbourhood(x_real[real_c], x_syn[syn_c], qcfg.nn_k)
        kid_mean, kid_std = kid(x_real[real_c], x_syn[syn_c], qcfg.kid_subsets, qcfg.kid_subset_size, seed=c)
        precision, recall = precision_recall(x_real[real_c], x_syn[syn_c], qcfg.nn_k)
        density, coverage = density_coverage(x_real[real_c], x_syn[syn_c], qcfg.nn_k)
        rows.append({
            "label": label, "n_real": int(real_c.sum()), "n_synthetic": int(syn_c.sum()),
            "kid": kid_mean, "kid_std": kid_std,
            "cas_recall": float((cas_pred[test_c] == c).mean()) if test_c.any() else float("nan"),
            "nn_distance_median": float(np.median(dist[syn_c])) if syn_c.any() else float("nan"),
            "memorised_fraction": float(memorised[syn_c].mean()) if syn_c.any() else float("nan"),
            "real_confidence_median": float(np.median(confidence[syn_c])) if syn_c.any() else float("nan"),
            "fd": frechet_distance(x_real[real_c], x_syn[syn_c]), "precision": precision, "recall": recall,
            "density": density, "coverage": coverage, "vendi": vendi_score(x_syn[syn_c]),
            "vendi_real": vendi_score(x_real[real_c]),
        })
    table = pd.DataFrame(rows)
    table["cas_accuracy"] = float((cas_pred == y_test).mean()) if len(y_test) else float("nan")
    scores = pd.DataFrame({"id": synthetic["id"].to_numpy(), "nn_distance": dist, "memorised": memorised,
                           "real_confidence": confidence, "precision": inside, "density": density_each})
    return table, scores


def kid_to_control(pool: pd.DataFrame, control: pd.DataFrame, features: dict[str, np.ndarray], classes: list[str],
                   qcfg: QualityConfig) -> np.ndarray:
    """Per class (in `classes` order), KID between a pool's images and the LoRA-weight-0.0 pool's (the base
    without the class LoRA, same prompts and seeds scheme): how far the LoRA moved that class's images."""
    x_pool, y_pool = stack_features(pool, features, classes)
    x_control, y_control = stack_features(control, features, classes)
    return np.array([kid(x_pool[y_pool == c], x_control[y_control == c], qcfg.kid_subsets, qcfg.kid_subset_size,
                         seed=c)[0] for c in range(len(classes))])


def lora_effect(by_pool: dict, features: dict[str, np.ndarray], classes: list[str]) -> pd.DataFrame:
    """Per (weight != 0, class): MMD^2 between that weight's images and the weight-0.0 images of the class, all
    folds pooled (one fold's pool of a rare class holds ~5 images: too few for any test), and its permutation
    p-value. Columns weight, label, lora_effect_mmd, lora_effect_p; empty without a weight-0.0 pool."""
    rows = []
    weights = sorted({w for _, w in by_pool if w != 0.0})
    if not any(w == 0.0 for _, w in by_pool):
        return pd.DataFrame(columns=["weight", "label", "lora_effect_mmd", "lora_effect_p"])
    control = pd.concat([pool for (_, w), pool in by_pool.items() if w == 0.0]).drop_duplicates("id")
    x_control, y_control = stack_features(control, features, classes)
    for weight in weights:
        pool = pd.concat([p for (_, w), p in by_pool.items() if w == weight]).drop_duplicates("id")
        x_pool, y_pool = stack_features(pool, features, classes)
        for c, label in enumerate(classes):
            mmd, p = mmd_permutation_test(x_pool[y_pool == c], x_control[y_control == c], seed=c)
            rows.append({"weight": weight, "label": label, "lora_effect_mmd": mmd, "lora_effect_p": p})
    return pd.DataFrame(rows)
