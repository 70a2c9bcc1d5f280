"""classify.backend: the framework Keras runs the classifier on, chosen per process before Keras is imported.

Keras reads KERAS_BACKEND once, at its import, and cannot switch afterwards; so every module that imports Keras
(ooc_ray.features, ooc_ray.networks, ooc_ray.classify.train) is loaded through keras_side(module, backend), which
sets the variable first, or refuses by name when this process already runs Keras on another framework. This
module imports neither Keras nor a framework: drivers that only plan load it for free.

What differs between frameworks lives in one module each, with the same functions (ooc_ray.backend.
tensorflow_ops, torch_ops, jax_ops): seeding, threads, the loss-weighted train step, and how images and cached
features are fed to Keras (TensorFlow: tf.data, as every result before classify.backend was computed; torch and
JAX: NumPy batches in a keras.utils.PyDataset, ooc_ray.backend.array_feed).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from ooc_ray.errors import ModelError
from ooc_ray.gpu import node_name

BACKENDS = ("tensorflow", "torch", "jax")


def use_backend(backend: str) -> None:
    """Make Keras, when this process imports it, run on `backend`; ModelError naming the node when Keras already
    runs on another framework here, or when `backend`'s framework is not installed."""
    if importlib.util.find_spec(backend) is None:
        raise ModelError(f"classify.backend={backend}: {backend} is not installed on node {node_name()} "
                         f"(docs/gpu.md, section One CUDA framework, says how to install each)")
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = backend
    elif keras.backend.backend() != backend:
        raise ModelError(f"classify.backend={backend}: this process (node {node_name()}, pid {os.getpid()}) "
                         f"already runs Keras on {keras.backend.backend()}, and Keras picks its framework once "
                         "per process")


def keras_side(module: str, backend: str | None = None):
    """A module that imports Keras (ooc_ray.features, ooc_ray.networks, ooc_ray.classify.train), loaded where a
    backbone or a classifier runs, on `backend` (None: whatever this process's Keras runs on): in a Ray task or
    Tune worker, never in a driver that only plans."""
    if backend is not None:
        use_backend(backend)
    return importlib.import_module(module)


def runtime_env(backend: str) -> dict:
    """Ray options for a task that runs Keras on `backend`: TensorFlow in Ray's shared workers (as before
    classify.backend), any other framework in workers of its own, so a worker never meets two."""
    return {} if backend == "tensorflow" else {"runtime_env": {"env_vars": {"KERAS_BACKEND": backend}}}


def framework_ops(backend: str):
    """The module of what differs on `backend` (imports its framework)."""
    return importlib.import_module(f"ooc_ray.backend.{backend}_ops")
