"""Synthetic-quality measures on features whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from ooc_ray.config import from_dict
from ooc_ray.quality import class_quality, kid, nearest_real


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, _ = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=100)
    far, _ = kid(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 < shifted < far
    assert np.isnan(kid(a[:1], b[:1])[0])  # fewer than 2 images: undefined, not a crash


def test_nearest_real_flags_copies():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(50, 8))
    fake = np.vstack([real[:5] * 1.0001, rng.normal(size=(20, 8))])  # 5 near-copies, 20 new
    dist, idx, threshold = nearest_real(real, fake)
    assert (idx[:5] == np.arange(5)).all()
    assert (dist[:5] < threshold).all() and (dist[5:] >= threshold).mean() > 0.8


def test_class_quality_known_answers():
    rng = np.random.default_rng(2)
    classes = ["good", "bad"]
    centres = {"good": np.zeros(8), "bad": np.full(8, 3.0)}

    def frame(prefix, labels):
        names = [f"{prefix}{i}" for i in range(len(labels))]
        return pd.DataFrame({"id": names, "path": names, "sha256": names, "label": labels})

    train = frame("r", ["good"] * 30 + ["bad"] * 30)
    test = frame("t", ["good"] * 10 + ["bad"] * 10)
    syn = frame("s", ["good"] * 20 + ["bad"] * 20)
    feats = {}
    for df in (train, test, syn):
        for p, label in zip(df["path"], df["label"]):
            feats[p] = centres[label] + rng.normal(scale=0.5, size=8)
    # synthetic "bad" images that look like "good": the generator failed that class
    for p in syn["path"][20:30]:
        feats[p] = centres["good"] + rng.normal(scale=0.5, size=8)
    cfg = from_dict({"quality": {"kid_subsets": 5, "kid_subset_size": 15}})
    table, scores = class_quality(train, test, syn, feats, classes, cfg.quality)
    good, bad = table.set_index("label").loc["good"], table.set_index("label").loc["bad"]
    assert good["kid"] < bad["kid"]  # half the bad pool is off-distribution
    # the pool labels some good-looking images "bad": real bad images are still found, some good are lost
    assert bad["cas_recall"] == pytest.approx(1.0) and 0.5 <= good["cas_recall"] < 1.0
    assert len(scores) == 40 and scores["id"].is_unique
    conf = scores.set_index("id")["real_confidence"]
    assert conf[[f"s{i}" for i in range(20, 30)]].max() < 0.5 < conf[[f"s{i}" for i in range(30, 40)]].min()


def test_classify_drops_low_confidence_synthetic_images(tmp_path):
    from ooc_ray.errors import MissingInputError
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.protocol import draw_table

    synthetic = pd.DataFrame({"id": ["s0", "s1", "s2"], "path": ["a", "b", "c"], "label": "good", "fold": 0,
                              "weight": 1.0})
    for threshold, expected in [(0.0, ["s0", "s1", "s2"]), (0.5, ["s0", "s2"])]:
        cfg = from_dict({"results_dir": str(tmp_path), "quality": {"filter_min_confidence": threshold}})
        paths = ExperimentPaths.of(cfg)
        paths.root.mkdir(parents=True, exist_ok=True)
        synthetic.to_parquet(paths.synthetic_table)
        if threshold:
            with pytest.raises(MissingInputError, match="quality stage"):
                draw_table(cfg, paths)
            pd.DataFrame({"id": ["s0", "s1", "s2"], "real_confidence": [0.9, 0.2, 0.5]}).to_parquet(
                paths.synthetic_scores)
        assert draw_table(cfg, paths)["id"].tolist() == expected
