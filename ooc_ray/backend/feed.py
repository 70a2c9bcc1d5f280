"""What a trial's training batches are made of, without any framework: the rows, their labels and kinds, the
mixing strategy and seeds, and where each row's input comes from (an image file, or cached features). Each
framework module turns a TrainFeed into what Keras's fit takes (tensorflow_ops: tf.data; array_feed: NumPy).

The streams, for every framework: concat and split_bn: every row once per epoch, shuffled with the trial seed.
loss_weighted: the real rows exactly as the real-only trial shuffles them (they come first in a training set),
and a synthetic stream of its own, cycled. replace: the real-only stream with each index swapped, with
probability p, for a seeded draw among the synthetic rows of its class (DA-Fusion, Trabucco et al., ICLR 2024);
p = 0 swaps nothing. Cached mode: one view per image per epoch, a seeded draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Seed offsets of the mixing strategies' own random streams, apart from the trial's shuffle (seed) and view draws.
REPLACE_STREAM, SYNTHETIC_STREAM = 1, 2
RANDOM_BITS = 20  # a replace draw: the low 20 bits decide whether to swap, the rest which synthetic image


@dataclass(frozen=True, eq=False)
class TrainFeed:
    mixing: str  # concat, loss_weighted, replace or split_bn (train.trial_mixing)
    seed: int
    batch_size: int
    labels: np.ndarray  # int64 class index per training row
    y: np.ndarray  # float32 one-hot labels per row
    synthetic: np.ndarray  # bool per row
    replace_probability: float
    paths: list[str] | None = None  # exact mode: each row's image file
    input_size: int = 0
    features: np.ndarray | None = None  # cached mode: (rows, views, dim)

    @property
    def split(self) -> bool:
        """split_bn: inputs are (x, synthetic flag)."""
        return self.mixing == "split_bn"

    @property
    def real_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.synthetic)

    @property
    def synthetic_rows(self) -> np.ndarray:
        return np.flatnonzero(self.synthetic)

    def synthetic_batch_size(self) -> int:
        """loss_weighted: synthetic images per step, as many as spread the synthetic set over one epoch's real
        steps."""
        steps = math.ceil(len(self.real_rows) / self.batch_size)
        return max(1, math.ceil(len(self.synthetic_rows) / steps))

    def synthetic_by_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """replace: the synthetic rows ordered by class, each class's first position in that order and its count."""
        rows = self.synthetic_rows
        order = np.argsort(self.labels[rows], kind="stable")
        counts = np.bincount(self.labels[rows], minlength=int(self.labels.max()) + 1)
        return rows[order], np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
