"""classify.backend: jax. Seeds set as keras.utils.set_random_seed sets them, without TensorFlow; NumPy feeds
(ooc_ray.backend.array_feed). Keras's fit and predict compile their own steps with jax.jit; the frozen backbone
and the augmentation run eagerly (the augmentation sets its layers' seed states, which a jitted call cannot)."""
from __future__ import annotations

from ooc_ray.backend.array_feed import image_batches, test_images, train_data
from ooc_ray.backend.keras_seeds import seed_keras_python_numpy

__all__ = ["MAX_STEPS_PER_EXECUTION", "compiled", "image_batches", "reseed", "setup", "test_images", "train_data"]
MAX_STEPS_PER_EXECUTION = 1  # a generator feed would be read that many batches at a time, past an epoch's end


def reseed(seed: int) -> None:
    """Keras's, Python's and NumPy's global seeds (Keras's random layers and initialisers on JAX draw from them)."""
    seed_keras_python_numpy(seed)


def setup(cpus: float | None = None) -> None:
    """Nothing to set. XLA sizes its CPU thread pool from the process's CPU affinity when JAX first computes, and
    (JAX 0.10.2, measured) ignores XLA_FLAGS' intra_op_parallelism_threads and xla_cpu_multi_thread_eigen=false:
    a trial cannot be held to its CPUs short of pinning it to cores, which Ray does not hand out. What that costs
    is small: two concurrent B0 trials on 2 cores took 43.2 s each unpinned vs 41.3 s pinned (docs/gpu.md)."""


def compiled(fn):
    return fn
