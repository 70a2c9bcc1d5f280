"""Sample stage: synthetic image pools from the LoRAs, rendered by Ray actors that each hold one loaded pipeline
(ooc_ray.sampler).

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
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import load_manifest
from ooc_ray.diffusion.base import BaseModel
from ooc_ray.diffusion.lora_files import trained_table
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import StageError
from ooc_ray.io import image_problem, parquet_problem, sha256_file, write_parquet
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.progress import FileProgress
from ooc_ray.protocol import LoraJob, label_name, plan_loras, pool_sizes, weight_name
from ooc_ray.sampler import (FAIL_AFTER_ENV, RENDERED_COLUMNS, SampleWorker, logged_renders, release_actors,
                             render_logs, render_with_ray)
from ooc_ray.variants import each_variant, per_variant

POOL_FILE = "pool.parquet"
TABLE_COLUMNS = [
    "id", "path", "sha256", "label", "group", "fold", "lora_key", "lora_sha256", "weight", "index", "prompt",
    "negative_prompt", "seed", "sampler", "clip_sample", "steps", "cfg", "strength", "mode", "init_image_id",
    "base_model", "width", "height", "sample_key", "render_s", "node_id", "node_host", "versions",
]
SYNTHETIC_COLUMNS = TABLE_COLUMNS + ["sample_settings"]  # synthetic.parquet: the pools' rows, the settings they hold
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
    stem = f"{lora.lora_key}-{label_name(label)}" if whole else lora.lora_key  # ids, folders and seeds per class
    rows = []
    for weight in s.weights:
        folder = root / lora.lora_key / f"s{pkey}" / f"w{weight_name(weight)}"
        folder = folder / label_name(label) if whole else folder
        for i in range(n):
            start = init.iloc[i % len(init)] if img2img else None  # this LoRA's own training images, in id order
            rows.append({
                "id": f"{stem}-s{pkey}-w{weight_name(weight)}-{i:05d}", "path": str(folder / f"{i:05d}.png"),
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


def _recorded(plan: pd.DataFrame, column: str = "sha256") -> dict:
    """path -> `column` from the pool.parquet files of the plan's folders (images finished in earlier runs); pools
    written before a column existed give none."""
    out: dict = {}
    for folder in {Path(p).parent for p in plan["path"]}:
        pool = folder / POOL_FILE
        if not parquet_problem(pool) and column in pq.read_schema(pool).names:
            done = pd.read_parquet(pool, columns=["path", column])
            # By file name within the pool's folder: a results folder moved or copied (its rows name the old
            # place) keeps its records, where absolute paths lost every one (and appended the pool again).
            out.update((str(folder / Path(p).name), value) for p, value in zip(done["path"], done[column]))
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


def render(plan: pd.DataFrame, cfg: ExperimentConfig, base: BaseModel, use_ray: bool = True) -> pd.DataFrame:
    """Render the plan's missing (or damaged) images; returns (id, render_s, node_id, node_host) of each one
    written now.

    use_ray=False runs the same worker in this process (the search, the benchmark's baseline, quick tests)."""
    s = cfg.sample
    _drop_damaged(plan)
    batches = pending_batches(plan, s.batch_size)
    if not batches:
        return pd.DataFrame(columns=RENDERED_COLUMNS)
    missing = plan.loc[~plan["path"].map(os.path.exists), "path"]
    settings = {"base_path": base.path, "mode": s.mode, "sampler": s.sampler, "clip_sample": s.clip_sample,
                "resolution": s.resolution, "fail_after": int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)}
    with FileProgress(missing, "sample", "image"):
        if use_ray:
            return render_with_ray(cfg, batches, settings)
        worker = SampleWorker(**settings)
        return pd.concat([worker(batch) for batch in batches], ignore_index=True)


def consolidate(plan: pd.DataFrame, rendered: pd.DataFrame | None = None) -> pd.DataFrame:
    """The plan's table with every image's sha256, render seconds, node and libraries (as recorded in its
    pool.parquet, else from `rendered`, the images written now, else from the render logs of workers lost or
    crashed mid-batch); appends new rows to each pool's pool.parquet (rows already recorded are kept as they are,
    so an older pool's provenance is never overwritten) and removes the logs it has recorded."""
    have = plan["path"].map(os.path.exists)
    if not have.all():
        missing = plan.loc[~have, "path"]
        raise StageError(f"{len(missing)} synthetic images missing after sampling, e.g. {missing.iloc[0]}")
    if plan.duplicated(["lora_key", "label", "sample_key", "weight", "index"]).any():  # what resume relies on
        raise StageError("duplicate (lora_key, label, sample_key, weight, index) rows in the sampling plan")
    folders = {Path(p).parent for p in plan["path"]}
    # This run's reports first, then the render logs (images an actor wrote before it was lost, or before a crash).
    now = pd.concat([frame for frame in (rendered, logged_renders(folders)) if frame is not None and len(frame)]
                    or [pd.DataFrame(columns=RENDERED_COLUMNS)], ignore_index=True)
    now = now.drop_duplicates("id", keep="first").set_index("id")
    table = plan[TABLE_COLUMNS].reset_index(drop=True)
    recorded = _recorded(plan)
    table["sha256"] = [recorded.get(p) or sha256_file(p) for p in table["path"]]
    # An image its pool recorded, lost and rendered again, must come back as the same bytes: trial keys and the
    # feature cache name it by the recorded sha256. Another device, thread count or library renders otherwise.
    again = [p for i, p in zip(table["id"], table["path"]) if p in recorded and i in now.index]
    changed = [p for p in again if sha256_file(p) != recorded[p]]
    if changed:
        raise StageError(f"{len(changed)} image(s) rendered again came out other than their {POOL_FILE} records, e.g. "
                         f"{changed[0]}: sampling here does not reproduce the pool (another device, thread count or "
                         f"library version); delete {Path(changed[0]).parent} to sample that pool whole here")
    # What the pool's record says first: a lost image rendered again keeps the cost (and node) of its first
    # rendering, so the table agrees with pool.parquet. Pools from before a column existed give NaN or "".
    for column, missing_value in (("render_s", float("nan")), ("node_id", ""), ("node_host", ""),
                                  ("versions", "")):
        before = _recorded(plan, column)
        fresh = now[column].to_dict() if column in now.columns else {}
        table[column] = [before[p] if p in before else fresh.get(i, missing_value)
                         for i, p in zip(table["id"], table["path"])]
    for folder, rows in table.groupby(table["path"].map(lambda p: str(Path(p).parent)), sort=False):
        pool = Path(folder) / POOL_FILE
        old = pd.DataFrame(columns=TABLE_COLUMNS) if parquet_problem(pool) else pd.read_parquet(pool)
        new = rows[~rows["path"].isin(recorded)]  # recorded: this plan's paths that pool.parquet already holds
        if len(new):
            write_parquet(pd.concat([old, new], ignore_index=True).sort_values("index", ignore_index=True), pool)
    for log in render_logs(folders):  # recorded in pool.parquet now
        log.unlink(missing_ok=True)
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
    """Plan, render and record every pool that any variant of the axes draws from, every kind of worker once (an
    actor's start-up is most of a small stage's time); writes each variant's synthetic.parquet. Returns the
    table (with axes, the tables in variant order)."""
    planned = []  # (variant paths, its plan)
    jobs: dict = {}  # worker settings -> (a variant config, its base, [plans])
    for variant, vpaths in each_variant(cfg, paths):
        base, plan = plan_pools(variant.cfg, vpaths, manifest)
        planned.append((vpaths, plan))
        jobs.setdefault(worker_settings(variant.cfg, base), (variant.cfg, base, []))[2].append(plan)
    try:
        rendered = pd.concat([render(pd.concat(plans, ignore_index=True).drop_duplicates("path", ignore_index=True),
                                     vcfg, base, use_ray=use_ray) for vcfg, base, plans in jobs.values()],
                             ignore_index=True)
    finally:
        if use_ray:
            release_actors()
    tables = []
    for (variant, _), (vpaths, plan) in zip(each_variant(cfg, paths), planned):
        made = int(plan["id"].isin(rendered["id"]).sum())
        where = f"{variant.label}: " if variant.point else ""
        note(f"sample: {where}{len(plan)} images planned, {len(plan) - made} re-used, {made} rendered")
        tables.append(consolidate(plan, rendered).assign(sample_settings=keys.sample_settings(variant.cfg)))
        write_parquet(tables[-1], vpaths.synthetic_table)
    return per_variant(cfg, tables)


def run_sample(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | list[pd.DataFrame]:
    """Sample every pool of every variant on Ray actors (sample_pools)."""
    return sample_pools(cfg, paths, load_manifest(paths))
