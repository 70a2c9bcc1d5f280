"""Images streamed from disk, and the backbone-feature cache of "cached" mode.

Images: a tf.data pipeline over row indices; each element is decoded and resized by PIL in a py_function
(JPG/PNG, grey or RGB, 16-bit microscopy: ooc_ray.data.load_image), so only a batch of resized images is in
memory at once, never the 2048x1536 originals.

Cache: the backbone is frozen, so its pooled output for an (image, augmentation view) never changes. It is
computed once per image into paths.features/<key>/, key = slice of (backbone, input size, weights, augment,
views, seed), and shared by every trial. View 0 is the un-augmented image (evaluation); views 1..V-1 are
augmented draws, one sampled per training image per epoch, each seeded by the image's bytes and the view
number, so it is the same whichever batch, part or Ray task extracts it. Parts are written atomically (part-*.npy, then its
part-*.json index, which marks the part complete), so a killed extraction resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ooc_ray.config import ClassifyConfig, slice_key
from ooc_ray.io import atomic_path, atomic_write_text

CHUNK = 256  # images per part file: B7 features are 2560 float32 = 10 KB per view, ~10 MB per part at 4 views


def image_map(paths, size: int):
    """tf.data map fn: row index (int64 scalar) -> float32 image (size, size, 3) in 0..255."""
    import tensorflow as tf

    from ooc_ray.data import load_image

    table = [str(p) for p in paths]

    def _load(i):
        return np.asarray(load_image(table[int(i)], size), dtype=np.uint8)

    def fn(i):
        img = tf.py_function(_load, [i], tf.uint8)
        return tf.cast(tf.ensure_shape(img, (size, size, 3)), tf.float32)

    return fn


def image_batches(paths, size: int, batch_size: int):
    """Images of `paths` in order, batched (evaluation and feature extraction)."""
    import tensorflow as tf

    ds = tf.data.Dataset.range(len(paths)).map(image_map(paths, size), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def n_views(cc: ClassifyConfig) -> int:
    # Without augmentation every view would be the same numbers: keep only view 0.
    return 1 if not cc.augment else max(1, cc.feature_views)


def train_views(cc: ClassifyConfig) -> list[int]:
    """Views a training image is drawn from each epoch: the augmented ones, or view 0 when there are none
    (no augmentation, or feature_views=1, which then trains the head on un-augmented features only)."""
    v = n_views(cc)
    return [0] if v == 1 else list(range(1, v))


def cache_key(cc: ClassifyConfig) -> str:
    # "views_seeded": caches written before augmented views were seeded per image must not be reused.
    return slice_key({"backbone": cc.backbone, "input_size": cc.input_size, "weights": cc.weights,
                      "augment": list(cc.augment), "views": n_views(cc), "seed": cc.seed, "views_seeded": True})


class FeatureCache:
    """Pooled backbone features per image path, shape (views, dim), in part files under `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def index(self) -> dict[str, tuple[Path, int]]:
        found: dict[str, tuple[Path, int]] = {}
        for meta in sorted(self.directory.glob("part-*.json")):
            for row, path in enumerate(json.loads(meta.read_text())):
                found[path] = (meta.with_suffix(".npy"), row)
        return found

    def missing(self, image_paths) -> list[str]:
        have = self.index()
        return sorted({str(p) for p in image_paths} - set(have))

    def write_part(self, image_paths: list[str], feats: np.ndarray) -> Path:
        name = f"part-{slice_key(list(image_paths))}"
        npy = self.directory / f"{name}.npy"
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, feats.astype(np.float32))
        atomic_write_text(self.directory / f"{name}.json", json.dumps(list(image_paths)))  # completes the part
        return npy

    def load(self, image_paths) -> np.ndarray:
        """(n, views, dim) float32 for `image_paths`, in order; KeyError names the first missing image."""
        image_paths = [str(p) for p in image_paths]
        index = self.index()
        absent = [p for p in image_paths if p not in index]
        if absent:
            raise KeyError(f"{self.directory}: no cached features for {absent[0]} ({len(absent)} missing)")
        out = None
        by_part: dict[Path, list[tuple[int, int]]] = {}
        for i, p in enumerate(image_paths):
            part, row = index[p]
            by_part.setdefault(part, []).append((i, row))
        for part, pairs in by_part.items():
            arr = np.load(part, mmap_mode="r")  # reads only the rows taken
            if out is None:
                out = np.empty((len(image_paths), *arr.shape[1:]), np.float32)
            dst, src = zip(*pairs)
            out[list(dst)] = arr[list(src)]
        return out if out is not None else np.empty((0, 0, 0), np.float32)


class FeatureExtractor:
    """The frozen backbone (and augmentation) built once; maps a batch of images to (batch, views, dim)."""

    def __init__(self, cc: ClassifyConfig):
        import tensorflow as tf

        from ooc_ray.classify.model import build_augmentation, build_backbone, frozen

        self.cc = cc
        self.views = n_views(cc)
        backbone = frozen(build_backbone(cc.backbone, cc.weights, cc.input_size))
        augmentation = build_augmentation(cc.augment, cc.seed)
        self._backbone = tf.function(lambda x: backbone(x), reduce_retracing=True)
        self._augmentation = augmentation
        self._seed_states = [] if augmentation is None else _seed_states(augmentation)

    def _augment(self, image, seed: int):
        """One image's augmented copy, its random draws fixed by `seed` alone.

        Each layer's SeedGenerator state is set from (seed, layer) before the call, so a view does not depend
        on which batch, part or Ray task the image was extracted in (measured: same seed -> identical pixels)."""
        for j, state in enumerate(self._seed_states):
            state.assign(np.array([seed, j], dtype=state.dtype))
        return self._augmentation(image[None], training=True)[0]

    def __call__(self, images, seeds=None) -> np.ndarray:
        """(batch, views, dim); `seeds` (one int per image, e.g. image_seeds()) fix each augmented view."""
        import tensorflow as tf

        # One decoded batch serves every view: the decode of a 2048x1536 JPG costs as much as a small backbone.
        outs = [self._backbone(images).numpy()]
        if self.views > 1:
            seeds = list(range(len(images))) if seeds is None else seeds
            for view in range(1, self.views):
                augmented = tf.stack([self._augment(img, _view_seed(s, view)) for img, s in zip(images, seeds)])
                outs.append(self._backbone(augmented).numpy())
        return np.stack(outs, axis=1)


def _seed_states(model) -> list:
    # Keras 3 random layers keep [seed, counter] in a "seed_generator_state" variable; build them first.
    import tensorflow as tf

    model(tf.zeros((1, 8, 8, 3)), training=True)
    return [v for v in model.variables if "seed_generator_state" in v.path]


def _view_seed(image_seed: int, view: int) -> int:
    return (image_seed * 1_000_003 + view) % (2**31 - 1)


def image_seeds(image_paths, base_seed: int) -> list[int]:
    """Per-image augmentation seeds from the file's bytes (not its path: the same image elsewhere on a
    cluster, or on another machine, gets the same augmented views) and classify.seed."""
    import hashlib

    seeds = []
    for p in image_paths:
        digest = hashlib.sha256(Path(p).read_bytes()).digest()
        seeds.append((int.from_bytes(digest[:4], "big") + base_seed * 7919) % (2**31 - 1))
    return seeds


def extract_features(cc: ClassifyConfig, image_paths, directory: str | Path, chunk: int = CHUNK) -> int:
    """Compute and store features for the images of `image_paths` not yet cached; returns how many."""
    cache = FeatureCache(directory)
    todo = cache.missing(image_paths)
    if not todo:
        return 0
    extractor = FeatureExtractor(cc)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        seeds = image_seeds(part, cc.seed) if extractor.views > 1 else [0] * len(part)
        rows = [extractor(images, seeds[i * cc.batch_size:(i + 1) * cc.batch_size])
                for i, images in enumerate(image_batches(part, cc.input_size, cc.batch_size))]
        cache.write_part(part, np.concatenate(rows))
    return len(todo)


def _extract_task(cc: ClassifyConfig, image_paths: list[str], directory: str) -> int:
    from ooc_ray.classify.model import setup_tf

    setup_tf(cc.cpus_per_trial)
    return extract_features(cc, image_paths, directory)


def ensure_features(cc: ClassifyConfig, features_root: Path, image_paths) -> Path:
    """Fill the cache for `image_paths` with Ray tasks (one per trial-sized slot, each with the trial's
    CPUs/GPUs, so a cluster extracts in parallel); returns the cache folder. Ray must be initialised."""
    import ray

    directory = Path(features_root) / cache_key(cc)
    todo = FeatureCache(directory).missing(image_paths)
    if not todo:
        return directory
    atomic_write_text(directory / "meta.json", json.dumps(
        {"backbone": cc.backbone, "input_size": cc.input_size, "weights": cc.weights,
         "augment": list(cc.augment), "views": n_views(cc), "seed": cc.seed}, indent=1))
    resources = ray.cluster_resources()
    if cc.gpus_per_trial > 0:
        slots = int(resources.get("GPU", 0) // cc.gpus_per_trial)
    else:
        slots = int(resources.get("CPU", 1) // max(cc.cpus_per_trial, 1))
    # Each task pays a TF import and a backbone build (~5 s on CPU for B0), so give each at least one part.
    n_tasks = max(1, min(slots, -(-len(todo) // CHUNK)))
    task = ray.remote(_extract_task).options(num_cpus=cc.cpus_per_trial, num_gpus=cc.gpus_per_trial)
    shards = [list(s) for s in np.array_split(np.array(todo, dtype=object), n_tasks) if len(s)]
    ray.get([task.remote(cc, shard, str(directory)) for shard in shards])
    return directory
