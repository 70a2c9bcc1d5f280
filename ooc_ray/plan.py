"""`ooc-ray plan CONFIG`: what `run` would make and what it would re-use, per stage and variant, with a time
estimate from the unit costs this results folder has recorded; read-only (no lock, no Ray, nothing written).

Counts come from the stages' own planning functions, so they are the numbers `run` then reports. What cannot be
known before an earlier stage has run is said so: every LoRA key holds the base's identity (a pretrained base's
files), every image key its LoRA's tensors, every trial key its images' bytes; until they exist, all of that
stage's work counts as new.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ooc_ray.backbones import backbone_weights
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import load_manifest
from ooc_ray.diffusion.base import BaseModel, base_ready
from ooc_ray.diffusion.lora_files import METADATA_FILE, lora_problem, read_metadata
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import OocRayError
from ooc_ray.io import parquet_problem
from ooc_ray.paths import ExperimentPaths
from ooc_ray.protocol import grid_points, plan_loras, pool_sizes
from ooc_ray.sample import plan_pools
from ooc_ray.trainsets import plan_grid
from ooc_ray.trial_files import trial_problem
from ooc_ray.variants import each_variant

# Seconds per unit where this results folder has recorded none, on CPU (the tiny demo, 2 cores): a LoRA, an
# image, a trial. A GPU run of SD v1.5 differs by orders of magnitude: the estimate says which it used.
DEFAULT_COSTS = {"lora": 1.2, "image": 0.4, "trial": 1.5}


@dataclass
class Count:
    planned: int = 0
    reused: int = 0
    known: bool = True  # False: keys depend on work not done yet, so nothing can be matched (all new)
    keys: set = field(default_factory=set)

    @property
    def new(self) -> int:
        return self.planned - self.reused


def known_base(cfg: ExperimentConfig, paths: ExperimentPaths) -> BaseModel | None:
    """The generator base if it is there (built, downloaded, pretrained for the current images), else None;
    never builds, downloads or pretrains."""
    if not base_ready(cfg.generator.base, paths.models):
        return None
    try:
        return generator_base(cfg, paths)
    except OocRayError:  # pretraining not run for these settings or images
        return None


def unit_costs(paths: ExperimentPaths) -> tuple[dict[str, float], str]:
    """Median seconds per LoRA, image and trial recorded in this results folder, else DEFAULT_COSTS."""
    costs, seen = dict(DEFAULT_COSTS), []
    metadata = [read_metadata(p.parent) for p in paths.lora.glob(f"*/{METADATA_FILE}")]
    loras = [m["seconds"] for m in metadata if m and m.get("seconds")]
    if loras:
        costs["lora"] = statistics.median(loras)
        seen.append(f"{len(loras)} LoRAs")
    if not parquet_problem(paths.synthetic_table):
        render = pd.read_parquet(paths.synthetic_table, columns=["render_s"])["render_s"].dropna()
        if len(render):
            costs["image"] = float(render.median())
            seen.append(f"{len(render)} images")
    trials = [float(pd.read_parquet(p, columns=["duration_s"])["duration_s"].iloc[0])
              for p in paths.trials.glob("*.parquet") if not trial_problem(paths, p.stem)]
    if trials:
        costs["trial"] = statistics.median(trials)
        seen.append(f"{len(trials)} trials")
    said = ("recorded here: " + ", ".join(seen)) if seen else "no run recorded here: CPU defaults of the tiny demo"
    return costs, said


def _count_loras(c: Count, jobs: list, base: BaseModel | None, lora_root: Path) -> set[str]:
    """Add a variant's LoRA jobs to `c`; returns the keys of those not trained yet (all, with no base)."""
    if base is None:
        c.known, c.planned = False, c.planned + len(jobs)
        return {job.key for job in jobs}
    todo = {job.key for job in jobs if lora_problem(lora_root / job.key)}
    fresh = {job.key for job in jobs} - c.keys
    c.keys |= fresh
    c.planned += len(fresh)
    c.reused += len(fresh - todo)
    return todo


def _count_images(c: Count, cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame, jobs: list,
                  exact: bool) -> bool:
    """Add a variant's pool images to `c` (by path when its LoRAs are trained); returns whether all are there."""
    if exact:
        _, plan = plan_pools(cfg, paths, manifest)
        there = plan["path"].map(lambda p: Path(p).is_file())
        fresh = ~plan["path"].isin(c.keys)
        c.keys |= set(plan["path"])
        c.planned += int(fresh.sum())
        c.reused += int((fresh & there).sum())
        return bool(there.all())
    by = ["fold", "label", "group"] if cfg.generator.per_group else ["fold", "label"]
    n_pool = pool_sizes(manifest, cfg).set_index(by)["n_pool"]
    c.known = False
    c.planned += sum(int(n_pool.loc[(j.fold, label, j.group)[:len(by)]]) for j in jobs for label in j.labels())
    return False


def _count_trials(c: Count, cfg: ExperimentConfig, paths: ExperimentPaths, vpaths: ExperimentPaths,
                  manifest: pd.DataFrame, images_there: bool) -> None:
    """Add a variant's trials to `c` (by key once its pools are sampled and recorded)."""
    planned = None
    if images_there and not parquet_problem(vpaths.synthetic_table):
        try:
            ((_, planned),) = plan_grid(cfg, vpaths, manifest,
                                        lambda cc: backbone_weights(cc, paths.models, manifest).identity)
        except OocRayError:  # a pool the table does not cover yet
            planned = None
    if planned is None:
        c.known = False
        c.planned += len(grid_points(cfg, sorted(manifest["fold"].unique())))
        return
    fresh = [t for t in planned if t.key not in c.keys]
    c.keys |= {t.key for t in fresh}
    c.planned += len(fresh)
    c.reused += sum(not trial_problem(paths, t.key) for t in fresh)  # as classify decides what to run again


def plan_counts(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame) -> dict[str, Count]:
    """Pretrained bases, LoRAs, images and trials over every variant, each distinct unit of work once."""
    out = {"pretrain": Count(), "finetune": Count(), "sample": Count(), "classify": Count()}
    for variant, vpaths in each_variant(cfg, paths):
        vcfg = variant.cfg
        base = known_base(vcfg, vpaths)
        if vcfg.generator.pretrain.source:
            out["pretrain"].planned += 1
            out["pretrain"].reused += base is not None
        jobs = plan_loras(vcfg, manifest, base.identity if base else "unknown")
        todo = _count_loras(out["finetune"], jobs, base, paths.lora)
        there = _count_images(out["sample"], vcfg, vpaths, manifest, jobs, exact=base is not None and not todo)
        _count_trials(out["classify"], vcfg, paths, vpaths, manifest, there)
    return out


def run_plan(cfg: ExperimentConfig, paths: ExperimentPaths) -> dict[str, Count] | None:
    """Print (and return) the plan of cfg: per stage, planned / re-used / new, and the time the new work takes."""
    problem = parquet_problem(paths.manifest)
    if problem:
        print(f"{cfg.name}: no manifest yet: run `ooc-ray data` first (seconds): every count is computed from it "
              f"({paths.manifest}: {problem})")
        return None
    manifest = load_manifest(paths)
    counts = plan_counts(cfg, paths, manifest)
    costs, said = unit_costs(paths)
    variants = len(list(each_variant(cfg, paths)))
    print(f"{cfg.name}: {len(manifest)} images, {manifest['fold'].nunique()} folds"
          + (f", {variants} variants" if variants > 1 else ""))
    total = 0.0
    pretrain = counts["pretrain"]
    if pretrain.planned:
        print(f"pretrain: {pretrain.planned} base(s), {pretrain.reused} ready, {pretrain.new} to pretrain")
    for stage, unit, what in (("finetune", "lora", "LoRAs"), ("sample", "image", "images"),
                              ("classify", "trial", "trials")):
        c = counts[stage]
        seconds = c.new * costs[unit]
        total += seconds
        reuse = f"{c.reused} re-used, {c.new} new" if c.known else "all new (their keys need the stage before)"
        print(f"{stage}: {c.planned} {what} planned, {reuse}; ~{seconds / 60:.1f} min at {costs[unit]:.2f} s each")
    print(f"total: ~{total / 60:.1f} min of work on one worker (divide by the workers that run it; unit costs "
          f"{said})")
    return counts
