"""The classifier model, the image pipeline, the feature cache, and exact == cached without augmentation.
In-process TF, no Ray. ~40 s on 2 cores."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ooc_ray.classify import run_trial, trial_specs
from ooc_ray.classify.features import FeatureCache, cache_key, extract_features, image_batches, n_views, train_views
from ooc_ray.classify.model import build_backbone, frozen, resolve_weights
from ooc_ray.classify.model import write_calibrated_weights
from ooc_ray.classify.tiny import make_tiny_experiment
from ooc_ray.config import from_dict
from ooc_ray.paths import ExperimentPaths


def raw_config(root, **classify):
    return {
        "name": "tiny", "results_dir": str(root),
        "data": {"source": "demo", "classes": ["good", "acceptable", "bad"], "group_column": "cell_line",
                 "demo": {"per_class": [10, 6, 4], "size": 40}},
        "folds": {"k": 2, "strategy": "stratified"},
        "sample": {"weights": [1.0]},
        "classify": {"backbone": "EfficientNetB0", "weights": "none", "input_size": 32, "epochs": 3,
                     "batch_size": 8, "ratios": [0.0, 0.5], "augment": [], **classify},
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify_model")
    cfg = from_dict(raw_config(root))
    paths = ExperimentPaths.of(cfg)
    manifest, synthetic = make_tiny_experiment(cfg, paths)
    weights = write_calibrated_weights(paths.models / "b0.weights.h5", "EfficientNetB0", 32, manifest["path"].tolist())
    return root, paths, manifest, synthetic, str(weights)


def test_resolve_weights(tmp_path):
    assert resolve_weights("imagenet") == "imagenet"
    assert resolve_weights("none") is None
    with pytest.raises(FileNotFoundError, match="classify.weights"):
        resolve_weights(str(tmp_path / "missing.weights.h5"))


def test_frozen_backbone_stays_in_inference_mode(tiny):
    # EfficientNet has stochastic-depth Dropout layers; a frozen backbone must not drop during fit.
    backbone = build_backbone("EfficientNetB0", "none", 32)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    layer = frozen(backbone)
    a = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(a, np.asarray(layer(x, training=True)), rtol=1e-6)
    np.testing.assert_allclose(a, np.asarray(backbone(x, training=False)), rtol=1e-6)
    assert not layer.trainable_weights


def test_image_pipeline_mixed_modes_and_formats(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(np.full((30, 40), 200, np.uint8), mode="L").save(grey)
    rgb = tmp_path / "rgb.png"
    Image.fromarray((np.zeros((48, 64, 3)) + [10, 20, 30]).astype(np.uint8), mode="RGB").save(rgb)
    batches = list(image_batches([str(grey), str(rgb)], 16, 8))
    assert len(batches) == 1
    x = np.asarray(batches[0])
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32
    assert np.allclose(x[0], x[0, :, :, :1], atol=1)  # grey -> three equal channels, 0..255 scale
    assert abs(x[0].mean() - 200) < 3 and np.allclose(x[1].mean(axis=(0, 1)), [10, 20, 30], atol=1)


def test_feature_cache_resumes_and_views(tiny, tmp_path):
    _, _, manifest, _, weights = tiny
    cc = from_dict(raw_config(tmp_path, weights=weights, augment=["flip", "contrast"], feature_views=3,
                              mode="cached")).classify
    assert n_views(cc) == 3 and train_views(cc) == [1, 2]
    directory = tmp_path / "features" / cache_key(cc)
    paths = manifest["path"].tolist()[:6]
    assert extract_features(cc, paths[:4], directory, chunk=2) == 4
    assert len(list(directory.glob("part-*.json"))) == 2
    assert extract_features(cc, paths, directory, chunk=2) == 2  # only the missing ones
    assert extract_features(cc, paths, directory) == 0
    feats = FeatureCache(directory).load(paths[::-1])
    assert feats.shape == (6, 3, 1280) and np.isfinite(feats).all()
    assert np.std(feats[:, 0], axis=0).mean() > 1e-3  # calibrated backbone: features differ between images
    assert not np.allclose(feats[:, 0], feats[:, 1])  # augmented view differs from the clean one
    clean = np.asarray(frozen(build_backbone("EfficientNetB0", weights, 32))(
        next(iter(image_batches(paths[::-1], 32, 8)))))
    np.testing.assert_allclose(feats[:, 0], clean, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no cached features"):
        FeatureCache(directory).load(manifest["path"].tolist()[6:7])
    # without augmentation there is one view, whatever feature_views says
    assert n_views(from_dict(raw_config(tmp_path, feature_views=4)).classify) == 1


def test_exact_and_cached_agree_without_augmentation(tiny):
    root, paths, manifest, synthetic, weights = tiny
    rows, histories, predictions = {}, {}, {}
    for mode in ("exact", "cached"):
        cfg = from_dict(raw_config(root, weights=weights, mode=mode))
        spec = next(s for s in trial_specs(cfg) if s["ratio"] == 0.5 and s["fold"] == 1)
        features_dir = None
        if mode == "cached":
            features_dir = paths.features / cache_key(cfg.classify)
            extract_features(cfg.classify, pd.concat([manifest["path"], synthetic["path"]]).tolist(), features_dir)
        reports = []
        rows[mode] = run_trial(cfg, paths, spec, manifest, synthetic, report=reports.append,
                               features_dir=features_dir)
        assert [r["epoch"] for r in reports] == [1, 2, 3]
        histories[mode] = pd.read_parquet(paths.history / f"{spec['trial_key']}.parquet")
        predictions[mode] = pd.read_parquet(paths.predictions / f"{spec['trial_key']}.parquet")
    exact, cached = rows["exact"], rows["cached"]
    assert exact["trial_key"] != cached["trial_key"]  # mode is part of the result key
    for k in ("n_train_real", "n_train_synthetic", "n_test", "fold", "ratio", "weight"):
        assert exact[k] == cached[k]
    assert exact["n_train_synthetic"] == round(0.5 * exact["n_train_real"])
    np.testing.assert_allclose(histories["exact"]["loss"], histories["cached"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(np.stack(predictions["exact"]["probs"]), np.stack(predictions["cached"]["probs"]),
                               atol=1e-4)
    assert (predictions["exact"]["pred_index"] == predictions["cached"]["pred_index"]).all()
    assert exact["accuracy"] == cached["accuracy"]
    # the loss moved: the comparison is not between two untrained models
    assert histories["exact"]["loss"].iloc[-1] < histories["exact"]["loss"].iloc[0]
    assert len(set(np.round(np.stack(predictions["exact"]["probs"])[:, 0], 4))) > 1


def test_augmented_views_do_not_depend_on_extraction_split(tiny, tmp_path):
    """The same image gets the same augmented views whether extracted alone, in another batch or another part."""
    _, _, manifest, _, weights = tiny
    cc = from_dict(raw_config(tmp_path, weights=weights, augment=["flip", "rotation", "contrast"],
                              feature_views=3, mode="cached")).classify
    paths = manifest["path"].tolist()[:5]
    one = tmp_path / "one"
    two = tmp_path / "two"
    extract_features(cc, paths, one)  # one part, one batch
    for p in reversed(paths):  # five parts, reversed order, each image alone
        extract_features(cc, [p], two, chunk=1)
    a, b = FeatureCache(one).load(paths), FeatureCache(two).load(paths)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not np.allclose(a[:, 1], a[:, 2])  # views 1 and 2 are different draws
