"""The global seeds keras.utils.set_random_seed sets on every framework (Keras's own, Python's, NumPy's), set
without it: it also calls tf.random.set_seed, which imports TensorFlow wherever it is installed and clears its
kernel caches. Each framework module adds its own framework's seeds (ooc_ray.backend.*_ops.reseed)."""
from __future__ import annotations

import random

import numpy as np
from keras.src.backend.common import global_state


def seed_keras_python_numpy(seed: int) -> None:
    global_state.set_global_attribute("global_random_seed", seed)  # keras.src.utils.rng_utils.GLOBAL_RANDOM_SEED
    global_state.set_global_attribute("global_seed_generator", None)  # recreated from the seed on first use
    random.seed(seed)
    np.random.seed(seed)
