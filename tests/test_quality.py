"""Synthetic-quality measures on features whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from ooc_ray.load import from_dict
from ooc_ray.measures import class_quality, kid, nearest_real


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
    # The distribution measures see the same failure: half of the bad pool lies outside the real bad images'
    # neighbourhoods (precision <= 0.5, density ~halved: 0.52 vs 0.86), its Gaussian is far off (the shifted
    # mean alone adds 8 x 1.5^2 = 18); recall and coverage stay high, as the right half still covers the class.
    assert bad["precision"] <= 0.5 < 0.8 <= good["precision"] and bad["density"] < 0.7 * good["density"]
    assert bad["fd"] > 18 > 10 * good["fd"] and min(bad["recall"], bad["coverage"], good["coverage"]) > 0.8
    assert len(scores) == 40 and scores["id"].is_unique
    conf = scores.set_index("id")["real_confidence"]
    assert conf[[f"s{i}" for i in range(20, 30)]].max() < 0.5 < conf[[f"s{i}" for i in range(30, 40)]].min()
    # Per image, the failed half lies in no real "bad" ball (precision 0, density 0): the same verdict as the
    # class's precision, image by image, so the filter can drop exactly them (quality.filter_measure).
    inside = scores.set_index("id")[["precision", "density"]]
    assert (inside.loc[[f"s{i}" for i in range(20, 30)]] == 0).all().all()
    assert inside.loc[[f"s{i}" for i in range(20, 40)], "precision"].mean() == pytest.approx(bad["precision"])
    assert inside.loc[[f"s{i}" for i in range(20, 40)], "density"].mean() == pytest.approx(bad["density"])


def test_classify_drops_low_confidence_synthetic_images(tmp_path):
    from ooc_ray import keys
    from ooc_ray.errors import MissingInputError, TrainsetError
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.trainsets import draw_table

    synthetic = pd.DataFrame({"id": ["s0", "s1", "s2"], "path": ["a", "b", "c"], "label": "good", "fold": 0,
                              "weight": 1.0})
    for threshold, expected in [(0.0, ["s0", "s1", "s2"]), (0.5, ["s0", "s2"])]:
        cfg = from_dict({"results_dir": str(tmp_path), "quality": {"filter_min_confidence": threshold}})
        paths = ExperimentPaths.of(cfg)
        paths.root.mkdir(parents=True, exist_ok=True)
        synthetic.assign(sample_settings=keys.sample_settings(cfg)).to_parquet(paths.synthetic_table)
        if threshold:
            with pytest.raises(MissingInputError, match="quality stage"):
                draw_table(cfg, paths)
            pd.DataFrame({"id": ["s0", "s1", "s2"], "real_confidence": [0.9, 0.2, 0.5]}).to_parquet(
                paths.synthetic_scores)
        assert draw_table(cfg, paths)["id"].tolist() == expected
    # Another per-image score: inside the real k-NN balls or not; an image without one is named, never dropped.
    cfg = from_dict({"results_dir": str(tmp_path), "quality": {"filter_min_confidence": 1.0,
                                                               "filter_measure": "precision"}})
    pd.DataFrame({"id": ["s0", "s1", "s2"], "real_confidence": [0.9, 0.2, 0.5],
                  "precision": [0.0, 1.0, 1.0]}).to_parquet(paths.synthetic_scores)
    assert draw_table(cfg, paths)["id"].tolist() == ["s1", "s2"]
    pd.DataFrame({"id": ["s0", "s1", "s2"], "real_confidence": [0.9, 0.2, 0.5],
                  "precision": [0.0, 1.0, np.nan]}).to_parquet(paths.synthetic_scores)
    with pytest.raises(TrainsetError, match="filter_measure precision: 1 synthetic images have no score"):
        draw_table(cfg, paths)


def test_re_used_scores_say_what_the_current_filter_keeps(tmp_path):
    """The filter's settings are outside the quality tables' key (they change no score), so scores are re-used when
    only the filter changes; their `keep` column is then rewritten for the filter now set."""
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.quality import _refresh_keep

    cfg = from_dict({"results_dir": str(tmp_path), "quality": {"filter_min_confidence": 1.0,
                                                               "filter_measure": "precision"}})
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    pd.DataFrame({"id": ["s0", "s1"], "real_confidence": [0.9, 0.2], "precision": [0.0, 1.0],
                  "keep": [True, False]}).to_parquet(paths.synthetic_scores)  # what real_confidence >= 0.5 kept
    _refresh_keep(cfg, paths)
    assert pd.read_parquet(paths.synthetic_scores)["keep"].tolist() == [False, True]


def _write(folder, name, array):
    from PIL import Image

    path = folder / f"{name}.png"
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L").save(path)
    return str(path)


def test_image_statistics_of_a_uniform_image_by_hand(tmp_path):
    """A flat grey image: pooled values and mean = its grey level, one full histogram bin, no edges, no power
    in any frequency band, std 0 (each worked out from the definition, not from the code)."""
    from ooc_ray.image_statistics import HISTOGRAM_BINS, POOLED, SPECTRUM_BANDS, statistics_of

    level = 100 / 255  # bin int(100 / 255 * 16) = 6
    x = statistics_of(_write(tmp_path, "flat", np.full((40, 40), 100.0)), 32)
    expected_hist = np.zeros(HISTOGRAM_BINS)
    expected_hist[6] = 1.0
    expected = np.concatenate([np.full(POOLED * POOLED, level), expected_hist, np.zeros(4),
                               np.zeros(SPECTRUM_BANDS), [level, 0.0]])
    np.testing.assert_allclose(x, expected, atol=1e-9)


def test_image_statistics_tell_demo_cells_from_noise_and_classes_apart(tmp_path):
    """On the project's demo drawing: KID of a noise pool to the real images is far above that of other real
    images of the same class, and a linear probe on the statistics sorts held-out images into the three
    classes (what a random-weight backbone could not do)."""
    from ooc_ray.config import DemoDataConfig
    from ooc_ray.demo_data import write_demo_dataset
    from ooc_ray.image_statistics import image_statistics
    from ooc_ray.io import sha256_file
    from ooc_ray.measures import linear_probe

    csv = write_demo_dataset(tmp_path / "demo", DemoDataConfig(per_class=(24, 24, 24), size=64))
    real = pd.read_csv(csv)
    real["path"] = [str(csv.parent / f) for f in real["file"]]
    rng = np.random.default_rng(0)
    noise = [_write(tmp_path, f"noise{i}", rng.normal(115, 40, (48, 64))) for i in range(24)]
    images = pd.concat([real[["path", "label"]], pd.DataFrame({"path": noise, "label": "noise"})],
                       ignore_index=True)
    images["sha256"] = [sha256_file(p) for p in images["path"]]
    feats = image_statistics(images, images[images["label"] != "noise"], size=32)
    x = {label: np.stack([feats[d] for d in rows["sha256"]]) for label, rows in images.groupby("label")}
    same, _ = kid(x["good"][:12], x["good"][12:], subsets=50, subset_size=12)
    to_noise, _ = kid(x["good"][:12], x["noise"][:12], subsets=50, subset_size=12)
    assert to_noise > 20 * max(same, 0.05)
    classes = ["good", "acceptable", "bad"]
    train_x = np.vstack([x[c][::2] for c in classes])
    train_y = np.repeat(np.arange(3), [len(x[c][::2]) for c in classes])
    test_x = np.vstack([x[c][1::2] for c in classes])
    test_y = np.repeat(np.arange(3), [len(x[c][1::2]) for c in classes])
    accuracy = (linear_probe(train_x, train_y, 3)(test_x).argmax(1) == test_y).mean()
    assert accuracy > 0.8  # chance 1/3


def test_group_scale_keeps_a_never_reached_bin_finite():
    """A histogram bin the reference never reaches (std 0) is scaled like its group, not divided by ~0; every
    group ends with the same total variance over the reference."""
    from ooc_ray.image_statistics import GROUPS, group_scale

    rng = np.random.default_rng(3)
    dims = sum(length for _, length in GROUPS)
    reference = rng.normal(size=(50, dims)) * rng.uniform(0.1, 10, dims)
    reference[:, 16] = 0.25  # first histogram bin: constant
    scaled = (reference - reference.mean(0)) / group_scale(reference)
    assert np.isfinite(group_scale(reference)).all() and group_scale(reference)[16] > 0.01
    start, totals = 0, []
    for _, length in GROUPS:
        totals.append((scaled[:, start:start + length].std(0) ** 2).sum())
        start += length
    np.testing.assert_allclose(totals, dims / len(GROUPS))


def test_kid_to_control_is_small_for_the_same_pool_and_large_for_a_moved_class():
    """kid_to_weight0: per class, KID between a pool and the weight-0.0 pool; a class the LoRA moved stands out."""
    from ooc_ray.measures import kid_to_control

    rng = np.random.default_rng(4)
    classes = ["good", "bad"]

    def pool(prefix, shift_bad):
        names = [f"{prefix}{i}" for i in range(40)]
        labels = ["good"] * 20 + ["bad"] * 20
        feats = {n: rng.normal(size=8) + (shift_bad if label == "bad" else 0.0) for n, label in zip(names, labels)}
        return pd.DataFrame({"sha256": names, "label": labels}), feats

    control, f0 = pool("c", 0.0)
    moved, f1 = pool("m", 2.0)
    cfg = from_dict({"quality": {"kid_subsets": 20, "kid_subset_size": 20}})
    good, bad = kid_to_control(moved, control, {**f0, **f1}, classes, cfg.quality)
    assert bad > 20 * abs(good), (good, bad)


def test_quality_table_measures_each_pool_against_its_folds_weight0_pool():
    """_score_pools: kid_to_weight0 is empty for the weight-0.0 pool itself and, for weight 1.0, large for the
    class whose LoRA moved its images and small for the class it left as the base drew it."""
    from ooc_ray.quality import _score_pools

    rng = np.random.default_rng(5)
    rows, feats = [], {}
    for fold in (0, 1):
        for label, index in (("good", 0), ("bad", 1)):
            for i in range(12):
                name = f"r{fold}{label}{i}"
                rows.append({"id": name, "sha256": name, "label": label, "label_index": index, "fold": fold})
                feats[name] = rng.normal(size=6) + 3 * index
    manifest = pd.DataFrame(rows)
    pools = []
    for fold in (0, 1):
        for weight in (1.0, 0.0):
            for label in ("good", "bad"):
                for i in range(12):
                    name = f"s{fold}{weight}{label}{i}"
                    pools.append({"id": name, "sha256": name, "label": label, "fold": fold, "weight": weight})
                    moved = 4.0 if (label == "bad" and weight == 1.0) else 0.0  # only bad's LoRA does anything
                    feats[name] = rng.normal(size=6) + moved
    cfg = from_dict({"quality": {"kid_subsets": 20, "kid_subset_size": 12}})
    quality, _ = _score_pools(cfg, manifest, pd.DataFrame(pools), feats)
    table = quality.set_index(["fold", "weight", "label"])["kid_to_weight0"]
    assert table.xs(0.0, level="weight").isna().all()
    for fold in (0, 1):
        assert table[fold, 1.0, "bad"] > 20 * abs(table[fold, 1.0, "good"])


def test_mmd_permutation_test_against_exact_enumeration():
    """3 vs 3 one-dimensional points: the statistic from a pairwise loop over the kernel (x*y/1 + 1)^3, and the
    p-value against all 20 ways to split the 6 points (random permutations estimate that fraction)."""
    from itertools import combinations

    from ooc_ray.measures import mmd_permutation_test

    x, y = np.array([[0.1], [0.3], [-0.2]]), np.array([[1.5], [1.1], [1.9]])

    def by_hand(a, b):
        k = lambda u, v: (u * v + 1.0) ** 3  # noqa: E731 (d = 1)
        within = lambda s: sum(k(s[i], s[j]) for i in range(3) for j in range(3) if i != j) / 6  # noqa: E731
        return within(a) + within(b) - 2 * sum(k(u, v) for u in a for v in b) / 9

    points = np.concatenate([x[:, 0], y[:, 0]])
    observed = by_hand(x[:, 0], y[:, 0])
    splits = [by_hand(points[list(c)], points[[i for i in range(6) if i not in c]]) for c in combinations(range(6), 3)]
    exact_p = np.mean([s >= observed - 1e-12 for s in splits])  # 2 of 20: the split and its mirror
    mmd, p = mmd_permutation_test(x, y, permutations=4000, seed=1)
    assert mmd == pytest.approx(observed)
    assert p == pytest.approx(exact_p, abs=0.02)
    rng = np.random.default_rng(6)
    same = [mmd_permutation_test(rng.normal(size=(15, 4)), rng.normal(size=(15, 4)), 200, seed=s)[1] for s in range(20)]
    assert np.mean(np.array(same) < 0.05) <= 0.2  # a true null is rarely rejected


def test_image_statistics_identity_follows_the_reference_images(tmp_path):
    """The statistics are standardised on the manifest's images: a changed manifest (one image's bytes) changes
    the features' identity, and so every quality and search key built on it; the backbone's does not need to."""
    from ooc_ray.quality import features_identity

    cfg = from_dict({"quality": {"features": "image_statistics"}, "sample": {"resolution": 32}})
    manifest = pd.DataFrame({"id": ["a", "b"], "sha256": ["1", "2"]})
    changed = manifest.assign(sha256=["1", "3"])
    one = features_identity(cfg, None, None, manifest)
    assert one.startswith("image-statistics-v1-32px-") and one == features_identity(cfg, None, None, manifest.iloc[::-1])
    assert one != features_identity(cfg, None, None, changed)


def test_the_quality_stage_refuses_a_random_initialisation_when_run_by_hand(tmp_path):
    """`ooc-ray quality` runs with quality.enabled false, where the config's own check does not look: a
    backbone left at its random initialisation (SmallCNN, weights none) is refused before anything is read
    (no manifest here: the data stage has not run), naming quality.features."""
    from ooc_ray.errors import ConfigError
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.quality import run_quality

    cfg = from_dict({"results_dir": str(tmp_path), "quality": {"enabled": False},
                     "classify": {"backbone": "SmallCNN", "weights": "none", "mode": "exact"}})
    with pytest.raises(ConfigError, match="quality.features: backbone measures on classify.backbone SmallCNN's"):
        run_quality(cfg, ExperimentPaths.of(cfg))
