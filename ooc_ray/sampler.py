"""The sampling workers: a SampleWorker holds one loaded pipeline and renders planned batches into PNGs; Ray actors
run them, kept for the whole sample stage, so that every variant and kind of worker after the first starts at once.

An actor is a process with torch and diffusers imported (a tiny one took ~5 s to start, most of a small stage);
it builds a SampleWorker for the settings a batch names (base, mode, sampler) and keeps it while the next
batches name the same. Each actor reserves one CPU (and sample.gpus_per_actor), so none runs on a head node that
offers no CPU for work. A node lost mid-batch costs only that batch: the driver starts a new actor where the
request fits and gives the batch to the next free actor (ray.max_retries times at most); a batch writes only its
missing PNGs, so nothing finished is redone.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import diffusers
import numpy as np
import pandas as pd
import ray
import torch
from transformers.utils import logging as hf_logging

from ooc_ray.config import ExperimentConfig
from ooc_ray.images import load_image
from ooc_ray.diffusion.base import device_and_dtype, generator_versions, load_pipeline
from ooc_ray.errors import StageError
from ooc_ray.gpu import require_torch_cuda
from ooc_ray.io import atomic_path
from ooc_ray.raycluster import await_all, init_ray, require_resources, where

SAMPLERS = {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler"}
FAIL_AFTER_ENV = "OOC_RAY_SAMPLE_FAIL_AFTER"  # test hook: a worker raises after writing this many images
MAX_ADAPTERS = 16  # LoRAs kept loaded per actor (~3 MB each at rank 8 on SD v1.5); least recently used go
# Each worker process appends a line per image it writes (id, render_s, node) to a log of its own in the image's
# folder, before the image is renamed into place: an actor killed mid-batch never returns its batch's rows, and the
# batch re-queued skips the PNGs it left, so without the log those images would have no node and no cost.
RENDER_LOG = ".rendered-{host}-{pid}.jsonl"
# What a worker reports (and logs) of each image it writes: its cost, node and libraries (diffusers' schedulers
# have changed between versions: a pool resumed after an upgrade holds two generators' images).
RENDERED_COLUMNS = ["id", "render_s", "node_id", "node_host", "versions"]


def log_rendered(folder: Path, record: dict) -> None:
    """Append one written image's record to this process's render log in `folder`."""
    with open(folder / RENDER_LOG.format(host=socket.gethostname(), pid=os.getpid()), "a") as log:
        log.write(json.dumps(record) + "\n")


def render_logs(folders) -> list[Path]:
    """Every worker's render log in `folders`."""
    return [log for folder in folders for log in Path(folder).glob(RENDER_LOG.format(host="*", pid="*"))]


def logged_renders(folders) -> pd.DataFrame:
    """Every record of the render logs in `folders` (RENDERED_COLUMNS; logs from before `versions` was recorded
    give None there); a line cut short by a kill is not a record."""
    rows = [json.loads(line) for log in render_logs(folders) for line in log.read_text().splitlines()
            if line.endswith("}")]
    return pd.DataFrame(rows, columns=RENDERED_COLUMNS).drop_duplicates("id", keep="last")


class SampleWorker:
    """Loads the pipeline once (in __init__), then renders batches of plan rows, in this process or in a Ray actor.

    Adapters are loaded once per worker and switched with set_adapters (never fused: fuse/unfuse does not
    restore the base exactly, and weight 0.0 must reproduce the base image bit for bit)."""

    def __init__(self, base_path: str, mode: str, sampler: str, resolution: int, fail_after: int = 0,
                 gpu_request: str = "", clip_sample: float = 0.0, cpu_threads: int = 0):
        if cpu_threads:  # a CPU-only Ray actor: Ray left it one thread (cpus_per_cpu_actor)
            torch.set_num_threads(cpu_threads)
        hf_logging.set_verbosity_error()  # a second adapter in the text encoder prints a MISSING-keys report
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # many adapters are intended
        if gpu_request:  # this worker was given GPUs: sampling SD on its CPU instead would take days
            require_torch_cuda(gpu_request)
        device, dtype = device_and_dtype()
        self.pipe = load_pipeline(base_path, img2img=mode == "img2img", device=device, dtype=dtype)
        clip = {"clip_sample": True, "clip_sample_range": clip_sample} if clip_sample else {}
        self.pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(self.pipe.scheduler.config, **clip)
        self.mode, self.resolution = mode, resolution
        self.adapters: OrderedDict[str, None] = OrderedDict()
        self.fail_after, self.written = fail_after, 0
        self.versions = generator_versions()

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
        # As floats first: a NaN pixel would otherwise be cast to a black PNG without a word (the classic failure
        # of an fp16 VAE; also an overflowing LoRA weight), and the classifier would train on it. (Infinities do
        # not get here: diffusers' postprocessing clamps them to 0 and 1.)
        arrays = self.pipe(**kwargs, output_type="np").images
        broken = [row for row, array in zip(rows.itertuples(index=False), arrays) if np.isnan(array).any()]
        if broken:
            raise StageError(
                f"sample: {len(broken)} of {len(rows)} images of LoRA {first.lora_key} at weight {first.weight:g} "
                f"came out NaN on {self.pipe.device} {str(self.pipe.dtype).removeprefix('torch.')} (e.g. "
                f"{broken[0].id}, seed {broken[0].seed}); nothing written for them: a LoRA weight or LoRA too "
                "large, or an fp16 overflow")
        return self.pipe.numpy_to_pil(arrays)  # what output_type="pil" returns, to the bit

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Render the planned batch and write its missing PNGs; RENDERED_COLUMNS of each written."""
        node = where()
        written = []
        for _, rows in batch.groupby("batch", sort=False):
            start = time.perf_counter()
            images = self.render(rows)
            each = (time.perf_counter() - start) / len(rows)  # the report's cost per arm (sampling seconds)
            for row, image in zip(rows.itertuples(index=False), images):
                if os.path.exists(row.path):  # rendered only to keep its batch whole: never rewritten
                    continue
                if image.size != (row.width, row.height):
                    image = image.resize((row.width, row.height), resample=3)  # 3 = bicubic
                record = {"id": row.id, "render_s": each, **node, "versions": self.versions}
                with atomic_path(row.path) as tmp:
                    image.save(tmp, format="PNG")
                    log_rendered(Path(row.path).parent, record)  # before the rename: a PNG in place has its line
                written.append(record)
                self.written += 1
                if self.fail_after and self.written >= self.fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_ENV}: simulated crash after {self.written} images")
        return pd.DataFrame(written, columns=RENDERED_COLUMNS)


class SamplingActor:
    """A Ray actor's body: builds a SampleWorker for the settings a batch names, keeps it for the next batch."""

    def __init__(self):
        self.settings: dict | None = None
        self.worker: SampleWorker | None = None

    def run(self, settings: dict, batch: pd.DataFrame) -> pd.DataFrame:
        if settings != self.settings:
            self.worker, self.settings = None, None  # a failed build leaves no half-configured worker behind
            self.worker, self.settings = SampleWorker(**settings), settings
        return self.worker(batch)


def actor_pool_size(cfg: ExperimentConfig, n_batches: int, ray_module=None) -> tuple[int, int]:
    """(min, max) sampling actors. sample.actors fixes both. With GPUs the pool may grow to one actor per batch:
    actors are started for every batch and take work as they come up (an autoscaling cluster may start with no
    GPU node). On CPUs one actor by default: each actor holds its own copy of the pipeline (SD v1.5 in fp32:
    ~4 GB). For a small base, set sample.actors to the cores: the demo's 208 images took 53 s with 2 one-thread
    actors vs 85 s with 1 two-thread actor (the tiny UNet gains little from a second thread: 38 s vs 44 s
    in-process)."""
    s = cfg.sample
    if s.actors:
        return min(s.actors, n_batches), min(s.actors, n_batches)
    if s.gpus_per_actor > 0:
        now = int(ray_module.cluster_resources().get("GPU", 0) // s.gpus_per_actor) if ray_module is not None else 1
        return max(1, min(now, n_batches)), n_batches
    return 1, 1


def cpus_per_cpu_actor(ray_module, n_actors: int) -> int:
    """Torch threads for each CPU-only sampling actor: the largest node's CPUs shared by the actors. Ray sets an
    actor's OMP_NUM_THREADS (hence torch's threads) to the CPUs it reserves, 1 here; the demo's one actor then
    sampled on one of two cores (208 images: 74 s on 1 thread, 63 s on 2, 41 s in-process on 2). The threads are
    set in the actor, not reserved: an actor reserving every core can block a resumed run while a crashed run's
    actor still holds them (CI hung there once, while the disk was also full). The thread count can change an
    image in its last bits (1 vs 2 threads: 1 of the demo's 208 PNGs differed); every image's sha256 is recorded
    and is what later keys hold, so a pool re-sampled on other threads never passes as the old one."""
    alive = [n.get("Resources", {}).get("CPU", 1.0) for n in ray_module.nodes() if n.get("Alive")]
    return max(1, int(max(alive, default=1.0)) // max(1, n_actors))


# The stage's sampling actors, kept across its variants and kinds of worker (one start-up per stage), released
# when the stage ends: an idle actor would keep its CPU (or GPU) from the next stage's tasks.
_POOL: dict = {}


def _actor_class(cfg: ExperimentConfig):
    # One CPU each (so never on a head node that offers none for work); a lost actor is replaced by the driver,
    # which re-queues its batch (raycluster.await_all), so Ray itself restarts nothing.
    return ray.remote(SamplingActor).options(num_cpus=1, num_gpus=cfg.sample.gpus_per_actor, max_restarts=0)


def sampling_actors(cfg: ExperimentConfig, n: int) -> list:
    """`n` sampling actors with sample.gpus_per_actor each, started once per stage (release_actors ends them)."""
    context = ray.get_runtime_context()  # a node id is new in every Ray session, a job id may repeat
    shape = (context.get_node_id(), context.get_job_id(), cfg.sample.gpus_per_actor, n)
    if _POOL.get("shape") != shape:
        release_actors()
        _POOL.update(shape=shape, actors=[_actor_class(cfg).remote() for _ in range(n)])
    return _POOL["actors"]


def release_actors() -> None:
    """End the sampling actors (their processes, CPUs and GPUs)."""
    for actor in _POOL.pop("actors", []):
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone with its node or an earlier Ray session
            pass
    _POOL.clear()


def render_with_ray(cfg: ExperimentConfig, batches: list[pd.DataFrame], settings: dict) -> pd.DataFrame:
    """Render `batches` on the sampling actors, one batch per actor at a time; (id, render_s, node) of each
    image written. A batch whose actor was lost with its node goes to another actor; the stage fails, naming the
    request, when no node can run an actor for ray.node_wait_s."""
    s = cfg.sample
    init_ray(cfg)
    request = {"CPU": 1, "GPU": s.gpus_per_actor}
    what = f"sample: sample.gpus_per_actor={s.gpus_per_actor:g}"
    require_resources(cfg, request, what)
    low, high = actor_pool_size(cfg, len(batches), ray)
    n = high if cfg.ray.autoscaling or s.actors else low  # no more actors than the cluster can place now
    if s.gpus_per_actor > 0:
        settings = {**settings, "gpu_request": what}
    else:
        settings = {**settings, "cpu_threads": cpus_per_cpu_actor(ray, n)}
    actors = sampling_actors(cfg, n)

    def replace(slot: int):
        ray.kill(actors[slot])
        actors[slot] = _actor_class(cfg).remote()
        return actors[slot]

    results = await_all(cfg, request, what, actors, batches, lambda actor, batch: actor.run.remote(settings, batch),
                        replace)
    return pd.concat(results, ignore_index=True) if results else pd.DataFrame(columns=["id", "render_s"])
