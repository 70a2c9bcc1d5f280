"""classify.backend: tensorflow (the paper's, the default). Seeds, threads, compiled calls and tf.data feeds: the
pipelines every result before classify.backend was computed with, unchanged (the same shuffles, draws and
batches, so trial keys and numbers stay what they were).

Images: a tf.data pipeline over row indices, batched; each batch is decoded and resized by PIL in one
py_function (image_batch_map; JPG/PNG, grey or RGB, 16-bit microscopy: ooc_ray.images.load_image), for training,
evaluation and features alike, so only batches of resized images are in memory, never the 2048x1536 originals.
"""
from __future__ import annotations

import random

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as tf_context

from ooc_ray.backend.feed import RANDOM_BITS, SYNTHETIC_STREAM, REPLACE_STREAM, TrainFeed
from ooc_ray.backend.keras_seeds import seed_keras_python_numpy
from ooc_ray.errors import ModelError
from ooc_ray.images import load_image


MAX_STEPS_PER_EXECUTION = None  # Keras's TensorFlow trainer runs any number of steps per graph call


def reseed(seed: int) -> None:
    """keras.utils.set_random_seed(seed) without its clearing of TensorFlow's kernel caches. tf.random.set_seed
    clears them (TFE_ContextClearCaches) to restart stateful random kernels; a trial's traced functions use only
    stateless random ops and tf.data's explicitly seeded datasets (tests/test_classify_model.py checks every
    function a process traced), so the clear only made a reused model re-instantiate each traced function on its
    next call: 1.1 s of a reused 1-epoch B0 trial's 1.4 s. Python's, NumPy's, Keras's and TensorFlow's global seeds
    and TensorFlow's operation-seed stream are set exactly as set_random_seed sets them."""
    seed_keras_python_numpy(seed)
    ctx = tf_context.context()
    ctx._seed, ctx._rng = seed, random.Random(seed)  # context._set_global_seed's two assignments, without its clear
    # Private attributes: check that TensorFlow still draws its operation seeds from this stream, then restart it.
    if ctx._internal_operation_seed() != random.Random(seed).randint(0, 2**31 - 1):
        raise ModelError(f"TensorFlow {tf.__version__} no longer draws operation seeds from its eager context's "
                         "_rng: ooc_ray.backend.tensorflow_ops.reseed needs updating (keras.utils.set_random_seed "
                         "is the exact, slower way)")
    ctx._rng = random.Random(seed)


def setup(cpus: float | None = None) -> None:
    """Call before any TF op: GPU memory growth (else TF grabs the whole GPU, and fractional GPUs per
    trial do not limit memory), and intra-op threads = the trial's CPUs so concurrent trials share cores."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # TF already initialised in this process (tests, reused workers): keep it
            pass
    if cpus:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))
            tf.config.threading.set_inter_op_parallelism_threads(2)
        except RuntimeError:
            pass


def loss_weighted_step(model, data):
    """LossWeighted's train step on TensorFlow, on pairs ((real x, real y), (synthetic x, synthetic y)): the ops
    and the data every loss-weighted result before classify.backend was computed with. (Keras's own step needs the
    pairs regrouped as ((real x, synthetic x), (real y, synthetic y)); a tf.data map doing that made the second
    epoch's loss differ from run to run: measured, EfficientNetB0 calibrated, 2 epochs.)"""
    (x_real, y_real), (x_synthetic, y_synthetic) = data
    w = model.synthetic_weight
    with tf.GradientTape() as tape:
        y_pred = model(x_real, training=True)
        loss = keras.Model.compute_loss(model, x=x_real, y=y_real, y_pred=y_pred, training=True)
        if w > 0:
            syn_loss = keras.Model.compute_loss(model, x=x_synthetic, y=y_synthetic,
                                                y_pred=model(x_synthetic, training=True), training=True)
            loss = (1 - w) * loss + w * syn_loss
        # Keras's own train_step feeds its loss tracker the same way (no public hook for it).
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(x_real)[0])
    gradients = tape.gradient(loss, model.trainable_weights)
    model.optimizer.apply_gradients(zip(gradients, model.trainable_weights))
    return keras.Model.compute_metrics(model, x_real, y_real, y_pred)


def compiled(fn):
    """fn traced into a TensorFlow graph (inference calls: the frozen backbone, one image's augmentation)."""
    return tf.function(fn, reduce_retracing=True)


def image_batch_map(paths, size: int):
    """tf.data map fn: a batch of row indices -> float32 images (batch, size, size, 3) in 0..255, decoded in one
    py_function."""
    table = [str(p) for p in paths]

    def _load(rows):
        return np.stack([np.asarray(load_image(table[int(i)], size), dtype=np.uint8) for i in rows.numpy()])

    def fn(rows):
        images = tf.py_function(_load, [rows], tf.uint8)
        return tf.cast(tf.ensure_shape(images, (None, size, size, 3)), tf.float32)

    return fn


def image_batches(paths, size: int, batch_size: int):
    """Images of `paths` in order, batched (evaluation and feature extraction)."""
    ds = tf.data.Dataset.range(len(paths)).batch(batch_size)
    return ds.map(image_batch_map(paths, size), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def test_images(paths, size: int, batch_size: int, split: bool):
    """Held-out images for model.predict; with split_bn (image, flag 0): held-out images are real."""
    test = image_batches(paths, size, batch_size)
    if split:
        test = test.map(lambda x: ((x, tf.zeros((tf.shape(x)[0], 1))),))  # a 1-tuple: inputs, no labels
    return test


def _shuffled_indices(n: int, seed: int):
    # Re-shuffled every epoch, deterministically from the seed; identical in both modes.
    return tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)


class _Streams:
    """The feed's row-index streams (ooc_ray.backend.feed) as tf.data datasets."""

    def __init__(self, feed: TrainFeed):
        self.feed = feed
        self.mixing, self.seed = feed.mixing, feed.seed

    def _of(self, rows: np.ndarray, seed: int):
        table = tf.constant(rows, dtype=tf.int64)
        return _shuffled_indices(len(rows), seed).map(lambda i: tf.gather(table, i))

    def primary(self):
        feed = self.feed
        if self.mixing in ("concat", "split_bn"):
            return _shuffled_indices(len(feed.labels), self.seed)
        real = self._of(feed.real_rows, self.seed)
        if self.mixing == "loss_weighted":
            return real
        by_class, starts, counts = (tf.constant(a, dtype=tf.int64) for a in feed.synthetic_by_class())
        labels = tf.constant(feed.labels)
        scale, n_synthetic, p = 2 ** RANDOM_BITS, len(feed.synthetic_rows), feed.replace_probability

        def swap(i, r):
            c = tf.gather(labels, i)
            n = tf.gather(counts, c)
            u = tf.cast(tf.math.floormod(r, scale), tf.float64) / scale
            pick = tf.gather(starts, c) + tf.math.floormod(tf.math.floordiv(r, scale), tf.maximum(n, 1))
            # tf.where evaluates both sides: a class without synthetic rows may point past the table, so clamp.
            inside = tf.minimum(pick, n_synthetic - 1)
            return tf.where((u < p) & (n > 0), tf.gather(by_class, inside), i)

        draws = tf.data.Dataset.random(seed=self.seed + REPLACE_STREAM, rerandomize_each_iteration=True)
        return tf.data.Dataset.zip(real, draws).map(swap)

    def synthetic(self):
        """loss_weighted: the synthetic rows, shuffled and cycled without end (the real stream ends an epoch)."""
        return self._of(self.feed.synthetic_rows, self.seed + SYNTHETIC_STREAM).repeat()


def _train_images(feed: TrainFeed, streams: _Streams):
    """Exact mode. Images are decoded after the index streams are batched and paired, never before: a parallel
    map on loss_weighted's endless synthetic stream read ahead past the end of an epoch, a timing-dependent
    number of elements, and each re-shuffle it reached took the next seed from the stream's seed generator, so
    the next epoch's synthetic order depended on CPU load (measured: 2 distinct orders in 12 runs under load;
    a reused-model trial then differed from its fresh twin in epoch 2). The images and their order are those
    of every other trial."""
    flag, y = tf.constant(feed.synthetic.astype(np.float32)[:, None]), tf.constant(feed.y)
    load = image_batch_map(feed.paths, feed.input_size)

    def rows(i):
        return ((load(i), tf.gather(flag, i)) if feed.split else load(i)), tf.gather(y, i)

    real = streams.primary().batch(feed.batch_size)
    if feed.mixing != "loss_weighted":
        return real.map(rows, num_parallel_calls=tf.data.AUTOTUNE)
    synthetic = streams.synthetic().batch(feed.synthetic_batch_size())
    return tf.data.Dataset.zip(real, synthetic).map(lambda r, s: (rows(r), rows(s)),
                                                     num_parallel_calls=tf.data.AUTOTUNE)


def _train_features(feed: TrainFeed, streams: _Streams):
    """Cached mode: one view per image per epoch, a seeded stream of integers re-drawn each epoch, gathered a
    batch at a time (one map call per batch, not per image)."""
    flag, y = tf.constant(feed.synthetic.astype(np.float32)[:, None]), tf.constant(feed.y)
    x, n_v = tf.constant(feed.features), feed.features.shape[1]

    def batches(indices, batch_size, stream_seed):
        draws = tf.data.Dataset.random(seed=stream_seed, rerandomize_each_iteration=True)

        def rows(i, r):
            chosen = tf.gather_nd(x, tf.stack([i, r % n_v], axis=1))
            return ((chosen, tf.gather(flag, i)) if feed.split else chosen), tf.gather(y, i)

        return tf.data.Dataset.zip(indices, draws).batch(batch_size).map(rows)

    real = batches(streams.primary(), feed.batch_size, feed.seed)
    if feed.mixing != "loss_weighted":
        return real
    synthetic = batches(streams.synthetic(), feed.synthetic_batch_size(), feed.seed + SYNTHETIC_STREAM)
    return tf.data.Dataset.zip(real, synthetic)


def train_data(feed: TrainFeed, epochs: int):
    """(what model.fit takes, steps per epoch or None): the trial's batches; loss_weighted pairs each real
    batch with a synthetic one as ((real x, real y), (synthetic x, synthetic y)) (loss_weighted_step)."""
    streams = _Streams(feed)
    ds = _train_images(feed, streams) if feed.features is None else _train_features(feed, streams)
    return ds.prefetch(tf.data.AUTOTUNE), None
