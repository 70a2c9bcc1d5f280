"""Pretrain stage: domain-pretrain the generator base on unlabeled images (generator.pretrain), once per content.

Runs after `data` (it needs the labelled images to refuse them) and before `finetune`. Writes
  pretrain_images.parquet            the unlabeled images it read: id, path, sha256, source_key (one list per source)
  models/pretrained/<key>/           the pretrained pipeline (diffusers folder) + ooc_ray_pretrain.json
and does nothing when generator.pretrain.source is "". Leakage rule: an image that any fold holds out must never
shape the generator, or every fold's synthetic images carry its test images; the stage refuses any pretraining
image whose bytes equal a labelled image's (a renamed copy included) or that is one re-encoded or resized
(ooc_ray.near_copies). It cannot see a cropped copy or another frame of the same field: keep the unlabeled images
from other wells, chips or days than the labelled ones (docs/pipeline.md: Pretraining).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ooc_ray.config import DataConfig, DemoDataConfig, ExperimentConfig
from ooc_ray.data import IMAGE_SUFFIXES, load_manifest, report_near_copies, visible
from ooc_ray.demo_data import CLASSES, write_demo_dataset
from ooc_ray.diffusion.base import device_and_dtype, load_pipeline, resolve_base, task_threads
from ooc_ray.diffusion.pretrain import (METADATA_FILE, pretrain, pretrain_key, pretrain_steps, pretrained_dir,
                                        save_pretrained, source_key)
from ooc_ray.errors import DataError, MissingInputError, ModelError
from ooc_ray.io import atomic_dir, parquet_problem, sha256_file, write_parquet
from ooc_ray.logs import note
from ooc_ray.near_copies import image_signatures, near_copy_pairs
from ooc_ray.keys import config_slice
from ooc_ray.gpu import require_torch_cuda
from ooc_ray.paths import ExperimentPaths
from ooc_ray.progress import StepFile, StepProgress
from ooc_ray.raycluster import init_ray, ray_task, require_resources, wait_all, where
from ooc_ray.variants import each_variant

IMAGE_COLUMNS = ["id", "path", "sha256"]


def _demo_source(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path:
    """demo_images drawn like the labelled demo set (same size and groups), with their own seed."""
    pcfg, demo = cfg.generator.pretrain, cfg.data.demo
    if pcfg.demo_seed == demo.seed:
        raise DataError(f"generator.pretrain.demo_seed: {pcfg.demo_seed} is data.demo.seed too; the unlabeled "
                        "set would redraw the labelled images")
    n = len(CLASSES)
    per_class = tuple(pcfg.demo_images // n + (i < pcfg.demo_images % n) for i in range(n))
    unlabeled = DemoDataConfig(per_class=per_class, size=demo.size, groups=demo.groups, seed=pcfg.demo_seed)
    return write_demo_dataset(paths.pretrain_data, unlabeled)


def _listed(source: Path) -> dict[str, Path]:
    """id -> file: a folder's images by their path inside it, a CSV's by its `file` entry as written (so
    moving the images with their folder or CSV keeps every id, hence the pretraining key)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and visible(p, source)
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        return {f.relative_to(source).as_posix(): f for f in files}
    if source.is_file() and source.suffix.lower() == ".csv":
        table = pd.read_csv(source)
        if "file" not in table.columns:
            raise DataError(f"{source}: no `file` column (generator.pretrain.source CSV lists unlabeled images)")
        twice = table.loc[table["file"].duplicated(), "file"]
        if len(twice):
            raise DataError(f"{source}: {twice.iloc[0]} is listed more than once")
        files = {entry: source.parent / entry for entry in table["file"].astype(str)}
        missing = [f for f in files.values() if not f.is_file()]
        if missing:
            raise MissingInputError(f"{source}: listed image not found: {missing[0]} ({len(missing)} missing)")
        return files
    raise MissingInputError(f"generator.pretrain.source: {source} is neither a folder nor a .csv file")


def unlabeled_images(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """The pretraining images: id (path relative to the source), absolute path, sha256."""
    source_name = cfg.generator.pretrain.source
    source = _demo_source(cfg, paths) if source_name == "demo" else Path(source_name).expanduser()
    files = _listed(source)
    if not files:
        raise DataError(f"generator.pretrain.source: no images in {source}")
    return pd.DataFrame({"id": list(files), "path": [str(f.resolve()) for f in files.values()],
                         "sha256": [sha256_file(f) for f in files.values()]}, columns=IMAGE_COLUMNS)


def refuse_labelled(images: pd.DataFrame, manifest: pd.DataFrame, paths: ExperimentPaths, data: DataConfig) -> None:
    """Raise, naming the first one, when a pretraining image is a labelled image: the same bytes, or the same
    picture re-encoded or resized (ooc_ray.near_copies; data.near_copies: allow lets those go with a warning)."""
    shared = images[images["sha256"].isin(set(manifest["sha256"]))]
    if len(shared):
        first = shared.iloc[0]
        label_id = manifest.loc[manifest["sha256"] == first["sha256"], "id"].iloc[0]
        raise DataError(f"generator.pretrain.source: {len(shared)} image(s) are also labelled images (e.g. "
                        f"{first['path']} = {label_id}); pretraining on them leaks held-out images into every "
                        "fold's synthetic images")
    pairs = near_copy_pairs(
        image_signatures(images["path"].tolist(), images["sha256"].tolist(), paths.pretrain_signatures),
        image_signatures(manifest["path"].tolist(), manifest["sha256"].tolist(), paths.image_signatures))
    if pairs:
        i, j = pairs[0]
        report_near_copies(data, f"generator.pretrain.source: {len({i for i, _ in pairs})} image(s) are labelled "
                                 f"images re-encoded or resized (e.g. {images['path'].iloc[i]} ~ "
                                 f"{manifest['file'].iloc[j]}); pretraining on them leaks held-out images into every "
                                 "fold's synthetic images")


def record_images(cfg: ExperimentConfig, paths: ExperimentPaths, images: pd.DataFrame) -> None:
    """pretrain_images.parquet: these images as the rows of cfg's source (diffusion.pretrain.source_key), beside
    the other sources' rows (a pretrain axis: one list per value)."""
    key = source_key(cfg)
    problem = parquet_problem(paths.pretrain_images)
    old = pd.read_parquet(paths.pretrain_images) if not problem else pd.DataFrame()
    others = old[old["source_key"] != key] if "source_key" in old.columns else old.iloc[:0]
    table = pd.concat([others, images.assign(source_key=key)], ignore_index=True)
    if problem or not table.equals(old):
        write_parquet(table, paths.pretrain_images)


def run_pretrain(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path | None | list[Path | None]:
    """Every distinct pretraining the variants of the axes ask for (a generator.pretrain axis: one base per
    value), each once. Returns the pretrained folder (None without pretraining), or with several distinct
    pretrainings the list of them in variant order."""
    done: dict = {}
    for variant, _ in each_variant(cfg, paths):
        gc = variant.cfg.generator
        settings = (gc.base, gc.resolution, gc.pretrain)
        if settings not in done:
            done[settings] = pretrain_base(variant.cfg, paths)
    folders = list(done.values())
    return folders[0] if len(folders) == 1 else folders


def pretrain_base(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path | None:
    """Pretrain the base on the unlabeled images unless that exact pretraining exists; returns its folder."""
    pcfg = cfg.generator.pretrain
    if not pcfg.source:
        note("pretrain: generator.pretrain.source is empty: LoRAs train on the base as it is")
        return None
    manifest = load_manifest(paths)
    images = unlabeled_images(cfg, paths)
    refuse_labelled(images, manifest, paths, cfg.data)
    record_images(cfg, paths, images)
    base = resolve_base(cfg.generator.base, paths.models)
    key = pretrain_key(cfg, base.identity, images)
    folder = pretrained_dir(paths, key)
    if (folder / METADATA_FILE).is_file():
        note(f"pretrain: base {key} re-used ({len(images)} images)")
        return folder
    meta = {"key": key, "base": base.identity, "config": config_slice(pcfg, "base"),
            "resolution": cfg.generator.resolution, "image_ids": images["id"].tolist(),
            "image_sha256": images["sha256"].tolist()}
    request = {"CPU": pcfg.cpus, "GPU": pcfg.gpus}
    what = f"pretrain: generator.pretrain.cpus={pcfg.cpus:g}, generator.pretrain.gpus={pcfg.gpus:g}"
    init_ray(cfg)
    require_resources(cfg, request, what)
    task = ray_task(pretrain_task, pcfg.cpus, pcfg.gpus, cfg.ray.max_retries)
    with StepProgress(steps_file(folder), "pretrain", pretrain_steps(cfg)):
        (measured,) = wait_all(cfg, [task.remote(cfg, base.path, images["path"].tolist(), str(folder), meta,
                                                 what if pcfg.gpus > 0 else "")], request, what)
    unet_loss = measured["unet_loss_steps"]
    tail = sum(unet_loss[-50:]) / len(unet_loss[-50:])
    threads = f", {measured['torch_threads']} torch threads" if "torch_threads" in measured else ""
    note(f"pretrain: base {key} trained on {len(images)} images in {measured['seconds']:.0f} s on node "
         f"{measured['node_host']}{threads} (VAE reconstruction MSE {measured['vae_recon_mse']}, "
         f"UNet loss {tail:.4f} over its last 50 steps)")
    return folder


def steps_file(folder: Path) -> Path:
    """Where a pretraining task records its steps for the driver's bar (progress.StepFile), beside its folder."""
    return folder.with_name(f"{folder.name}.steps.json")


def pretrain_task(cfg: ExperimentConfig, base_path: str, image_paths: list[str], folder: str, meta: dict,
                  gpu_request: str = "") -> dict:
    """The Ray task that pretrains: load the base, train it on the images, save it into `folder` atomically;
    returns the measurements and the node. Run again after its node died, it finds the folder of an attempt that
    finished and returns that one's measurements (the node is not written into the folder: its files are the
    base's identity)."""
    folder = Path(folder)
    if (folder / METADATA_FILE).is_file():
        return {**json.loads((folder / METADATA_FILE).read_text()), "seconds": 0.0, **where()}
    if gpu_request:
        require_torch_cuda(gpu_request)
    device, _ = device_and_dtype()
    with task_threads(cfg.generator.pretrain.cpus) as threads:
        pipe = load_pipeline(base_path, device=device)  # fp32 weights: they are trained, not only run
        try:
            measured = pretrain(pipe, image_paths, cfg, StepFile(steps_file(folder), pretrain_steps(cfg)).step)
        except FloatingPointError as exc:
            raise ModelError(f"generator.pretrain: {exc}") from None
    with atomic_dir(folder) as tmp:
        save_pretrained(pipe, {**meta, **measured}, tmp)
    # Its threads are a fact of the run, as its seconds and node are, not of the base: the folder's bytes are the
    # base's identity, and other threads give other bytes anyway.
    return {**measured, "torch_threads": threads, **where()}
