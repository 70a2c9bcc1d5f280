"""Sample stage: synthetic image pools from the LoRAs, with Ray Data actors that each hold one loaded pipeline.

Plan (deterministic, pure): for every LoRA x weight, images 0..n_pool-1 (protocol.pool_sizes), each with its own
seed derived from (sample.seed, LoRA key, weight, index). Outputs:
  synthetic/<lora_key>/s<pool_key>/w<weight>/<index>.png   one atomic file per image
  synthetic/<lora_key>/s<pool_key>/w<weight>/pool.parquet  that pool's provenance, append-only
  synthetic.parquet                                         the current config's pools, one row per image
pool_key (ooc_ray.keys.pool_key) hashes the sampling result fields, the base's identity, the LoRA's tensors and,
for img2img, the images it starts from, so changing any of them writes a new folder instead of mixing old and new
images; resource fields (batch size, actors, GPUs) do not enter it. An image whose PNG exists and is whole is
never rendered again, so a killed run resumes per image and the table never holds a duplicate or a missing row.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import diffusers
import pandas as pd
import pyarrow.parquet as pq
import ray.data as ray_data
import torch
from transformers.utils import logging as hf_logging

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import load_image, load_manifest
from ooc_ray.diffusion.base import BaseModel, device_and_dtype, load_pipeline
from ooc_ray.diffusion.lora_files import trained_table
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import StageError
from ooc_ray.gpu import require_torch_cuda
from ooc_ray.io import atomic_path, image_problem, note, parquet_problem, sha256_file, write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.progress import FileProgress
from ooc_ray.protocol import LoraJob, plan_loras, pool_sizes, safe_name
from ooc_ray.raycluster import init_ray, require_resources
from ooc_ray.variants import each_variant, per_variant

SAMPLERS = {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler"}
FAIL_AFTER_ENV = "OOC_RAY_SAMPLE_FAIL_AFTER"  # test hook: a worker raises after writing this many images
MAX_ADAPTERS = 16  # LoRAs kept loaded per actor (~3 MB each at rank 8 on SD v1.5); least recently used go
POOL_FILE = "pool.parquet"
TABLE_COLUMNS = [
    "id", "path", "sha256", "label", "group", "fold", "lora_key", "lora_sha256", "weight", "index", "prompt",
    "negative_prompt", "seed", "sampler", "clip_sample", "steps", "cfg", "strength", "mode", "init_image_id",
    "base_model", "width", "height", "sample_key", "render_s",
]
# Columns the workers need but analysts do not.
_WORK_COLUMNS = ["lora_dir", "lora_file", "init_path"]


def image_seed(base_seed: int, lora_key: str, weight: float, index: int) -> int:
    """Per-image seed, stable across runs/machines (sha256, not Python's salted hash); < 2**63 for Parquet."""
    # Plain Python types first: repr(np.float64(1.0)) is "np.float64(1.0)", not "1.0".
    text = f"{int(base_seed)}|{str(lora_key)}|{float(weight)!r}|{int(index)}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _pool_rows(cfg: ExperimentConfig, base: BaseModel, lora, label: str, n: int, init: pd.DataFrame, root: Path
               ) -> list[dict]:
    """Plan rows of one LoRA's pools of class `label` (every weight), images 0..n-1. A class LoRA draws its own
    class with its own prompt; a data-set LoRA (label "") draws each class with that class's prompt, into a
    folder, ids and seeds of the class's own."""
    s = cfg.sample
    img2img = s.mode == "img2img"
    pkey = keys.pool_key(cfg, base.identity, lora.weights_sha256, init if img2img else None)
    out_size = s.output_size or s.resolution
    whole = lora.label == ""
    prompt = lora.prompt.format(label=label, group="") if whole else lora.prompt
    stem = f"{lora.lora_key}-{safe_name(label)}" if whole else lora.lora_key  # ids, folders and seeds per class
    rows = []
    for weight in s.weights:
        folder = root / lora.lora_key / f"s{pkey}" / f"w{weight:g}"
        folder = folder / safe_name(label) if whole else folder
        for i in range(n):
            start = init.iloc[i % len(init)] if img2img else None  # this LoRA's own training images, in id order
            rows.append({
                "id": f"{stem}-s{pkey}-w{weight:g}-{i:05d}", "path": str(folder / f"{i:05d}.png"),
                "sha256": "", "label": label, "group": lora.group, "fold": int(lora.fold),
                "lora_key": lora.lora_key, "lora_sha256": lora.sha256, "weight": float(weight), "index": i,
                "prompt": prompt, "negative_prompt": s.negative_prompt,
                "seed": image_seed(s.seed, stem, weight, i), "sampler": s.sampler,
                "clip_sample": s.clip_sample, "steps": s.steps, "cfg": s.cfg,
                "strength": s.strength if img2img else 1.0,  # txt2img starts from pure noise
                "mode": s.mode, "init_image_id": start["id"] if img2img else "", "base_model": base.identity,
                "width": out_size, "height": out_size, "sample_key": pkey, "render_s": float("nan"),
                "lora_dir": lora.dir,
                "lora_file": lora.file, "init_path": start["path"] if img2img else "",
            })
    return rows


def plan_images(cfg: ExperimentConfig, base: BaseModel, loras: pd.DataFrame, sizes: dict[tuple[str, str], int],
                starts: dict[tuple[str, str], pd.DataFrame], root: Path) -> pd.DataFrame:
    """Every image to have on disk: one row per (LoRA, class, weight, index) with all its provenance.

    loras: diffusion.lora.trained_table rows; sizes: images per (LoRA key, class); starts: per (LoRA key,
    class), the real images (id, path, sha256) img2img starts from."""
    labels: dict[str, list[str]] = {}
    for key, label in sizes:
        labels.setdefault(key, []).append(label)
    rows = []
    for lora in loras.itertuples(index=False):
        for label in labels.get(lora.lora_key, []):
            key = (lora.lora_key, label)
            rows += _pool_rows(cfg, base, lora, label, sizes[key], starts[key], root)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS + _WORK_COLUMNS)


class SampleWorker:
    """Ray Data callable class: loads the pipeline once (in __init__), then renders batches of plan rows.

    Adapters are loaded once per actor and switched with set_adapters (never fused: fuse/unfuse does not
    restore the base exactly, and weight 0.0 must reproduce the base image bit for bit)."""

    def __init__(self, base_path: str, mode: str, sampler: str, resolution: int, fail_after: int = 0,
                 gpu_request: str = "", clip_sample: float = 0.0, cpu_threads: int = 0):
        if cpu_threads:  # a CPU-only Ray actor: Ray left it one thread (cpus_per_cpu_actor)
            torch.set_num_threads(cpu_threads)

        hf_logging.set_verbosity_error()  # a second adapter in the text encoder prints a MISSING-keys report
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # many adapters are intended
        if gpu_request:  # this actor was given GPUs: sampling SD on its CPU instead would take days
            require_torch_cuda(gpu_request)
        device, dtype = device_and_dtype()
        self.pipe = load_pipeline(base_path, img2img=mode == "img2img", device=device, dtype=dtype)
        clip = {"clip_sample": True, "clip_sample_range": clip_sample} if clip_sample else {}
        self.pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(self.pipe.scheduler.config, **clip)
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
            with warnings.catch_warnings():
                # peft warns, and loads the rest, when the file lacks modules its own config names: a LoRA
                # partly applied would sample plausible images from the wrong model.
                warnings.filterwarnings("error", message=".*inconsistency was discovered between the PEFT config")
                try:
                    self.pipe.load_lora_weights(lora_dir, weight_name=lora_file, adapter_name=key)
                except RuntimeWarning as exc:
                    raise StageError(f"LoRA {Path(lora_dir) / lora_file} does not load whole: "
                                     f"{str(exc)[:300]}") from None
            self.adapters[key] = None
        self.pipe.set_adapters([key], adapter_weights=[weight])

    def render(self, rows: pd.DataFrame) -> list:
        """PIL images for one planned batch (rows sharing one lora_key and weight)."""
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
        seconds = pd.Series(float("nan"), index=batch["id"].to_numpy())
        for _, rows in batch.groupby("batch", sort=False):
            start = time.perf_counter()
            images = self.render(rows)
            each = (time.perf_counter() - start) / len(rows)  # the report's cost per arm (sampling seconds)
            for row, image in zip(rows.itertuples(index=False), images):
                if os.path.exists(row.path):  # rendered only to keep its batch whole: never rewritten
                    continue
                seconds[row.id] = each
                if image.size != (row.width, row.height):
                    image = image.resize((row.width, row.height), resample=3)  # 3 = bicubic
                with atomic_path(row.path) as tmp:
                    image.save(tmp, format="PNG")
                self.written += 1
                if self.fail_after and self.written >= self.fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_ENV}: simulated crash after {self.written} images")
        return pd.DataFrame({"id": seconds.index, "render_s": seconds.to_numpy()})


def _recorded(plan: pd.DataFrame, column: str = "sha256") -> dict:
    """path -> `column` from the pool.parquet files of the plan's folders (images finished in earlier runs); pools
    written before a column existed give none."""
    out: dict = {}
    for folder in {Path(p).parent for p in plan["path"]}:
        pool = folder / POOL_FILE
        if not parquet_problem(pool) and column in pq.read_schema(pool).names:
            done = pd.read_parquet(pool, columns=["path", column])
            out.update(zip(done["path"], done[column]))
    return out


def _drop_damaged(plan: pd.DataFrame) -> None:
    """Remove (naming it) every planned PNG that is not whole: bytes other than recorded, or undecodable.
    A SIGKILL inside atomic_path leaves a hidden .<name>.*.tmp beside the PNG: remove those too."""
    recorded = _recorded(plan)
    for path in plan["path"]:
        if not os.path.exists(path):
            continue
        problem = (("bytes differ from pool.parquet" if sha256_file(path) != recorded[path] else "")
                   if path in recorded else image_problem(path))
        if problem:
            note(f"sample: {path} is damaged ({problem}): rendering it again")
            os.remove(path)
    for folder in {Path(p).parent for p in plan["path"]}:
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


def pending_batches(plan: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Fixed batches (index // batch_size within one pool: LoRA, sampling settings, class and weight) that still
    miss a PNG.

    A batch's composition changes its floating-point results in the last bits (batched matmuls), so batches
    are cut from the plan, not from what is left: a resumed run re-renders a partly finished batch whole
    (writing only its missing files) and every image comes out bit-identical to an uninterrupted run."""
    # One class per class LoRA, so adding the label changes no batch of theirs; a data-set LoRA's classes are
    # batched apart (their indices restart at 0 per class); pools of other sampling settings (sample_key: another
    # variant of the axes) are batched apart too.
    by = ["lora_key", "sample_key", "label", "weight"]
    plan = plan.sort_values([*by, "index"], ignore_index=True)
    batch_no = plan["index"] // batch_size
    missing = ~plan["path"].map(os.path.exists)
    return [rows.assign(batch="|".join(map(str, point))).reset_index(drop=True)
            for point, rows in plan.groupby([*(plan[c] for c in by), batch_no], sort=True)
            if missing[rows.index].any()]


def actor_pool_size(cfg: ExperimentConfig, n_batches: int, ray=None) -> tuple[int, int]:
    """(min, max) sampling actors. sample.actors fixes both. With GPUs the pool may grow to one actor per batch:
    Ray Data adds actors as GPUs free up or join (an autoscaling cluster may start with none), instead of
    keeping the count the cluster had at start. On CPUs one actor by default: each actor holds its own copy of
    the pipeline (SD v1.5 in fp32: ~4 GB). For a small base, set sample.actors to the cores: the demo's 208
    images took 53 s with 2 one-thread actors vs 85 s with 1 two-thread actor (the tiny UNet gains little from a
    second thread: 38 s vs 44 s in-process)."""
    s = cfg.sample
    if s.actors:
        return min(s.actors, n_batches), min(s.actors, n_batches)
    if s.gpus_per_actor > 0:
        now = int(ray.cluster_resources().get("GPU", 0) // s.gpus_per_actor) if ray is not None else 1
        return max(1, min(now, n_batches)), n_batches
    return 1, 1


def cpus_per_cpu_actor(ray, n_actors: int) -> int:
    """Torch threads for each CPU-only sampling actor: the largest node's CPUs shared by the actors. Ray sets an
    actor's OMP_NUM_THREADS (hence torch's threads) to the CPUs it reserves, 1 by default; the demo's one actor
    then sampled on one of two cores (208 images: 74 s on 1 thread, 63 s on 2, 41 s in-process on 2). The
    threads are set in the actor, not reserved: an actor reserving every core can block a resumed run while a
    crashed run's actor still holds them (CI hung there once, while the disk was also full). The thread count can
    change an image in its last bits (1 vs 2 threads: 1 of the demo's 208 PNGs differed); every image's sha256
    is recorded and is what later keys hold, so a pool re-sampled on other threads never passes as the old one."""
    node_cpus = max((n.get("Resources", {}).get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    return max(1, int(node_cpus) // max(1, n_actors))


def _render_with_ray(cfg: ExperimentConfig, batches: list[pd.DataFrame], worker_kwargs: dict) -> pd.DataFrame:
    s = cfg.sample
    ray = init_ray(cfg)
    require_resources(cfg, {"CPU": 1, "GPU": s.gpus_per_actor}, f"sample: sample.gpus_per_actor={s.gpus_per_actor:g}")
    min_size, max_size = actor_pool_size(cfg, len(batches), ray)
    # One block per batch, so that the actor pool can spread blocks over its actors (one block is one task).
    ray_data.DataContext.get_current().enable_progress_bars = False
    ds = ray_data.from_pandas(batches)
    if s.gpus_per_actor > 0:
        resources = {"num_gpus": s.gpus_per_actor}
    else:
        resources, worker_kwargs = {}, {**worker_kwargs, "cpu_threads": cpus_per_cpu_actor(ray, max_size)}
    ds = ds.map_batches(
        # batch_size=None: one block = one planned batch; a row count would re-cut batches across blocks.
        SampleWorker, fn_constructor_kwargs=worker_kwargs, batch_size=None, batch_format="pandas",
        compute=ray_data.ActorPoolStrategy(min_size=min_size, max_size=max_size), **resources,
    )
    return ds.to_pandas()


def render(plan: pd.DataFrame, cfg: ExperimentConfig, base: BaseModel, use_ray: bool = True) -> dict[str, float]:
    """Render the plan's missing (or damaged) images; returns {id: seconds} of each image rendered.

    use_ray=False runs the same worker in this process (the search, the benchmark's baseline, quick tests)."""
    s = cfg.sample
    _drop_damaged(plan)
    batches = pending_batches(plan, s.batch_size)
    if not batches:
        return {}
    missing = plan.loc[~plan["path"].map(os.path.exists), "path"]
    kwargs = {"base_path": base.path, "mode": s.mode, "sampler": s.sampler, "clip_sample": s.clip_sample,
              "resolution": s.resolution,
              "fail_after": int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)}
    with FileProgress(missing, "sample", "image"):
        if use_ray:
            if s.gpus_per_actor > 0:
                kwargs["gpu_request"] = f"sample: sample.gpus_per_actor={s.gpus_per_actor:g}"
            done = _render_with_ray(cfg, batches, kwargs)
        else:
            worker = SampleWorker(**kwargs)
            done = pd.concat([worker(batch) for batch in batches], ignore_index=True)
    done = done.dropna(subset=["render_s"])
    return dict(zip(done["id"], done["render_s"].astype(float)))


def consolidate(plan: pd.DataFrame, seconds: dict[str, float] | None = None) -> pd.DataFrame:
    """The plan's table with every image's sha256 and render seconds (as recorded, else `seconds` of those
    rendered now); appends new rows to each pool's pool.parquet (rows already recorded are kept
    as they are, so an older pool's provenance is never overwritten)."""
    have = plan["path"].map(os.path.exists)
    if not have.all():
        missing = plan.loc[~have, "path"]
        raise StageError(f"{len(missing)} synthetic images missing after sampling, e.g. {missing.iloc[0]}")
    if plan.duplicated(["lora_key", "label", "sample_key", "weight", "index"]).any():  # what resume relies on
        raise StageError("duplicate (lora_key, label, sample_key, weight, index) rows in the sampling plan")
    recorded, recorded_s, seconds = _recorded(plan), _recorded(plan, "render_s"), seconds or {}
    table = plan[TABLE_COLUMNS].reset_index(drop=True)
    table["sha256"] = [recorded.get(p) or sha256_file(p) for p in table["path"]]
    # What the pool's record says first: a lost image rendered again keeps the cost of its first rendering, so
    # the table agrees with pool.parquet.
    table["render_s"] = [recorded_s[p] if p in recorded_s else seconds.get(i, float("nan"))
                         for i, p in zip(table["id"], table["path"])]
    for folder, rows in table.groupby(table["path"].map(lambda p: str(Path(p).parent)), sort=False):
        pool = Path(folder) / POOL_FILE
        old = pd.DataFrame(columns=TABLE_COLUMNS) if parquet_problem(pool) else pd.read_parquet(pool)
        new = rows[~rows["path"].isin(old["path"])]
        if len(new):
            write_parquet(pd.concat([old, new], ignore_index=True).sort_values("index", ignore_index=True), pool)
    return table


def start_images(jobs: list[LoraJob], manifest: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (LoRA key, class it draws), its own training images of that class (id, path, sha256): where img2img
    starts from."""
    by_id = manifest.set_index("id")
    out = {}
    for job in jobs:
        own = by_id.loc[list(job.image_ids), ["path", "sha256", "label"]]
        for label in job.labels():
            out[(job.key, label)] = own[own["label"] == label][["path", "sha256"]].reset_index()
    return out


def plan_pools(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame
               ) -> tuple[BaseModel, pd.DataFrame]:
    """The base and the plan of every image the grid's trials may draw (protocol.pool_sizes per LoRA)."""
    base = generator_base(cfg, paths)
    jobs: list[LoraJob] = plan_loras(cfg, manifest, base.identity)
    loras = trained_table(jobs, paths.lora)
    by = ["fold", "label", "group"] if cfg.generator.per_group else ["fold", "label"]
    n_pool = pool_sizes(manifest, cfg).set_index(by)["n_pool"]
    sizes = {(j.key, label): int(n_pool.loc[(j.fold, label, j.group)[:len(by)]]) for j in jobs for label in j.labels()}
    return base, plan_images(cfg, base, loras, sizes, start_images(jobs, manifest), paths.synthetic)


def worker_settings(cfg: ExperimentConfig, base: BaseModel) -> tuple:
    """What a sampling actor is built with: pools that agree on it render in one actor pool."""
    s = cfg.sample
    return base.path, s.mode, s.sampler, s.clip_sample, s.resolution


def sample_pools(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame, use_ray: bool = True
                 ) -> pd.DataFrame | list[pd.DataFrame]:
    """Plan, render and record every pool that any variant of the axes draws from, one Ray Data job per kind of
    actor rather than one per variant (an actor pool's start-up is most of a small stage's time); writes each
    variant's synthetic.parquet. Returns the table (with axes, the tables in variant order)."""
    planned = []  # (variant paths, its plan)
    jobs: dict = {}  # worker settings -> (a variant config, its base, [plans])
    for variant, vpaths in each_variant(cfg, paths):
        base, plan = plan_pools(variant.cfg, vpaths, manifest)
        planned.append((vpaths, plan))
        jobs.setdefault(worker_settings(variant.cfg, base), (variant.cfg, base, []))[2].append(plan)
    seconds: dict[str, float] = {}
    for vcfg, base, plans in jobs.values():
        plan = pd.concat(plans, ignore_index=True).drop_duplicates("path", ignore_index=True)
        seconds.update(render(plan, vcfg, base, use_ray=use_ray))
    tables = []
    for (variant, _), (vpaths, plan) in zip(each_variant(cfg, paths), planned):
        rendered = int(plan["id"].isin(seconds.keys()).sum())
        where = f"{variant.label}: " if variant.point else ""
        note(f"sample: {where}{len(plan)} images planned, {len(plan) - rendered} re-used, {rendered} rendered")
        tables.append(consolidate(plan, seconds))
        write_parquet(tables[-1], vpaths.synthetic_table)
    return per_variant(cfg, tables)


def run_sample(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | list[pd.DataFrame]:
    """Sample every pool of every variant through Ray Data (sample_pools)."""
    return sample_pools(cfg, paths, load_manifest(paths))
