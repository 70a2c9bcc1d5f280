"""Sample stage: synthetic image pools from the LoRAs, with Ray Data actors that each hold one loaded pipeline.

Plan (deterministic, pure): for every LoRA x weight, images 0..n_pool-1, each with its own seed derived from
(sample.seed, lora key, weight, index). Outputs:
  synthetic/<lora_key>/s<sample_key>/w<weight>/<index>.png   one atomic file per image
  synthetic.parquet                                           provenance, one row per image of the plan
sample_key hashes the sampling config slice, the base and the LoRA's tensors (weights_sha256), so changing any of them
writes a new folder instead of mixing old and new images. An image whose PNG exists is never regenerated;
because every plan row is a pure function of the config, the table is rebuilt from the plan for the PNGs on
disk, so a killed run resumes per image and the table never holds a duplicate or a missing row.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import pandas as pd

from ooc_ray.config import ExperimentConfig, slice_key
from ooc_ray.data import load_image, load_manifest
from ooc_ray.finetune import ALL_FOLDS, lora_table, plan_loras, training_rows
from ooc_ray.io import atomic_path, write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.tiny_sd import device_and_dtype, load_pipeline, resolve_base

SAMPLERS = {"euler_a": "EulerAncestralDiscreteScheduler"}
FAIL_AFTER_ENV = "OOC_RAY_SAMPLE_FAIL_AFTER"  # test hook: a worker raises after writing this many images
MAX_ADAPTERS = 16  # LoRAs kept loaded per actor (~3 MB each at rank 8 on SD v1.5); least recently used go
TABLE_COLUMNS = [
    "id", "path", "label", "group", "fold", "lora_key", "lora_sha256", "weight", "index", "prompt",
    "negative_prompt", "seed", "sampler", "steps", "cfg", "strength", "mode", "init_image_id", "base_model",
    "width", "height", "sample_key",
]
# Columns the workers need but analysts do not.
_WORK_COLUMNS = ["lora_dir", "lora_file", "init_path"]


def max_ratio(cfg: ExperimentConfig) -> float:
    """Largest synthetic share the classifier grid asks for (synthetic-only needs 1x n_train)."""
    return max(max(cfg.classify.ratios, default=0.0), 1.0 if cfg.classify.synthetic_only else 0.0)


def pool_sizes(manifest: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Images to sample per (fold, label[, group]) and LoRA weight: ceil(max ratio x training count).

    Columns fold, label, [group,] n_train, n_pool. For split "all" (fold = ALL_FOLDS) n_train is the largest
    training count over the folds, so the one shared pool serves every fold."""
    r = max_ratio(cfg)
    keys = ["label", "group"] if cfg.generator.per_group else ["label"]
    folds = sorted(int(f) for f in manifest["fold"].unique())
    per_fold = []
    for fold in folds:
        counts = training_rows(manifest, fold).groupby(keys).size().rename("n_train").reset_index()
        per_fold.append(counts.assign(fold=fold))
    table = pd.concat(per_fold, ignore_index=True)
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point and must not become 4.
    table["n_pool"] = [math.ceil(round(r * n, 9)) for n in table["n_train"]]
    if not cfg.generator.per_group:
        # The classify stage rounds the fold's total first and splits it over classes (largest remainder), which
        # can give a class one image more than ceil(r x n_class) when the largest ratio is not 1: take the max.
        table["n_pool"] = [max(n, _classify_draw(manifest, cfg, fold, label))
                           for n, fold, label in zip(table["n_pool"], table["fold"], table["label"])]
    if cfg.generator.split == "all":
        table = table.groupby(keys, as_index=False)[["n_train", "n_pool"]].max().assign(fold=ALL_FOLDS)
    return table[["fold", *keys, "n_train", "n_pool"]].sort_values(["fold", *keys], ignore_index=True)


def _classify_draw(manifest: pd.DataFrame, cfg: ExperimentConfig, fold: int, label: str) -> int:
    """Most synthetic images of `label` any trial of fold `fold` draws (the classify stage's own arithmetic)."""
    import numpy as np

    from ooc_ray.classify.trainsets import largest_remainder, round_half_up
    from ooc_ray.data import class_names

    classes = class_names(manifest) if "label_index" in manifest else sorted(manifest["label"].unique())
    train = training_rows(manifest, fold)
    counts = np.array([(train["label"] == c).sum() for c in classes])
    c = classes.index(label)
    totals = [round_half_up(r * len(train)) for r in cfg.classify.ratios]
    totals += [len(train)] if cfg.classify.synthetic_only else []
    return max((int(largest_remainder(t, counts)[c]) for t in totals), default=0)


def image_seed(base_seed: int, lora_key: str, weight: float, index: int) -> int:
    """Per-image seed, stable across runs/machines (sha256, not Python's salted hash); < 2**63 for Parquet."""
    # Plain Python types first: repr(np.float64(1.0)) is "np.float64(1.0)", not "1.0".
    text = f"{int(base_seed)}|{str(lora_key)}|{float(weight)!r}|{int(index)}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def sample_slice(cfg: ExperimentConfig) -> dict:
    """What decides an image's pixels, besides its LoRA, weight and seed."""
    s = cfg.sample
    return {"sampler": s.sampler, "steps": s.steps, "cfg": s.cfg, "mode": s.mode, "resolution": s.resolution,
            "strength": s.strength if s.mode == "img2img" else None, "negative_prompt": s.negative_prompt,
            "seed": s.seed, "output_size": s.output_size}


def plan_samples(cfg: ExperimentConfig, paths: ExperimentPaths, loras: pd.DataFrame,
                 manifest: pd.DataFrame) -> pd.DataFrame:
    """Every image to have on disk: one row per (LoRA, weight, index) with all its provenance."""
    from ooc_ray.finetune import base_spec

    s = cfg.sample
    keys = ["fold", "label", "group"] if cfg.generator.per_group else ["fold", "label"]
    sizes = pool_sizes(manifest, cfg).set_index(keys)["n_pool"]
    paths_by_id = manifest.set_index("id")["path"]
    jobs = {j.key: j for j in plan_loras(cfg, manifest)}
    out_size = s.output_size or s.resolution
    rows = []
    for lora in loras.itertuples(index=False):
        n = int(sizes.loc[tuple(getattr(lora, k) for k in keys)])
        skey = slice_key(sample_slice(cfg), base_spec(cfg.generator), lora.weights_sha256)
        init_ids = jobs[lora.lora_key].image_ids  # img2img starts from this LoRA's own training images
        for weight in s.weights:
            folder = paths.synthetic / lora.lora_key / f"s{skey}" / f"w{weight}"
            for i in range(n):
                init_id = init_ids[i % len(init_ids)] if s.mode == "img2img" else ""
                rows.append({
                    "id": f"{lora.lora_key}-s{skey}-w{weight}-{i:05d}", "path": str(folder / f"{i:05d}.png"),
                    "label": lora.label, "group": lora.group, "fold": int(lora.fold), "lora_key": lora.lora_key,
                    "lora_sha256": lora.sha256, "weight": float(weight), "index": i, "prompt": lora.prompt,
                    "negative_prompt": s.negative_prompt, "seed": image_seed(s.seed, lora.lora_key, weight, i),
                    "sampler": s.sampler, "steps": s.steps, "cfg": s.cfg,
                    # txt2img starts from pure noise, i.e. strength 1.0.
                    "strength": s.strength if s.mode == "img2img" else 1.0, "mode": s.mode,
                    "init_image_id": init_id, "base_model": cfg.generator.base, "width": out_size,
                    "height": out_size, "sample_key": skey, "lora_dir": lora.dir, "lora_file": lora.file,
                    "init_path": str(paths_by_id[init_id]) if init_id else "",
                })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS + _WORK_COLUMNS)


class SampleWorker:
    """Ray Data callable class: loads the pipeline once (in __init__), then renders batches of plan rows.

    Adapters are loaded once per actor and switched with set_adapters (never fused: fuse/unfuse does not
    restore the base exactly, and weight 0.0 must reproduce the base image bit for bit)."""

    def __init__(self, base_path: str, mode: str, sampler: str, resolution: int, fail_after: int = 0):
        import diffusers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a second adapter in the text encoder prints a MISSING-keys report
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # many adapters are intended
        device, dtype = device_and_dtype()
        self.pipe = load_pipeline(base_path, img2img=mode == "img2img", device=device, dtype=dtype)
        self.pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(self.pipe.scheduler.config)
        self.mode, self.resolution = mode, resolution
        self.adapters: OrderedDict[str, None] = OrderedDict()
        self.fail_after, self.written = fail_after, 0

    def _activate(self, key: str, lora_dir: str, lora_file: str, weight: float) -> None:
        if key in self.adapters:
            self.adapters.move_to_end(key)
        else:
            if len(self.adapters) >= MAX_ADAPTERS:
                old, _ = self.adapters.popitem(last=False)
                self.pipe.delete_adapters(old)
            self.pipe.load_lora_weights(lora_dir, weight_name=lora_file, adapter_name=key)
            self.adapters[key] = None
        self.pipe.set_adapters([key], adapter_weights=[weight])

    def render(self, rows: pd.DataFrame) -> list:
        """PIL images for one planned batch (rows sharing one lora_key and weight)."""
        import torch

        first = rows.iloc[0]
        self._activate(first.lora_key, first.lora_dir, first.lora_file, float(first.weight))
        kwargs = {
            "prompt": list(rows.prompt), "num_inference_steps": int(first.steps), "guidance_scale": float(first.cfg),
            # CPU generators: the same seed gives the same image on any device.
            "generator": [torch.Generator().manual_seed(int(s)) for s in rows.seed],
        }
        if first.negative_prompt:
            kwargs["negative_prompt"] = list(rows.negative_prompt)
        if self.mode == "img2img":
            kwargs["image"] = [load_image(p, size=self.resolution) for p in rows.init_path]
            kwargs["strength"] = float(first.strength)
        else:
            kwargs["height"] = kwargs["width"] = self.resolution
        return self.pipe(**kwargs).images

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Render exactly the planned batches (one LoRA and weight each), however Ray groups blocks.
        for _, rows in batch.groupby("batch", sort=False):
            for row, image in zip(rows.itertuples(index=False), self.render(rows)):
                if os.path.exists(row.path):  # rendered only to keep its batch whole: never rewritten
                    continue
                if image.size != (row.width, row.height):
                    image = image.resize((row.width, row.height), resample=3)  # 3 = bicubic
                with atomic_path(row.path) as tmp:
                    image.save(tmp, format="PNG")
                self.written += 1
                if self.fail_after and self.written >= self.fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_ENV}: simulated crash after {self.written} images")
        return pd.DataFrame({"id": batch["id"].to_numpy()})


def _pending_batches(plan: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Fixed batches (index // batch_size within one LoRA and weight) that still miss a PNG.

    A batch's composition changes its floating-point results in the last bits (batched matmuls), so batches
    are cut from the plan, not from what is left: a resumed run re-renders a partly finished batch whole
    (writing only its missing files) and every image comes out bit-identical to an uninterrupted run."""
    plan = plan.sort_values(["lora_key", "weight", "index"], ignore_index=True)
    batch_no = plan["index"] // batch_size
    missing = ~plan["path"].map(os.path.exists)
    return [rows.assign(batch=f"{key}|{weight}|{no}").reset_index(drop=True)
            for (key, weight, no), rows in plan.groupby(["lora_key", "weight", batch_no], sort=True)
            if missing[rows.index].any()]


def _clean_partial(batches: list[pd.DataFrame]) -> None:
    # A SIGKILL inside atomic_path leaves a hidden .<name>.*.tmp beside the PNG: remove those of pending images.
    for folder in {Path(p).parent for rows in batches for p in rows["path"]}:
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


def n_actors(cfg: ExperimentConfig, ray=None) -> int:
    s = cfg.sample
    if s.actors:
        return s.actors
    if s.gpus_per_actor > 0 and ray is not None:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // s.gpus_per_actor))
    return 1


def generate(plan: pd.DataFrame, cfg: ExperimentConfig, paths: ExperimentPaths, use_ray: bool = True) -> int:
    """Render the plan's missing images; returns how many were rendered.

    use_ray=False runs the same worker in this process (the benchmark's baseline, quick tests)."""
    s = cfg.sample
    batches = _pending_batches(plan, s.batch_size)
    if not batches:
        return 0
    _clean_partial(batches)
    n_rows = sum(len(b) for b in batches)
    kwargs = {"base_path": resolve_base(cfg.generator.base, paths.models), "mode": s.mode, "sampler": s.sampler,
              "resolution": s.resolution, "fail_after": int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)}
    if not use_ray:
        worker = SampleWorker(**kwargs)
        for batch in batches:
            worker(batch)
        return n_rows

    import ray.data

    from ooc_ray.raycluster import init_ray

    ray = init_ray(cfg)
    size = min(n_actors(cfg, ray), len(batches))
    # One block per batch, so that the actor pool can spread blocks over its actors (one block is one task).
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_pandas(batches)
    gpu = {"num_gpus": s.gpus_per_actor} if s.gpus_per_actor > 0 else {}
    ds = ds.map_batches(
        # batch_size=None: one block = one planned batch; a row count would re-cut batches across blocks.
        SampleWorker, fn_constructor_kwargs=kwargs, batch_size=None, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=size), **gpu,
    )
    ds.materialize()
    return n_rows


def consolidate(plan: pd.DataFrame, paths: ExperimentPaths) -> pd.DataFrame:
    """synthetic.parquet from the plan rows whose PNG exists; raises if any image is missing."""
    have = plan["path"].map(os.path.exists)
    if not have.all():
        missing = plan.loc[~have, "path"]
        raise RuntimeError(f"{len(missing)} synthetic images missing after sampling, e.g. {missing.iloc[0]}")
    table = plan[TABLE_COLUMNS].reset_index(drop=True)
    if table.duplicated(["lora_key", "weight", "index"]).any():  # guards the invariant the resume relies on
        raise RuntimeError("duplicate (lora_key, weight, index) rows in the sampling plan")
    write_parquet(table, paths.synthetic_table)
    return table


def sample_all(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame,
               use_ray: bool = True) -> pd.DataFrame:
    plan = plan_samples(cfg, paths, lora_table(cfg, paths, manifest), manifest)
    generate(plan, cfg, paths, use_ray=use_ray)
    return consolidate(plan, paths)


def run_sample(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Sample every pool through Ray Data; returns the synthetic table (also at paths.synthetic_table)."""
    return sample_all(cfg, paths, load_manifest(paths))
