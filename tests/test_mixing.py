"""Mixing strategies (classify.mixing) on a tiny demo set with real Keras training: each one reproduces real only
where it must (synthetic loss weight 0, replacement probability 0), differs where it must, and its mechanism
checked against an independent computation (the weighted loss, class-preserving swaps, split statistics)."""
import numpy as np
import pandas as pd
import pytest
from helpers import calibrated_experiment, classify_cfg

from ooc_ray import keys
from ooc_ray.backbones import BackboneWeights
from ooc_ray.classify import TrialContext, run_trial
from ooc_ray.backend.tensorflow_ops import _Streams
from ooc_ray.classify.train import _feed
from ooc_ray.feature_cache import cache_dir
from ooc_ray.features import extract_features
from ooc_ray.trainsets import plan_trials

pytestmark = pytest.mark.xdist_group("mixing")
CLASSES = ("good", "acceptable", "bad")


def mixing_cfg(root, **classify):
    settings = {"epochs": 3, "augment": [], "mode": "cached", "ratios": [0.0, 1.0], "synthetic_only": False,
                **classify}
    return classify_cfg(root, name="mixing", per_class=(10, 6, 4), **settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    return calibrated_experiment(root, mixing_cfg(root))


def run(tiny, fold: int = 1, ratio: float = 1.0, **classify):
    """(summary row, losses per epoch, test probabilities) of one trial of `fold` at `ratio`."""
    root, paths, manifest, synthetic, path = tiny
    settings = {"weights": path, **classify}
    cfg = mixing_cfg(root, **settings)
    weights = BackboneWeights(None, "none") if settings["weights"] == "none" else BackboneWeights(path, "file-b0")
    trial = next(t for t in plan_trials(cfg, manifest, synthetic, weights.identity)
                 if t.spec.ratio == ratio and t.spec.fold == fold)
    features_dir = None
    if cfg.classify.mode == "cached":
        features_dir = cache_dir(cfg.classify, weights, paths.features)
        extract_features(cfg.classify, weights, pd.concat([manifest, synthetic])[["path", "sha256"]], features_dir)
    ctx = TrialContext(CLASSES, weights, keys.data_digest(manifest), None if features_dir is None else str(features_dir))
    row = run_trial(cfg, paths, trial, ctx)
    history = pd.read_parquet(paths.history / f"{trial.key}.parquet")["loss"].tolist()
    probs = np.stack(pd.read_parquet(paths.predictions / f"{trial.key}.parquet")["probs"])
    return row, history, probs


@pytest.mark.parametrize("mode", ["cached", "exact"])
def test_zero_synthetic_weight_and_zero_replacement_reproduce_real_only_exactly(tiny, mode):
    real = run(tiny, ratio=0.0, mode=mode)
    assert real[0]["mixing"] == "concat" and real[0]["n_train_synthetic"] == 0
    for strategy, setting in (("loss_weighted", {"synthetic_loss_weight": 0.0}), ("replace", {"replace_probability": 0.0})):
        row, history, probs = run(tiny, mode=mode, mixing=strategy, **setting)
        assert row["mixing"] == strategy and row["n_train_synthetic"] == row["n_train_real"]  # the arm has them
        assert history == real[1] and np.array_equal(probs, real[2]), strategy  # and never trains on them
    if mode == "exact":  # ~8 s a trial here: the settings that train on synthetic images are checked cached
        return
    # With the setting on, the same arm trains differently: the strategy, not only its zero, is exercised.
    for strategy, setting in (("loss_weighted", {"synthetic_loss_weight": 0.5}), ("replace", {"replace_probability": 0.5})):
        _, history, probs = run(tiny, mode=mode, mixing=strategy, **setting)
        assert history != real[1] and not np.allclose(probs, real[2]), strategy


def test_replacement_swaps_a_share_p_and_keeps_each_class(tiny):
    root, paths, manifest, synthetic, path = tiny
    cfg = mixing_cfg(root, mixing="replace", replace_probability=0.3)
    trial = next(t for t in plan_trials(cfg, manifest, synthetic, "w") if t.spec.ratio == 1.0 and t.spec.fold == 0)
    streams = _Streams(_feed(cfg.classify, trial, 3, seed=5))
    labels, source = trial.train["label_index"].to_numpy(), trial.train["source"].to_numpy()
    real_counts = np.bincount(labels[source == "real"], minlength=3)
    stream, swapped = streams.primary(), []
    for _ in range(200):  # epochs: each iteration re-draws
        epoch = np.array([int(i) for i in stream])
        assert len(epoch) == real_counts.sum()  # real-only's steps
        assert (np.bincount(labels[epoch], minlength=3) == real_counts).all()  # a swap keeps the class
        swapped.append((source[epoch] == "synthetic").mean())
    assert abs(np.mean(swapped) - 0.3) < 0.02  # 200 x 10 draws: sd of the mean ~0.01
    picked = {int(i) for _ in range(20) for i in stream if source[int(i)] == "synthetic"}
    assert len(picked) == (source == "synthetic").sum()  # every synthetic image gets drawn


def test_loss_weighted_trains_on_the_weighted_loss():
    """With lr 0 nothing moves, so the reported loss per epoch is the mean over steps of (1 - w) CE(real batch) +
    w CE(synthetic batch), computed here with numpy from the model's own predictions."""
    import keras
    import tensorflow as tf

    from ooc_ray.classify.model import LossWeighted, compile_model

    rng = np.random.default_rng(0)
    xr, xs = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    yr, ys = (np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)] for n in (12, 6))
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    w = 0.3
    model = compile_model(LossWeighted(net, w), 0.0)
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices((xr, yr)).batch(4),
                             tf.data.Dataset.from_tensor_slices((xs, ys)).batch(2))
    loss = model.fit(ds, epochs=1, verbose=0).history["loss"][0]

    def ce(x, y):
        p = net.predict(x, verbose=0)
        return float(np.mean(-np.log(np.clip((p * y).sum(axis=1), 1e-7, 1))))

    steps = [(1 - w) * ce(xr[i:i + 4], yr[i:i + 4]) + w * ce(xs[j:j + 2], ys[j:j + 2])
             for i, j in zip(range(0, 12, 4), range(0, 6, 2))]
    assert loss == pytest.approx(np.mean(steps), rel=1e-5)


def test_split_batch_norm_keeps_synthetic_statistics_apart():
    import keras

    from ooc_ray.networks import SplitBatchNormalization

    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(10, 4)).astype(np.float32)
    flag = np.array([0, 0, 1, 0, 1, 1, 0, 0, 1, 0], np.float32)[:, None]
    split, plain = SplitBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    # A batch of real images only: Keras's BatchNormalization, output and moving statistics.
    real_only = np.zeros_like(flag)
    np.testing.assert_allclose(split([x, real_only], training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(split.real_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(split.real_var.numpy(), plain.moving_variance.numpy(), rtol=1e-5)
    assert np.array_equal(split.synthetic_mean.numpy(), np.zeros(4))  # no synthetic sample: unchanged
    # A mixed batch: each kind normalised by its own moments, each moving statistic moved by its own rows only.
    before = split.real_mean.numpy().copy()
    out = np.asarray(split([x, flag], training=True))
    syn = flag[:, 0] == 1
    for rows in (syn, ~syn):
        part = x[rows]
        np.testing.assert_allclose(out[rows], (part - part.mean(0)) / np.sqrt(part.var(0) + 1e-3), atol=1e-5)
    np.testing.assert_allclose(split.real_mean.numpy(), 0.9 * before + 0.1 * x[~syn].mean(0), rtol=1e-5)
    np.testing.assert_allclose(split.synthetic_mean.numpy(), 0.1 * x[syn].mean(0), rtol=1e-5)
    # Inference: every sample with the real moving statistics, whatever its flag.
    inferred = np.asarray(split([x, np.ones_like(flag)], training=False))
    expected = (x - split.real_mean.numpy()) / np.sqrt(split.real_var.numpy() + 1e-3)
    np.testing.assert_allclose(inferred, expected, atol=1e-5)
    # Convolution maps (SmallCNN's): statistics per channel over samples and positions, as BatchNormalization.
    maps = rng.normal(1.0, 2.0, size=(6, 5, 5, 3)).astype(np.float32)
    flags = np.array([0, 1, 0, 0, 1, 0], np.float32)[:, None]
    conv_split, conv_plain = SplitBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    np.testing.assert_allclose(conv_split([maps, np.zeros_like(flags)], training=True), conv_plain(maps, training=True),
                               atol=1e-5)
    out = np.asarray(conv_split([maps, flags], training=True))
    syn = flags[:, 0] == 1
    part = maps[syn]
    np.testing.assert_allclose(out[syn], (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-3), atol=1e-5)


def test_split_bn_trial_trains_and_shares_real_only(tiny):
    root, paths, manifest, synthetic, path = tiny
    row, history, probs = run(tiny, mixing="split_bn")
    concat = run(tiny)
    assert row["mixing"] == "split_bn" and history != concat[1] and history[-1] < history[0]
    # Real only does not mix: the same trial (key) under every strategy, so it is run once for all of them.
    keys_of = {m: {t.key for t in plan_trials(mixing_cfg(root, weights=path, mixing=m), manifest, synthetic, "w")
                   if t.spec.ratio == 0} for m in ("concat", "split_bn", "replace", "loss_weighted")}
    assert len({frozenset(k) for k in keys_of.values()}) == 1
    mixed = {m: {t.key for t in plan_trials(mixing_cfg(root, weights=path, mixing=m), manifest, synthetic, "w")
                 if t.spec.ratio == 1.0} for m in ("concat", "split_bn", "replace", "loss_weighted")}
    assert len({frozenset(k) for k in mixed.values()}) == 4  # the mixing arms are four different results


def test_split_bn_splits_every_batch_norm_of_a_small_cnn_trained_from_scratch(tiny):
    """SmallCNN under split_bn: each of its BatchNorms (and the head's) split; trains, and differs from concat."""
    import keras

    from ooc_ray.backbones import BackboneWeights
    from ooc_ray.classify.model import build_exact_model

    cfg = mixing_cfg("/unused", backbone="SmallCNN", weights="none", mode="exact", input_size=32, mixing="split_bn")
    model = build_exact_model(cfg.classify, BackboneWeights(None, "none"), 3, seed=0)
    kinds = [type(layer).__name__ for layer in model.get_layer("small_cnn").layers]
    assert kinds.count("SplitBatchNormalization") == 4 and "BatchNormalization" not in kinds
    assert type(model.get_layer("head").get_layer("head_bn")).__name__ == "SplitBatchNormalization"
    keras.backend.clear_session()
    split = run(tiny, mode="exact", backbone="SmallCNN", weights="none", mixing="split_bn")
    concat = run(tiny, mode="exact", backbone="SmallCNN", weights="none")
    assert split[0]["mixing"] == "split_bn" and split[1] != concat[1] and split[1][-1] < split[1][0]
