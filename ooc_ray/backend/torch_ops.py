"""classify.backend: torch. One CUDA framework per GPU node (the generator's), no TensorFlow in the process:
seeds and threads set on torch, inference under no_grad, NumPy feeds (ooc_ray.backend.array_feed)."""
from __future__ import annotations

import functools

import torch

from ooc_ray.backend.array_feed import image_batches, test_images, train_data
from ooc_ray.backend.keras_seeds import seed_keras_python_numpy

__all__ = ["MAX_STEPS_PER_EXECUTION", "compiled", "image_batches", "reseed", "setup", "test_images", "train_data"]
MAX_STEPS_PER_EXECUTION = 1  # Keras's torch trainer refuses more


def reseed(seed: int) -> None:
    """What keras.utils.set_random_seed sets on the torch backend (Keras's, Python's, NumPy's and torch's global
    seeds), without its tf.random.set_seed: that would import TensorFlow wherever it is installed."""
    seed_keras_python_numpy(seed)
    torch.manual_seed(seed)


def setup(cpus: float | None = None) -> None:
    """torch's intra-op threads = the trial's CPUs, so concurrent trials share cores."""
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def compiled(fn):
    """fn run without autograd (inference calls: the frozen backbone, one image's augmentation)."""

    @functools.wraps(fn)
    def call(*args):
        with torch.no_grad():
            return fn(*args)

    return call
