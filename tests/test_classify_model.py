"""The classifier model, the image pipeline, the feature cache, and exact == cached without augmentation.
In-process TF, no Ray. ~40 s on 2 cores."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from helpers import calibrated_experiment, classify_cfg, demo_experiment
from PIL import Image

from ooc_ray import keys
from ooc_ray.backbones import BackboneWeights, backbone_weights, top_block_prefixes
from ooc_ray.networks import build_backbone, built_weights, fine_tuned, frozen, write_calibrated_weights
from ooc_ray.classify import TrialContext, run_trial
from ooc_ray.images import load_image
from ooc_ray.feature_cache import FeatureCache, cache_dir, n_views, train_views
from ooc_ray.backend.tensorflow_ops import image_batches
from ooc_ray.features import extract_features
from ooc_ray.trainsets import plan_trials

pytestmark = pytest.mark.xdist_group("classify_model")  # one xdist worker builds the module's `tiny` fixture


def tiny_cfg(root, **classify):
    settings = {"epochs": 3, "augment": [], "mode": "exact", **classify}
    return classify_cfg(root, name="tiny", per_class=(10, 6, 4), **settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify_model")
    return calibrated_experiment(root, tiny_cfg(root))


def test_backbone_weights_resolve(tmp_path, tiny):
    _, paths, manifest, _, path = tiny
    cc = tiny_cfg(tmp_path).classify
    assert backbone_weights(cc, paths.models, manifest) == BackboneWeights(None, "none")
    file = backbone_weights(tiny_cfg(tmp_path, weights=path).classify, paths.models, manifest)
    assert file.value == path and file.identity.startswith("file-")
    calibrated = tiny_cfg(tmp_path, weights="calibrated").classify
    planned = backbone_weights(calibrated, tmp_path / "models", manifest)  # the report's way: nothing built
    assert not (tmp_path / "models").exists()
    built = built_weights(calibrated, tmp_path / "models", manifest)
    assert built == planned and built.value.endswith(f"{built.identity}.weights.h5")
    changed = manifest.assign(sha256=manifest["sha256"].where(manifest.index != 0, "0" * 64))
    assert backbone_weights(calibrated, tmp_path / "models", changed).identity != built.identity


def test_calibrated_weights_set_every_batchnorm_from_its_inputs(tiny):
    """Each BatchNorm's stored mean and variance are those of its own input over the calibration images, measured
    here independently: the saved weights loaded into a new model, the input of a BatchNorm at the stem, one
    mid-network and the top computed in inference mode, its moments taken with numpy."""
    import keras

    _, _, manifest, _, path = tiny
    images = np.stack([np.asarray(load_image(p, 32), np.float32) for p in manifest["path"][:32]])
    model = build_backbone("EfficientNetB0", path, 32)
    for name, source in (("stem_bn", "stem_conv"), ("block4a_bn", "block4a_dwconv"), ("top_bn", "top_conv")):
        acts = np.asarray(keras.Model(model.input, model.get_layer(source).output)(images, training=False))
        mean, var = acts.reshape(-1, acts.shape[-1]).mean(0), acts.reshape(-1, acts.shape[-1]).var(0)
        bn = model.get_layer(name)
        # Means near 0 (~1e-8 at the top) are compared on the scale of the spread, not relative to themselves.
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=0, atol=1e-3 * np.sqrt(var).max(), err_msg=name)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-2, atol=1e-4 * var.max(), err_msg=name)


def test_frozen_backbone_stays_in_inference_mode(tiny):
    # EfficientNet has stochastic-depth Dropout layers; a frozen backbone must not drop during fit.
    backbone = build_backbone("EfficientNetB0", None, 32)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    layer = frozen(backbone)
    a = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(a, np.asarray(layer(x, training=True)), rtol=1e-6)
    np.testing.assert_allclose(a, np.asarray(backbone(x, training=False)), rtol=1e-6)
    assert not layer.trainable_weights


def test_fine_tuned_backbone_trains_only_its_top_blocks():
    # train_backbone=2: block6*, block7* and top_conv learn; lower blocks and every BatchNorm keep their numbers.
    import keras

    backbone = build_backbone("EfficientNetB0", None, 32)
    layer = fine_tuned(backbone, 2)
    before = {w.path: np.array(w) for w in backbone.weights}
    model = keras.Sequential([keras.Input((32, 32, 3)), layer, keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, np.eye(2)[[0, 1] * 4], epochs=2, verbose=0)
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], np.array(w))}
    top = [w.path for w in backbone.weights
           if w.path.split("/")[0].startswith(("block6", "block7", "top_conv")) and "_bn" not in w.path]
    assert top_block_prefixes(2) == ("block6", "block7", "top_conv")
    assert top and {w.path for w in layer.trainable_weights} == set(top)  # the top blocks, BatchNorm excluded
    # Training moved them and nothing else (random-init gradients vanish in some SE layers, hence <=).
    assert "top_conv/kernel" in changed and changed <= set(top)


def test_small_cnn_learns_from_scratch(tmp_path):
    # The offline classifier must learn: on a demo set (3 classes, 15 training images per fold at 64 px)
    # SmallCNN trained from scratch in exact mode beats the majority class on held-out images by a wide margin.
    cfg = tiny_cfg(tmp_path, backbone="SmallCNN", weights="none", input_size=64, epochs=30, batch_size=4,
                   augment=["flip"], ratios=[0.0], synthetic_only=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, demo=dataclasses.replace(
        cfg.data.demo, per_class=(12, 12, 6), size=64)))
    paths, manifest, _ = demo_experiment(cfg)
    weights = backbone_weights(cfg.classify, paths.models, manifest)
    assert weights.value is None and weights.identity.startswith("none-")  # the architecture enters trial keys
    ctx = TrialContext(("good", "acceptable", "bad"), weights, keys.data_digest(manifest))
    for trial in plan_trials(cfg, manifest, None, ctx.weights.identity):
        row = run_trial(cfg, paths, trial, ctx)
        naive = (trial.test["label_index"] == trial.train["label_index"].mode()[0]).mean()
        assert row["backbone"] == "SmallCNN" and row["n_train_real"] == len(trial.train)
        print(f"fold {trial.spec.fold}: accuracy {row['accuracy']:.3f}, majority {naive:.3f}")
        assert row["accuracy"] >= naive + 0.3, (row["accuracy"], naive)


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


def test_feature_cache_resumes_views_and_is_keyed_by_content(tiny, tmp_path):
    _, _, manifest, _, path = tiny
    weights = BackboneWeights(path, "file-test")
    cc = tiny_cfg(tmp_path, weights=path, augment=["flip", "contrast"], feature_views=3, mode="cached").classify
    assert n_views(cc) == 3 and train_views(cc) == [1, 2]
    directory = cache_dir(cc, weights, tmp_path / "features")
    images = manifest[["path", "sha256"]].iloc[:6]
    assert extract_features(cc, weights, images.iloc[:4], directory, chunk=2) == 4
    assert len(list(directory.glob("part-*.json"))) == 2
    assert extract_features(cc, weights, images, directory, chunk=2) == 2  # only the missing ones
    assert extract_features(cc, weights, images, directory) == 0
    feats = FeatureCache(directory).load(images["sha256"][::-1])
    assert feats.shape == (6, 3, 1280) and np.isfinite(feats).all()
    assert np.std(feats[:, 0], axis=0).mean() > 1e-3  # calibrated backbone: features differ between images
    assert not np.allclose(feats[:, 0], feats[:, 1])  # augmented view differs from the clean one
    clean = np.asarray(frozen(build_backbone("EfficientNetB0", path, 32))(
        next(iter(image_batches(images["path"].tolist()[::-1], 32, 8)))))
    # Features of order 1 (every BatchNorm calibrated): other batch sizes move them by up to ~3e-4 (measured).
    np.testing.assert_allclose(feats[:, 0], clean, rtol=1e-4, atol=1e-3)
    with pytest.raises(KeyError, match="no cached features"):
        FeatureCache(directory).load(manifest["sha256"].iloc[6:7])
    # the same bytes elsewhere are the same entry; a file replaced in place is a new one
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(images["path"].iloc[0], "rb").read())
    moved = pd.DataFrame({"path": [str(copy)], "sha256": [images["sha256"].iloc[0]]})
    assert extract_features(cc, weights, moved, directory) == 0
    Image.new("RGB", (40, 40), (5, 5, 5)).save(copy)
    replaced = pd.DataFrame({"path": [str(copy)], "sha256": [keys.digest("new bytes", length=64)]})
    assert extract_features(cc, weights, replaced, directory) == 1
    # without augmentation there is one view, whatever feature_views says
    assert n_views(tiny_cfg(tmp_path, feature_views=4, mode="cached").classify) == 1


def test_damaged_cache_part_is_named_and_remade(tiny, tmp_path, capsys):
    _, _, manifest, _, path = tiny
    weights = BackboneWeights(path, "file-test")
    cc = tiny_cfg(tmp_path, weights=path).classify
    directory = tmp_path / "features"
    images = manifest[["path", "sha256"]].iloc[:3]
    extract_features(cc, weights, images, directory)
    (npy,) = directory.glob("part-*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    assert extract_features(cc, weights, images, directory) == 3
    assert f"damaged part {npy}" in capsys.readouterr().out


@pytest.mark.parametrize("backbone", ["EfficientNetB0", "DenseNet121"])  # rescales itself / a Rescaling in front
def test_exact_and_cached_agree_without_augmentation(tiny, backbone):
    root, paths, manifest, synthetic, path = tiny
    if backbone != "EfficientNetB0":
        path = str(write_calibrated_weights(paths.models / f"{backbone}.weights.h5", backbone, 32,
                                            manifest["path"].tolist()))
    weights = BackboneWeights(path, f"file-{backbone}")
    rows, histories, predictions = {}, {}, {}
    for mode in ("exact", "cached"):
        cfg = tiny_cfg(root, weights=path, mode=mode, backbone=backbone)
        trial = next(t for t in plan_trials(cfg, manifest, synthetic, weights.identity)
                     if t.spec.ratio == 0.5 and t.spec.fold == 1)
        features_dir = None
        if mode == "cached":
            features_dir = cache_dir(cfg.classify, weights, paths.features)
            extract_features(cfg.classify, weights, pd.concat([manifest, synthetic])[["path", "sha256"]],
                             features_dir)
        reports = []
        ctx = TrialContext(("good", "acceptable", "bad"), weights, keys.data_digest(manifest),
                           None if features_dir is None else str(features_dir))
        rows[mode] = run_trial(cfg, paths, trial, ctx, report=reports.append)
        assert [r["epoch"] for r in reports] == [1, 2, 3]
        histories[mode] = pd.read_parquet(paths.history / f"{trial.key}.parquet")
        predictions[mode] = pd.read_parquet(paths.predictions / f"{trial.key}.parquet")
    exact, cached = rows["exact"], rows["cached"]
    assert exact["trial_key"] != cached["trial_key"]  # mode is part of the result key
    for k in ("n_train_real", "n_train_synthetic", "n_test", "fold", "ratio", "weight"):
        assert exact[k] == cached[k]
    assert exact["n_train_synthetic"] == round(0.5 * exact["n_train_real"])
    # Float error only: the backbone batched differently moves its order-1 features by ~3e-4, the losses by
    # ~2e-4 relative (measured with every BatchNorm calibrated).
    np.testing.assert_allclose(histories["exact"]["loss"], histories["cached"]["loss"], rtol=1e-3)
    np.testing.assert_allclose(np.stack(predictions["exact"]["probs"]), np.stack(predictions["cached"]["probs"]),
                               atol=1e-3)
    assert (predictions["exact"]["pred_index"] == predictions["cached"]["pred_index"]).all()
    assert exact["accuracy"] == cached["accuracy"]
    # the loss moved: the comparison is not between two untrained models
    assert histories["exact"]["loss"].iloc[-1] < histories["exact"]["loss"].iloc[0]
    assert len(set(np.round(np.stack(predictions["exact"]["probs"])[:, 0], 4))) > 1


def test_a_reused_head_trains_exactly_as_a_fresh_one():
    """Cached mode keeps one compiled head per worker (train.fresh_head): after training another set, with
    another seed, it must start the next trial bit for bit where a newly built head starts."""
    import keras

    from ooc_ray.classify import train

    cc = tiny_cfg("/unused", epochs=4, dropout=0.3).classify
    rng = np.random.default_rng(0)
    sets = [(rng.normal(size=(n, 16)).astype(np.float32), np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)])
            for n in (21, 13)]

    def trained(x, y, seed):
        keras.utils.set_random_seed(seed)
        head = train.fresh_head(16, 3, cc, seed)
        loss = head.fit(x, y, batch_size=8, epochs=cc.epochs, verbose=0, shuffle=False).history["loss"]
        return head, loss, head.predict(x, batch_size=8, verbose=0)

    train.forget_compiled()
    first, loss_fresh, probs_fresh = trained(*sets[0], seed=3)
    other, loss_other, _ = trained(*sets[1], seed=7)  # moves weights, BatchNorm, Adam and the dropout's seed
    again, loss_again, probs_again = trained(*sets[0], seed=3)
    assert first is other is again  # one traced model, not three
    assert loss_again == loss_fresh and np.array_equal(probs_again, probs_fresh)
    assert loss_fresh[-1] < loss_fresh[0] and loss_other != loss_fresh  # it trained, and the sets differ
    # A seed's fresh state is kept once built (train._FRESH), the FRESH_KEPT most recent: one evicted by newer
    # seeds is built again, to the same numbers.
    for seed in range(100, 100 + train.FRESH_KEPT):
        trained(*sets[1], seed=seed)
    assert len(train._FRESH) == train.FRESH_KEPT and not any(s == 3 for _, s in train._FRESH)
    assert trained(*sets[0], seed=3)[1] == loss_fresh
    train.forget_compiled()
    assert trained(*sets[1], seed=7)[1] == loss_other  # the second trial, as a fresh head would have run it


def test_augmented_views_do_not_depend_on_extraction_split(tiny, tmp_path):
    """The same image gets the same augmented views whether extracted alone, in another batch or another part."""
    _, _, manifest, _, path = tiny
    weights = BackboneWeights(path, "file-test")
    cc = tiny_cfg(tmp_path, weights=path, augment=["flip", "rotation", "contrast"], feature_views=3,
                  mode="cached").classify
    images = manifest[["path", "sha256"]].iloc[:3]
    one, two = tmp_path / "one", tmp_path / "two"
    extract_features(cc, weights, images, one)  # one part, one batch
    for i in reversed(range(3)):  # three parts, reversed order, each image alone
        extract_features(cc, weights, images.iloc[[i]], two, chunk=1)
    a, b = FeatureCache(one).load(images["sha256"]), FeatureCache(two).load(images["sha256"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)  # order-1 features: batching moves them by ~5e-4
    assert not np.allclose(a[:, 1], a[:, 2])  # views 1 and 2 are different draws


def test_traced_augmentation_gives_the_eager_pixels(tiny, tmp_path):
    """The extractor augments through one traced function (8x faster); its views must be the very pixels an
    eager call of the same Keras layers gives with each layer's seed state set to (seed, layer), else the
    feature cache's key (which names no code path) would hide a change of numbers."""
    import tensorflow as tf

    from ooc_ray.networks import build_augmentation
    from ooc_ray.features import FeatureExtractor, image_seeds

    _, _, manifest, _, path = tiny
    names = ["flip", "rotation", "zoom", "contrast", "translation", "brightness"]
    cc = tiny_cfg(tmp_path, weights=path, augment=names, feature_views=2, mode="cached").classify
    extractor = FeatureExtractor(cc, BackboneWeights(path, "file-test"))
    eager = build_augmentation(names, cc.seed)
    eager(tf.zeros((1, 8, 8, 3)), training=True)
    states = [v for v in eager.variables if "seed_generator_state" in v.path]
    assert len(states) == len(names)
    images = tf.constant(np.stack([np.asarray(load_image(p, cc.input_size), np.float32)
                                  for p in manifest["path"].iloc[:4]]))
    for image, seed in zip(images, image_seeds(manifest["sha256"].iloc[:4], cc.seed)):
        for j, state in enumerate(states):
            state.assign(np.array([seed, j], dtype=state.dtype))
        expected = eager(image[None], training=True)[0].numpy()
        assert not np.array_equal(expected, image.numpy())
        np.testing.assert_array_equal(extractor._augment(image, seed).numpy(), expected)


def test_a_feature_task_given_a_gpu_tf_cannot_see_fails_naming_node_and_request(tiny, tmp_path):
    """The function each Ray feature task runs: with classify.gpus_per_trial > 0 and no GPU visible to
    TensorFlow (plain `tensorflow` has no CUDA libraries) it raises before extracting anything."""
    from ooc_ray.errors import ResourceError
    from ooc_ray.features import extract_task
    from ooc_ray.gpu import node_name

    _, _, manifest, _, path = tiny
    cc = tiny_cfg(tmp_path, weights=path, gpus_per_trial=1).classify
    weights = BackboneWeights(path, "file-test")
    directory = cache_dir(cc, weights, tmp_path / "features")
    with pytest.raises(ResourceError, match=f"classify.gpus_per_trial=1: node {node_name()} was given a GPU but "
                                            "TensorFlow .* sees none"):
        extract_task(cc, weights, manifest[["path", "sha256"]].iloc[:2], str(directory))
    assert not list(directory.glob("part-*"))


def test_a_calibration_task_given_a_gpu_tf_cannot_see_fails_naming_node_and_request(tiny, tmp_path):
    """The calibrated weights' Ray task checks its GPU as the feature tasks do, before it calibrates the backbone
    (on a CPU, for B7 at 600 px, for hours) and writes the weights every later key holds."""
    from ooc_ray.errors import ResourceError
    from ooc_ray.features import weights_task
    from ooc_ray.gpu import node_name

    _, _, manifest, _, _ = tiny
    cc = tiny_cfg(tmp_path, weights="calibrated", gpus_per_trial=1).classify
    with pytest.raises(ResourceError, match=f"calibrated weights: classify.gpus_per_trial=1: node {node_name()} was "
                                            "given a GPU but TensorFlow .* sees none"):
        weights_task(cc, tmp_path / "models", manifest)
    assert not (tmp_path / "models").exists()


def test_cached_training_reads_the_augmented_views_not_the_clean_one(tiny, tmp_path):
    """A cache whose view 0 of every training image is poisoned (NaN) and whose augmented views 1-3 carry the
    classes: a cached trial trains on one augmented view per image per epoch (train_views), so its losses stay
    finite and fall; held-out images are read at view 0, clean. Training on view 0 would turn every loss NaN."""
    from ooc_ray.paths import ExperimentPaths

    root, _, manifest, synthetic, _ = tiny
    cfg = tiny_cfg(root, mode="cached", augment=["flip"], feature_views=4, weights="random", epochs=8, lr=0.05)
    weights = BackboneWeights(None, "none")
    trial = next(t for t in plan_trials(cfg, manifest, synthetic, weights.identity)
                 if t.spec.ratio == 0 and t.spec.fold == 1)
    assert train_views(cfg.classify) == [1, 2, 3]
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))

    def features(labels, views):
        return (centres[np.asarray(labels)][:, None, :] + rng.normal(0, 0.3, (len(labels), views, 8))).astype(np.float32)

    cache = FeatureCache(tmp_path / "cache")
    train = features(trial.train["label_index"], 4)
    train[:, 0] = np.nan
    cache.write_part(trial.train["sha256"].tolist(), train)
    cache.write_part(trial.test["sha256"].tolist(), features(trial.test["label_index"], 4))
    paths = ExperimentPaths(tmp_path / "results")
    ctx = TrialContext(("good", "acceptable", "bad"), weights, keys.data_digest(manifest), str(tmp_path / "cache"))
    row = run_trial(cfg, paths, trial, ctx)
    losses = pd.read_parquet(paths.trial_history(trial.key))["loss"]
    assert np.isfinite(losses).all() and losses.iloc[-1] < losses.iloc[0]
    import keras
    import tensorflow as tf
    assert row["versions"] == f"keras {keras.__version__}, tensorflow {tf.__version__}, numpy {np.__version__}"
    assert row["accuracy"] > 0.5  # three well-separated classes, read at their clean held-out view


# Random ops that keep state in their kernels (TensorFlow's raw_ops): tf.random.set_seed clears the kernel cache to
# restart them; networks.reseed does not, so no trial may use one.
STATEFUL_RANDOM_OPS = {"RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
                       "ParameterizedTruncatedNormal", "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoisson",
                       "RandomPoissonV2", "RandomCrop", "StatefulUniform", "StatefulUniformInt",
                       "StatefulUniformFullInt", "StatefulStandardNormalV2", "StatefulTruncatedNormal",
                       "StatefulRandomBinomial", "RngSkip", "RngReadAndSkip"}


@pytest.mark.parametrize("settings", [
    {"backbone": "SmallCNN", "weights": "none", "augment": ["flip", "rotation"]},  # from scratch, augmented
    {"weights": "calibrated", "mixing": "loss_weighted"},  # frozen EfficientNetB0, the loss-weighted wrapper
    {"backbone": "SmallCNN", "weights": "none", "mixing": "split_bn"},  # every BatchNorm split
])
def test_a_reused_exact_model_trains_exactly_as_a_fresh_one(tiny, tmp_path, settings):
    """Exact mode keeps one compiled model per architecture in a worker (train.reuse_compiled): a trial run after
    another trial (other fold, other seed, other data) gives the losses and probabilities, to the bit, that the
    same trial gave on a freshly built model."""
    from ooc_ray.classify import train
    from ooc_ray.networks import built_weights
    from ooc_ray.paths import ExperimentPaths

    root, _, manifest, synthetic, _ = tiny
    cfg = tiny_cfg(root, mode="exact", epochs=2, **settings)
    weights = built_weights(cfg.classify, root / "models", manifest)
    trials = {(t.spec.fold, t.spec.ratio): t for t in plan_trials(cfg, manifest, synthetic, weights.identity)}
    ctx = TrialContext(("good", "acceptable", "bad"), weights, keys.data_digest(manifest))

    def run(trial, where):
        paths = ExperimentPaths(tmp_path / where)
        run_trial(cfg, paths, trial, ctx)
        return (pd.read_parquet(paths.trial_history(trial.key))["loss"].tolist(),
                np.stack(pd.read_parquet(paths.trial_predictions(trial.key))["probs"]))

    train.forget_compiled()
    first = run(trials[(1, 0.5)], "first")
    other = run(trials[(0, 0.5)], "other")
    n_compiled = len(train._COMPILED)
    again = run(trials[(1, 0.5)], "again")
    assert len(train._COMPILED) == n_compiled  # no new model compiled: the first one was reused
    assert again[0] == first[0] and np.array_equal(again[1], first[1])
    assert first[0] != other[0]  # the two trials differ, so the reset had something to undo
    # A real-only trial of the same fold in between (it trains the model itself, never a loss-weighted wrapper),
    # as Tune workers run a grid's arms one after another: the next trial is still the fresh model's.
    run(trials[(1, 0.0)], "between")
    after = run(trials[(1, 0.5)], "after")
    assert after[0] == first[0] and np.array_equal(after[1], first[1])
    # What networks.reseed relies on (it keeps the kernel cache tf.random.set_seed clears to restart stateful
    # random kernels): these trials' functions (the models' alive, so theirs are listed) draw only with stateless
    # ops and explicitly seeded datasets.
    types = traced_op_types()
    assert {"ShuffleDatasetV3", "Conv2DBackpropFilter"} <= types and not types & STATEFUL_RANDOM_OPS
    train.forget_compiled()


def traced_op_types() -> set[str]:
    """The op types of every function TensorFlow traced in this process (trials, their tf.data streams)."""
    from tensorflow.python.eager import context

    ctx = context.context()
    return {node.op for name in ctx.list_function_names() for node in ctx.get_function_def(name).node_def}


def test_a_trial_whose_loss_turns_nan_fails_naming_it_and_writes_nothing(tiny, tmp_path):
    """Keras trains on through a NaN loss, and argmax of NaN probabilities is class 0 for every image: the trial
    would have reported class 0's share of the held-out images as its accuracy. An lr that overflows the head
    (1e38: float32 tops out at 3.4e38) fails the trial naming it and the epoch; none of its files is written.
    The same trial at lr 0.05 trains (the data is not what fails)."""
    from ooc_ray.errors import StageError
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.trial_files import trial_outputs

    root, _, manifest, synthetic, _ = tiny
    weights = BackboneWeights(None, "none")
    rng = np.random.default_rng(0)
    cache = FeatureCache(tmp_path / "cache")
    cache.write_part(manifest["sha256"].tolist(), rng.normal(0, 1, (len(manifest), 1, 8)).astype(np.float32))
    ctx = TrialContext(("good", "acceptable", "bad"), weights, keys.data_digest(manifest), str(tmp_path / "cache"))
    for lr, paths in ((1e38, ExperimentPaths(tmp_path / "overflow")), (0.05, ExperimentPaths(tmp_path / "fine"))):
        cfg = tiny_cfg(root, mode="cached", weights="random", epochs=3, lr=lr)
        trial = next(t for t in plan_trials(cfg, manifest, synthetic, weights.identity)
                     if t.spec.ratio == 0 and t.spec.fold == 1)
        if lr == 1e38:
            with pytest.raises(StageError, match=rf"classify: trial {trial.key} \(fold 1, real\): its loss became "
                                                 r"nan at epoch \d; nothing written \(lower classify.lr=1e\+38\?\)"):
                run_trial(cfg, paths, trial, ctx)
            assert not any(p.exists() for p in trial_outputs(paths, trial.key))
        else:
            assert np.isfinite(run_trial(cfg, paths, trial, ctx)["accuracy"])


def test_a_backbone_giving_nan_features_fails_naming_an_image_and_caches_nothing(tiny, tmp_path):
    """A weights file with a NaN kernel (a broken download, an fp16 overflow when it was made): its features
    would be cached for good and every later trial would train and score on them. Extraction fails naming the
    backbone and an image; no part of the cache is written. The file's NaN-free original extracts (the images
    are not what fails)."""
    from ooc_ray.errors import StageError

    _, _, manifest, _, path = tiny
    model = build_backbone("EfficientNetB0", path, 32)
    kernel = next(v for v in model.weights if len(v.shape) == 4)
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    broken = str(tmp_path / "nan.weights.h5")
    model.save_weights(broken)
    cc = tiny_cfg(tmp_path, weights=broken).classify
    images = manifest[["path", "sha256"]].iloc[:3]
    with pytest.raises(StageError, match=r"features: EfficientNetB0 \(file-nan\) gave NaN/inf features for 3 "
                                         r"image\(s\), e\.g\. (\S+); nothing cached for them") as failed:
        extract_features(cc, BackboneWeights(broken, "file-nan"), images, tmp_path / "broken")
    assert str(failed.value).split("e.g. ")[1].split(";")[0] in set(images["path"])
    assert not list((tmp_path / "broken").glob("part-*"))
    assert extract_features(cc, BackboneWeights(path, "file-test"), images, tmp_path / "fine") == 3
