"""Images streamed from disk and run through the frozen backbone, filling the feature cache
(ooc_ray.feature_cache: its identity, part files and Ray tasks, without Keras). Images come in batches from the
framework's feed (ooc_ray.backend: tf.data on TensorFlow, NumPy otherwise), so only a batch of resized images is
in memory at once, never the 2048x1536 originals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from keras import ops

from ooc_ray.backbones import BackboneWeights
from ooc_ray.config import ClassifyConfig
from ooc_ray.errors import StageError
from ooc_ray.feature_cache import CHUNK, FeatureCache, n_views
from ooc_ray.gpu import require_keras_gpu
from ooc_ray.networks import build_augmentation, build_backbone, built_weights, framework, frozen


def _view_seed(image_seed: int, view: int) -> int:
    return (image_seed * 1_000_003 + view) % (2**31 - 1)


def image_seeds(digests, base_seed: int) -> list[int]:
    """Per-image augmentation seeds from the image's sha256 (not its path: the same bytes anywhere on a
    cluster get the same augmented views) and classify.seed."""
    return [(int(str(d)[:8], 16) + base_seed * 7919) % (2**31 - 1) for d in digests]


def _seed_states(model) -> list:
    # Keras 3 random layers keep [seed, counter] in a "seed_generator_state" variable; build them first.
    model(np.zeros((1, 8, 8, 3), np.float32), training=True)
    return [v for v in model.variables if "seed_generator_state" in v.path]


class FeatureExtractor:
    """The frozen backbone (and augmentation) built once; maps a batch of images to (batch, views, dim)."""

    def __init__(self, cc: ClassifyConfig, weights: BackboneWeights):
        ops_of = framework()
        ops_of.reseed(cc.seed)  # weights "random": the same random backbone in every task
        self.views = n_views(cc)
        backbone = frozen(build_backbone(cc.backbone, weights.value, cc.input_size))
        self._backbone = ops_of.compiled(lambda x: backbone(x))
        self._augmentation = build_augmentation(cc.augment, cc.seed)
        self._seed_states = [] if self._augmentation is None else _seed_states(self._augmentation)
        # Traced once, the seed a tensor: 1.1 ms per 64 px image against 8.7 ms eagerly with all six layers
        # (2 CPU cores), and bit-identical to the eager call (tests/test_classify_model.py checks it).
        self._augment_graph = ops_of.compiled(self._augment_eager)

    def _augment_eager(self, image, seed):
        """One image's augmented copy, its random draws fixed by `seed` alone: each layer's SeedGenerator state
        is set from (seed, layer) before the call (measured: same seed -> identical pixels)."""
        for j, state in enumerate(self._seed_states):
            state.assign(ops.stack([ops.cast(seed, state.dtype), ops.cast(j, state.dtype)]))
        return self._augmentation(image[None], training=True)[0]

    def _augment(self, image, seed: int):
        return self._augment_graph(image, ops.convert_to_tensor(seed, "int64"))

    def __call__(self, images, seeds) -> np.ndarray:
        """(batch, views, dim); `seeds` (one int per image, image_seeds()) fix each augmented view."""
        # One decoded batch serves every view: the decode of a 2048x1536 JPG costs as much as a small backbone.
        outs = [ops.convert_to_numpy(self._backbone(images))]
        for view in range(1, self.views):
            augmented = ops.stack([self._augment(img, _view_seed(s, view)) for img, s in zip(images, seeds)])
            outs.append(ops.convert_to_numpy(self._backbone(augmented)))
        return np.stack(outs, axis=1)


def extract_features(cc: ClassifyConfig, weights: BackboneWeights, images: pd.DataFrame, directory: str | Path,
                     chunk: int = CHUNK) -> int:
    """Compute and store features for the `images` (columns path, sha256) not yet cached; returns how many."""
    cache = FeatureCache(directory)
    todo = images.drop_duplicates("sha256").set_index("sha256").loc[cache.missing(images["sha256"])]
    if todo.empty:
        return 0
    extractor = FeatureExtractor(cc, weights)
    image_batches = framework().image_batches
    for start in range(0, len(todo), chunk):
        part = todo.iloc[start:start + chunk]
        seeds = image_seeds(part.index, cc.seed)
        rows = [extractor(batch, seeds[i * cc.batch_size:(i + 1) * cc.batch_size])
                for i, batch in enumerate(image_batches(part["path"].tolist(), cc.input_size, cc.batch_size))]
        feats = np.concatenate(rows)
        broken = part["path"][~np.isfinite(feats).all(axis=(1, 2))]
        if len(broken):  # cached for good, they would train and score every later trial on NaN
            raise StageError(f"features: {cc.backbone} ({weights.identity}) gave NaN/inf features for {len(broken)} "
                             f"image(s), e.g. {broken.iloc[0]}; nothing cached for them: check classify.weights")
        cache.write_part(part.index.tolist(), feats)
    return len(todo)


def _task_start(cc: ClassifyConfig, what: str) -> None:
    """A Ray task's first step: the framework set to the task's CPUs before its first op (TensorFlow fixes its
    threads then, on every core unless told, and 1 vs 2 threads change EfficientNetB0's features in their last
    bits), its GPU checked."""
    framework().setup(cc.cpus_per_trial)
    if cc.gpus_per_trial > 0:
        require_keras_gpu(cc.backend, f"{what}: classify.gpus_per_trial={cc.gpus_per_trial:g}")


def extract_task(cc: ClassifyConfig, weights: BackboneWeights, images: pd.DataFrame, directory: str) -> int:
    """A Ray feature task's work (feature_cache.ensure_features)."""
    _task_start(cc, "feature extraction")
    return extract_features(cc, weights, images, directory)


def weights_task(cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame) -> BackboneWeights:
    """A Ray calibration task's work (feature_cache.weights_on_cluster)."""
    _task_start(cc, "calibrated weights")
    return built_weights(cc, models_dir, manifest)


def extract_here(cc: ClassifyConfig, weights: BackboneWeights, images: pd.DataFrame, directory: str | Path,
                 cpus: float) -> int:
    """Extraction in this process (a search trial, which holds `cpus` already)."""
    framework().setup(cpus)
    return extract_features(cc, weights, images, directory)
