"""The feeds of classify.backend torch and jax: NumPy batches from Python generators, which Keras's fit and
predict take on every framework (no tf.data, so no TensorFlow in the process).

The streams are ooc_ray.backend.feed's, drawn with NumPy: epoch e's shuffle of a stream is
default_rng([stream seed, e]).permutation, so a trial's batches are fixed by its seed alone, but they are not
tf.data's draws: the same trial on TensorFlow and on torch sees other batch orders (tests/test_backends.py
states how far their results are apart).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from ooc_ray.backend.feed import RANDOM_BITS, REPLACE_STREAM, SYNTHETIC_STREAM, TrainFeed
from ooc_ray.images import load_image

VIEW_STREAM = 3  # cached mode's view draws: a stream apart from the shuffles and the mixing strategies' draws
_LOADERS = 4  # threads decoding a batch's images (PIL releases the GIL while it decodes and resizes)


def _image(path: str, size: int) -> np.ndarray:
    return np.asarray(load_image(path, size), np.float32)


def _load(paths: list[str], size: int, pool: ThreadPoolExecutor) -> np.ndarray:
    return np.stack(list(pool.map(lambda p: _image(p, size), paths)))


def image_batches(paths, size: int, batch_size: int):
    """Images of `paths` in order, batched: float32 (batch, size, size, 3) in 0..255."""
    paths = [str(p) for p in paths]
    with ThreadPoolExecutor(_LOADERS) as pool:
        for start in range(0, len(paths), batch_size):
            yield _load(paths[start:start + batch_size], size, pool)


class _TestImages(keras.utils.PyDataset):
    """Held-out images for model.predict, batch by batch, of known length (a generator's unknown end makes
    predict warn that its input ran out); with split_bn (image, flag 0): held-out images are real."""

    def __init__(self, paths, size: int, batch_size: int, split: bool):
        super().__init__(workers=_LOADERS)  # threads, each loading one batch
        self.paths, self.size, self.batch_size, self.split = [str(p) for p in paths], size, batch_size, split

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int):
        paths = self.paths[index * self.batch_size:(index + 1) * self.batch_size]
        x = np.stack([_image(p, self.size) for p in paths])
        return ((x, np.zeros((len(x), 1), np.float32)),) if self.split else (x,)


def test_images(paths, size: int, batch_size: int, split: bool):
    """Held-out images for model.predict (_TestImages)."""
    return _TestImages(paths, size, batch_size, split)


def _epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    return rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]


def _primary(feed: TrainFeed, epoch: int) -> np.ndarray:
    """The epoch's rows in order (feed's streams)."""
    if feed.mixing in ("concat", "split_bn"):
        return _epoch_order(np.arange(len(feed.labels)), feed.seed, epoch)
    real = _epoch_order(feed.real_rows, feed.seed, epoch)
    if feed.mixing == "loss_weighted":
        return real
    by_class, starts, counts = feed.synthetic_by_class()
    draws = np.random.default_rng([feed.seed + REPLACE_STREAM, epoch]).integers(0, 2**62, len(real))
    scale = 2 ** RANDOM_BITS
    n = counts[feed.labels[real]]
    pick = starts[feed.labels[real]] + (draws // scale) % np.maximum(n, 1)
    swap = ((draws % scale) / scale < feed.replace_probability) & (n > 0)
    return np.where(swap, by_class[np.minimum(pick, len(by_class) - 1)], real)


def _synthetic(feed: TrainFeed, epochs: int, steps: int) -> np.ndarray:
    """loss_weighted: the synthetic rows shuffled, cycled, cut into each step's batch: (epochs * steps, s)."""
    size = feed.synthetic_batch_size()
    rows, need, cycle = [], epochs * steps * size, 0
    while sum(map(len, rows)) < need:
        rows.append(_epoch_order(feed.synthetic_rows, feed.seed + SYNTHETIC_STREAM, cycle))
        cycle += 1
    return np.concatenate(rows)[:need].reshape(epochs * steps, size)


class _Rows:
    """(inputs, one-hot labels) of a batch of row indices: images loaded, or cached features at a drawn view."""

    def __init__(self, feed: TrainFeed, pool: ThreadPoolExecutor):
        self.feed, self.pool = feed, pool
        self.flag = feed.synthetic.astype(np.float32)[:, None]

    def __call__(self, rows: np.ndarray, stream: int, epoch: int, step: int):
        feed = self.feed
        if feed.features is None:
            x = _load([feed.paths[i] for i in rows], feed.input_size, self.pool)
        else:
            draws = np.random.default_rng([feed.seed + VIEW_STREAM, stream, epoch, step])
            x = feed.features[rows, draws.integers(0, feed.features.shape[1], len(rows))]
        return ((x, self.flag[rows]) if feed.split else x), feed.y[rows]


def train_data(feed: TrainFeed, epochs: int):
    """(a generator of every epoch's batches, steps per epoch): fit's steps_per_epoch keeps one generator
    running across epochs. loss_weighted pairs each real batch with a synthetic one as ((real x, synthetic x),
    (real y, synthetic y))."""
    steps = math.ceil(len(_primary(feed, 0)) / feed.batch_size)

    def batches():
        with ThreadPoolExecutor(_LOADERS) as pool:
            rows_of = _Rows(feed, pool)
            synthetic = _synthetic(feed, epochs, steps) if feed.mixing == "loss_weighted" else None
            for epoch in range(epochs):
                order = _primary(feed, epoch)
                for step in range(steps):
                    x, y = rows_of(order[step * feed.batch_size:(step + 1) * feed.batch_size], 0, epoch, step)
                    if synthetic is None:
                        yield x, y
                    else:
                        xs, ys = rows_of(synthetic[epoch * steps + step], 1, epoch, step)
                        yield (x, xs), (y, ys)

    return batches(), steps
