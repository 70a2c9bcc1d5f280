"""The cache of frozen-backbone features, without Keras: its identity, its part files, and filling it with
Ray tasks. The quality stage, the LoRA search and the classify stage's driver read and plan through this module;
the backbone itself runs in ooc_ray.features (which imports Keras on classify.backend's framework), loaded only
where images go through it: in a Ray task, or in a search trial's own process (measured: `import ooc_ray.search`
12.3 s of CPU with TensorFlow, 8.1 s without, 2 cores).

Cache: the backbone is frozen, so its pooled output for an (image, augmentation view) never changes. It is
computed once per image *content* (sha256) into features/<key>/, key = the backbone's result fields and
weights (ooc_ray.keys.features_key), and shared by every trial. View 0 is the un-augmented image (evaluation);
views 1..V-1 are augmented draws, one sampled per training image per epoch, each seeded by the image's sha256
and the view number, so it is the same whichever batch, part, Ray task or machine extracts it. Parts are
written atomically (part-*.npy, then its part-*.json index of sha256 digests, which marks the part complete),
so a killed extraction resumes where it stopped; a damaged part is named and extracted again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.backend import keras_side, runtime_env
from ooc_ray.backbones import CALIBRATED, BackboneWeights, backbone_weights
from ooc_ray.config import ClassifyConfig, ExperimentConfig
from ooc_ray.io import atomic_path, atomic_write_text
from ooc_ray.logs import note
from ooc_ray.raycluster import init_ray, ray_task, require_resources, wait_all

CHUNK = 256  # images per part file: B7 features are 2560 float32 = 10 KB per view, ~10 MB per part at 4 views


def n_views(cc: ClassifyConfig) -> int:
    # Without augmentation every view would be the same numbers: keep only view 0.
    return 1 if not cc.augment else max(1, cc.feature_views)


def train_views(cc: ClassifyConfig) -> list[int]:
    """Views a training image is drawn from each epoch: the augmented ones, or view 0 when there are none
    (no augmentation, or feature_views=1, which then trains the head on un-augmented features only)."""
    v = n_views(cc)
    return [0] if v == 1 else list(range(1, v))


def cache_dir(cc: ClassifyConfig, weights: BackboneWeights, features_root: Path) -> Path:
    return Path(features_root) / keys.features_key(cc, weights.identity, n_views(cc))


class FeatureCache:
    """Pooled backbone features per image sha256, shape (views, dim), in part files under `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _part_rows(self, meta: Path) -> list[str] | None:
        """The digests a part holds, or None when the part is damaged (then it is removed, to be re-made)."""
        try:
            digests = json.loads(meta.read_text())
            shape = np.load(meta.with_suffix(".npy"), mmap_mode="r").shape
            if shape[0] == len(digests):
                return digests
            problem = f"{shape[0]} rows for {len(digests)} images"
        except (OSError, ValueError) as exc:
            problem = str(exc)
        note(f"features: damaged part {meta.with_suffix('.npy')} ({problem}): extracting it again")
        meta.unlink(missing_ok=True)
        meta.with_suffix(".npy").unlink(missing_ok=True)
        return None

    def index(self) -> dict[str, tuple[Path, int]]:
        found: dict[str, tuple[Path, int]] = {}
        for meta in sorted(self.directory.glob("part-*.json")):
            for row, sha in enumerate(self._part_rows(meta) or []):
                found[sha] = (meta.with_suffix(".npy"), row)
        return found

    def missing(self, digests) -> list[str]:
        have = self.index()
        return sorted({str(d) for d in digests} - set(have))

    def write_part(self, digests: list[str], feats: np.ndarray) -> Path:
        name = f"part-{keys.digest(list(digests))}"
        npy = self.directory / f"{name}.npy"
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, feats.astype(np.float32))
        atomic_write_text(self.directory / f"{name}.json", json.dumps(list(digests)))  # completes the part
        return npy

    def load(self, digests) -> np.ndarray:
        """(n, views, dim) float32 for the images with these sha256, in order; KeyError names a missing one."""
        digests = [str(d) for d in digests]
        index = self.index()
        absent = [d for d in digests if d not in index]
        if absent:
            raise KeyError(f"{self.directory}: no cached features for image sha256 {absent[0]} "
                           f"({len(absent)} missing)")
        by_part: dict[Path, list[tuple[int, int]]] = {}
        for i, d in enumerate(digests):
            part, row = index[d]
            by_part.setdefault(part, []).append((i, row))
        out = None
        for part, pairs in by_part.items():
            arr = np.load(part, mmap_mode="r")  # reads only the rows taken
            if out is None:
                out = np.empty((len(digests), *arr.shape[1:]), np.float32)
            dst, src = zip(*pairs)
            out[list(dst)] = arr[list(src)]
        return out if out is not None else np.empty((0, 0, 0), np.float32)


def _extraction_task(cc: ClassifyConfig, weights: BackboneWeights, images: pd.DataFrame, directory: str) -> int:
    return keras_side("ooc_ray.features", cc.backend).extract_task(cc, weights, images, directory)


def _weights_task(cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame) -> BackboneWeights:
    return keras_side("ooc_ray.features", cc.backend).weights_task(cc, models_dir, manifest)


def ensure_features(cfg: ExperimentConfig, cc: ClassifyConfig, weights: BackboneWeights, images: pd.DataFrame,
                    features_root: Path, use_ray: bool = True) -> Path:
    """Fill the cache for `images` with Ray tasks, one per trial-sized slot, each with the trial's CPUs and
    GPUs, so a cluster extracts in parallel; returns the cache folder. `cc` may differ from cfg.classify
    (the quality stage's un-augmented cache in exact mode). use_ray=False extracts in this process (inside
    a search trial, which already holds search.cpus_per_trial: its framework's threads)."""
    directory = cache_dir(cc, weights, features_root)
    todo = images.drop_duplicates("sha256")
    todo = todo[todo["sha256"].isin(FeatureCache(directory).missing(todo["sha256"]))]
    if todo.empty:
        return directory
    if not use_ray:
        keras_side("ooc_ray.features", cc.backend).extract_here(cc, weights, todo, directory, cfg.search.cpus_per_trial)
        return directory
    ray = init_ray(cfg)
    request = {"CPU": cc.cpus_per_trial, "GPU": cc.gpus_per_trial}
    what = (f"feature extraction: classify.cpus_per_trial={cc.cpus_per_trial:g}, "
            f"classify.gpus_per_trial={cc.gpus_per_trial:g}")
    require_resources(cfg, request, what)
    atomic_write_text(directory / "meta.json", json.dumps(
        {"key": directory.name, "backbone": cc.backbone, "input_size": cc.input_size, "weights": weights.identity,
         "augment": list(cc.augment), "views": n_views(cc), "seed": cc.seed}, indent=1))
    resources = ray.cluster_resources()
    if cc.gpus_per_trial > 0:
        slots = int(resources.get("GPU", 0) // cc.gpus_per_trial)
    else:
        slots = int(resources.get("CPU", 1) // max(cc.cpus_per_trial, 1))
    n_parts = -(-len(todo) // CHUNK)
    # Each task pays a TF import and a backbone build (~5 s on CPU for B0), so give each at least one part. On
    # an autoscaling cluster (which may start with no GPU node) one task per part: queued tasks start on the
    # nodes as they join, where a count taken now would leave the work to the few slots there are now.
    n_tasks = max(1, n_parts if cfg.ray.autoscaling else min(slots, n_parts))
    task = ray_task(_extraction_task, cc.cpus_per_trial, cc.gpus_per_trial, cfg.ray.max_retries,  # a lost shard
                    **runtime_env(cc.backend))
    shards = [todo.iloc[idx] for idx in np.array_split(np.arange(len(todo)), n_tasks) if len(idx)]
    wait_all(cfg, [task.remote(cc, weights, shard, str(directory)) for shard in shards], request, what)
    note(f"features: {len(todo)} images extracted into {directory.name}")
    return directory


def clean_view(cc: ClassifyConfig) -> ClassifyConfig:
    """The classifier settings of an un-augmented, view-0-only cache (quality and search in exact mode)."""
    return cc if cc.mode == "cached" else dataclasses.replace(cc, augment=(), feature_views=1)


def embed(cfg: ExperimentConfig, weights: BackboneWeights, images: pd.DataFrame, features_root: Path,
          use_ray: bool = True) -> dict[str, np.ndarray]:
    """sha256 -> un-augmented pooled features of the classifier's frozen backbone, through the cache.

    In cached mode this is the very cache the trials read (view 0), so nothing is computed twice; in exact
    mode a view-0-only cache is kept beside it."""
    cc = clean_view(cfg.classify)
    directory = ensure_features(cfg, cc, weights, images, features_root, use_ray)
    digests = list(dict.fromkeys(images["sha256"]))
    feats = FeatureCache(directory).load(digests)[:, 0].astype(np.float64)
    return dict(zip(digests, feats))


def weights_on_cluster(cfg: ExperimentConfig, cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame
                       ) -> BackboneWeights:
    """classify.weights resolved, and "calibrated" weights written where missing by a Ray task with the
    classifier's resources (the calibration runs the backbone: never in the driver, which may be a CPU head)."""
    weights = backbone_weights(cc, models_dir, manifest)
    if cc.weights != CALIBRATED or Path(weights.value).exists():
        return weights
    request = {"CPU": cc.cpus_per_trial, "GPU": cc.gpus_per_trial}
    what = (f"calibrated weights: classify.cpus_per_trial={cc.cpus_per_trial:g}, "
            f"classify.gpus_per_trial={cc.gpus_per_trial:g}")
    init_ray(cfg)
    require_resources(cfg, request, what)
    task = ray_task(_weights_task, cc.cpus_per_trial, cc.gpus_per_trial, cfg.ray.max_retries, **runtime_env(cc.backend))
    return wait_all(cfg, [task.remote(cc, models_dir, manifest)], request, what)[0]
