"""Fine-tune stage: one LoRA per (fold, class) [per group] on Stable Diffusion, kohya-style parameters.

Each LoRA is trained only on its fold's training images (protocol.plan_loras), so the synthetic images that later
augment fold f's classifier never saw fold f's held-out images (`generator.split: all` = the paper's looser
protocol). A LoRA's key is its content (ooc_ray.keys.lora_key): its training settings, the base's identity, its
prompt and the (id, sha256) of its images, so only LoRAs whose inputs changed are trained again. Files: see
ooc_ray.diffusion.lora.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig

from ooc_ray.config import ExperimentConfig, GeneratorConfig
from ooc_ray.data import load_manifest
from ooc_ray.images import load_image
from ooc_ray.diffusion.base import (BaseModel, device_and_dtype, generator_versions, load_pipeline, optimizer_step,
                                   task_threads, training_precision, training_target)
from ooc_ray.diffusion.lora import save_lora, weights_digest
from ooc_ray.diffusion.lora_files import (DIFFUSERS_FILE, KOHYA_FILE, METADATA_FILE, lora_config, lora_problem,
                                          read_metadata, te_targets, trained_table, unet_targets)
from ooc_ray.diffusion.pretrain import generator_base
from ooc_ray.errors import ModelError
from ooc_ray.gpu import require_torch_cuda
from ooc_ray.io import atomic_dir, sha256_file, write_parquet
from ooc_ray.logs import note
from ooc_ray.keys import config_slice
from ooc_ray.paths import ExperimentPaths
from ooc_ray.progress import FileProgress
from ooc_ray.protocol import LoraJob, plan_loras
from ooc_ray.raycluster import init_ray, ray_task, require_resources, wait_all, where
from ooc_ray.variants import each_variant, per_variant


ENCODE_CHUNK = 8  # images per VAE encode when caching: SD's VAE at 512 px needs ~1 GB each


def _training_pixels(paths: tuple[str, ...], resolution: int):
    """The training images as one (n, 3, res, res) tensor in [-1, 1], as the VAE reads them."""
    return torch.stack([
        torch.from_numpy(np.array(load_image(p, size=resolution))).permute(2, 0, 1) for p in paths
    ]).float() / 127.5 - 1.0


def _latent_noise(vae, n: int, resolution: int, gen):
    """Each training image's latent-sampling noise, drawn once from gen in chunks of ENCODE_CHUNK, exactly as
    the VAE's latent_dist.sample(gen) draws it: an image's latent sample is then the same every step, whether
    cached or encoded again."""
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (vae.config.latent_channels, side, side)
    return torch.cat([randn_tensor((min(ENCODE_CHUNK, n - i), *shape), generator=gen, device=vae.device,
                                   dtype=vae.dtype) for i in range(0, n, ENCODE_CHUNK)])


def _encode(vae, pixels, noise):
    """Scaled latents of `pixels`, sampled with `noise` (mean + std * noise, as latent_dist.sample does)."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return (dist.mean + dist.std * noise).float() * vae.config.scaling_factor


def _latent_source(vae, paths: tuple[str, ...], gcfg: GeneratorConfig, gen):
    """A function from a batch's image indices to their scaled latents. generator.cache_latents (kohya's
    cache_latents): every image encoded once up front, as nothing changes its pixels between steps (no pixel
    augmentation) and the VAE is frozen; else encoded again every step from pixels held in memory. Both
    sample an image's latent with the same noise, so they train the same LoRA up to float rounding
    (tests/test_finetune.py compares the loss curves)."""
    pixels = _training_pixels(paths, gcfg.resolution)
    noise = _latent_noise(vae, len(pixels), gcfg.resolution, gen)
    if not gcfg.cache_latents:
        return lambda idx: _encode(vae, pixels[idx], noise[idx])
    latents = torch.cat([_encode(vae, pixels[i : i + ENCODE_CHUNK], noise[i : i + ENCODE_CHUNK])
                         for i in range(0, len(pixels), ENCODE_CHUNK)])
    return lambda idx: latents[idx]


def _frozen_text(te, ids, gcfg: GeneratorConfig):
    """When the text encoder carries no LoRA: a function giving the prompt's embedding, computed once under
    generator.cache_latents (one prompt per LoRA) or again at every step. None when the text encoder trains."""
    if gcfg.text_encoder_lr > 0:
        return None

    def embed():
        with torch.no_grad():
            return te(ids)[0]

    if not gcfg.cache_latents:
        return embed
    cached = embed()
    return lambda: cached


class LoraTraining:
    """One LoRA in training on a shared frozen base: `train_to(e)` continues its kohya-style epochs up to epoch e
    (each of the n images `repeats` times, shuffled, batches of batch_size, the last may be short; MSE on the
    scheduler's prediction target at uniform random timesteps, in generator.mixed_precision with a GradScaler for
    fp16), `save` writes it as it stands, `close` removes its adapter. Its random generator, optimizer and scaler
    live as long as it does, so training to 2 epochs, saving, then on to 4 draws exactly what one 4-epoch run
    draws: a checkpoint at epoch e IS the LoRA of generator.epochs = e (the search's checkpoints rely on it;
    tests/test_finetune.py compares the weights). Several may train on one base, each its own named adapter."""

    def __init__(self, pipe, job: LoraJob, gcfg: GeneratorConfig):
        self.pipe, self.job, self.gcfg, self.name = pipe, job, gcfg, job.key
        self.use_te = gcfg.text_encoder_lr > 0
        self.start = time.perf_counter()
        self.optimizer = _add_adapters(pipe, self.name, gcfg, self.use_te)
        unet, tok = pipe.unet, pipe.tokenizer
        self.device = unet.device
        self.gen = torch.Generator().manual_seed(gcfg.seed)
        self.latents_of = _latent_source(pipe.vae, job.image_paths, gcfg, self.gen)
        captions = job.captions()
        distinct = sorted(set(captions))  # one prompt for a class LoRA: its ids exactly as before
        self.ids = tok(distinct, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        self.caption_of = torch.tensor([distinct.index(c) for c in captions]) if len(distinct) > 1 else None
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.weights_dtype, autocast_dtype, scaled = training_precision(gcfg.mixed_precision, self.device.type)
        self.autocast = torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        self.scaler = torch.amp.GradScaler(self.device.type) if scaled else None
        self.frozen_text = _frozen_text(pipe.text_encoder, self.ids, gcfg)
        self.step_losses: list[float] = []
        self.epoch_losses: list[float] = []

    @property
    def epochs(self) -> int:
        return len(self.epoch_losses)

    def _activate(self) -> None:
        """Make this LoRA's adapter the one that trains and runs (others on the same base sleep)."""
        self.pipe.unet.set_adapter(self.name)
        if self.use_te:
            self.pipe.text_encoder.set_adapter(self.name)
        self.pipe.unet.train()
        self.pipe.text_encoder.train(self.use_te)

    def train_to(self, epochs: int) -> None:
        if self.epochs >= epochs:
            return
        self._activate()
        try:
            with torch.enable_grad():  # whatever the caller's grad mode
                while self.epochs < epochs:
                    self._epoch()
        except FloatingPointError as exc:
            raise ModelError(f"LoRA {self.name}: {exc}") from None
        finally:
            self.pipe.unet.eval()
            self.pipe.text_encoder.eval()

    def _epoch(self) -> None:
        gcfg, n, unet, te = self.gcfg, len(self.job.image_paths), self.pipe.unet, self.pipe.text_encoder
        order = torch.arange(n).repeat(gcfg.repeats)[torch.randperm(n * gcfg.repeats, generator=self.gen)]
        losses = []
        for i in range(0, len(order), gcfg.batch_size):
            idx = order[i : i + gcfg.batch_size]
            x0 = self.latents_of(idx).to(self.device)
            noise = torch.randn(x0.shape, generator=self.gen).to(self.device)  # CPU generator: same on any device
            t = torch.randint(0, self.sched.config.num_train_timesteps, (len(idx),), generator=self.gen).to(self.device)
            noisy = self.sched.add_noise(x0, noise, t)
            target = training_target(self.sched, x0, noise, t)
            text = self.frozen_text() if self.frozen_text else None
            with self.autocast:
                text = te(self.ids)[0] if text is None else text
                text = text.expand(len(idx), -1, -1) if self.caption_of is None else text[self.caption_of[idx]]
                pred = unet(noisy.to(self.weights_dtype), t, text.to(self.weights_dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            losses.append(optimizer_step(self.optimizer, loss, "generator.unet_lr", self.scaler))
        self.step_losses += losses
        self.epoch_losses.append(sum(losses) / len(losses))

    def save(self, job: LoraJob, gcfg: GeneratorConfig, base: BaseModel, out_dir: Path) -> dict:
        """Write the LoRA as trained so far as `job` (the plan of generator `gcfg`, whose epochs are the epochs
        trained) into out_dir; returns its metadata (also out_dir/metadata.json)."""
        assert gcfg.epochs == self.epochs, (gcfg.epochs, self.epochs)
        unet, te = self.pipe.unet, self.pipe.text_encoder
        save_lora(unet, te if self.use_te else None, self.name, gcfg, base.identity, out_dir)
        meta = {
            "lora_key": job.key, "fold": job.fold, "label": job.label, "group": job.group, "prompt": job.prompt,
            "labels": job.labels(),
            "base": base.identity, "config": config_slice(gcfg, "lora"), "image_ids": list(job.image_ids),
            "image_sha256": list(job.image_sha256), "n_images": len(job.image_ids),
            "steps_per_epoch": math.ceil(len(job.image_ids) * gcfg.repeats / gcfg.batch_size),
            "loss_steps": self.step_losses, "loss_epochs": self.epoch_losses, "final_loss": self.epoch_losses[-1],
            "file": DIFFUSERS_FILE, "sha256": sha256_file(out_dir / DIFFUSERS_FILE),
            "weights_sha256": weights_digest(out_dir / DIFFUSERS_FILE),
            "kohya_file": KOHYA_FILE, "kohya_sha256": sha256_file(out_dir / KOHYA_FILE),
            "device": str(unet.device), "base_dtype": str(unet.dtype).removeprefix("torch."),
            "mixed_precision": gcfg.mixed_precision,
            "grad_scale_final": self.scaler.get_scale() if self.scaler else None,
            "cache_latents": gcfg.cache_latents, "torch_threads": torch.get_num_threads(),
            "versions": generator_versions(),
            "seconds": round(time.perf_counter() - self.start, 2), **where(),
        }
        (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        return meta

    def close(self) -> None:
        """Drop this adapter, so the next LoRA starts from the untouched base."""
        self.pipe.unet.delete_adapters(self.name)
        if self.use_te:
            self.pipe.text_encoder.delete_adapter(self.name)


def _add_adapters(pipe, name: str, gcfg: GeneratorConfig, use_te: bool):
    """A fresh LoRA adapter on the frozen base; returns the AdamW optimizer over its parameters."""
    unet, te = pipe.unet, pipe.text_encoder
    for module in (unet, te, pipe.vae):
        module.requires_grad_(False)
    # LoRA A matrices are drawn from the global RNG: seed it without disturbing the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gcfg.seed)
        unet.add_adapter(LoraConfig(**lora_config(gcfg, unet_targets(gcfg))), adapter_name=name)
        if use_te:
            te.add_adapter(LoraConfig(**lora_config(gcfg, te_targets(gcfg))), adapter_name=name)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for p in te.parameters() if p.requires_grad] if use_te else []
    for p in unet_params + te_params:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the frozen base is fp16/bf16
    groups = [{"params": unet_params, "lr": gcfg.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": gcfg.text_encoder_lr})
    return torch.optim.AdamW(groups)  # kohya's default optimizer family, constant lr


def train_lora(pipe, job: LoraJob, gcfg: GeneratorConfig, base: BaseModel, out_dir: Path) -> dict:
    """Train one LoRA on `pipe`'s frozen base, write its files into out_dir, then remove the adapter again
    (one base per process, a fresh adapter per LoRA). Returns the metadata (also out_dir/metadata.json)."""
    training = LoraTraining(pipe, job, gcfg)
    try:
        training.train_to(gcfg.epochs)
        return training.save(job, gcfg, base, out_dir)
    finally:
        training.close()  # whatever happened


_PIPES: dict = {}  # one base pipeline per process (Ray reuses worker processes between tasks)


def base_pipeline(base_path: str, gcfg: GeneratorConfig):
    device, _ = device_and_dtype()
    dtype, _, _ = training_precision(gcfg.mixed_precision, device)  # the frozen base's storage dtype
    key = (base_path, device, dtype)
    if key not in _PIPES:
        _PIPES.clear()
        _PIPES[key] = load_pipeline(base_path, device=device, dtype=dtype)
    return _PIPES[key]


def train_job(job: LoraJob, gcfg: GeneratorConfig, base: BaseModel, lora_root: Path, gpu_request: str = "") -> dict:
    """Train `job` into lora_root/<key>/ atomically (a kill leaves no half-written LoRA) unless it is already there
    whole (a task run again after its node died returns the LoRA an earlier attempt finished); returns its
    metadata. `gpu_request` names the GPUs this process was given (e.g. "finetune: generator.gpus=1"): then no
    usable CUDA device is an error."""
    folder = Path(lora_root) / job.key
    if not lora_problem(folder):
        return read_metadata(folder)
    if gpu_request:
        require_torch_cuda(gpu_request)
    with task_threads(gcfg.cpus):
        pipe = base_pipeline(base.path, gcfg)
        with atomic_dir(folder) as tmp:
            return train_lora(pipe, job, gcfg, base, tmp)


def pending_jobs(jobs: list[LoraJob], lora_root: Path) -> list[LoraJob]:
    """The jobs without a whole trained LoRA; a damaged one (file missing or changed) is named and re-made."""
    todo = []
    for job in jobs:
        problem = lora_problem(Path(lora_root) / job.key)
        if problem and read_metadata(Path(lora_root) / job.key) is not None:
            note(f"finetune: LoRA {job.key} is damaged ({problem}): training it again")
        if problem:
            todo.append(job)
    return todo


def train_all(cfg: ExperimentConfig, jobs: list[LoraJob], base: BaseModel, lora_root: Path) -> list[dict]:
    """Train `jobs` as Ray tasks of generator.cpus and generator.gpus each (so never on a head node that offers no
    CPU for work), retried elsewhere when their node dies (ray.max_retries); returns their metadata."""
    gcfg = cfg.generator
    request = {"CPU": gcfg.cpus, "GPU": gcfg.gpus}
    what = f"finetune: generator.cpus={gcfg.cpus:g}, generator.gpus={gcfg.gpus:g}"
    init_ray(cfg)
    require_resources(cfg, request, what)
    # With GPUs the worker exits after its LoRA (ray_task), so no idle process keeps a base model in GPU memory
    # while the sampling actors start (reloading SD v1.5, ~5 s, is small beside its training). On CPUs a worker
    # keeps torch imported and the base loaded for its next LoRA.
    remote = ray_task(train_job, gcfg.cpus, gcfg.gpus, cfg.ray.max_retries)
    gpu_request = f"finetune: generator.gpus={gcfg.gpus:g}" if gcfg.gpus > 0 else ""
    return wait_all(cfg, [remote.remote(job, gcfg, base, lora_root, gpu_request) for job in jobs], request, what)


def run_finetune(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | list[pd.DataFrame]:
    """Train every LoRA that any variant of the axes plans and is not trained yet (a LoRA two variants share is
    trained once), then write each variant's LoRA table; returns the table (with axes, the tables in variant
    order)."""
    manifest = load_manifest(paths)
    planned = []  # (variant config, its paths, its base, its jobs)
    for variant, vpaths in each_variant(cfg, paths):
        base = generator_base(variant.cfg, vpaths)  # built here once, before any worker reads it
        planned.append((variant.cfg, vpaths, base, plan_loras(variant.cfg, manifest, base.identity)))
    jobs = {job.key: (vcfg, base, job) for vcfg, _, base, variant_jobs in planned for job in variant_jobs}
    todo = {job.key for job in pending_jobs([job for _, _, job in jobs.values()], paths.lora)}
    if todo:
        with FileProgress([paths.lora / key for key in todo], "finetune", "LoRA"):
            for vcfg, base, group in _by_settings(jobs, todo):
                train_all(vcfg, group, base, paths.lora)
    tables = []
    for (variant, _), (_, vpaths, _, variant_jobs) in zip(each_variant(cfg, paths), planned):
        trained = sum(job.key in todo for job in variant_jobs)
        where = f"{variant.label}: " if variant.point else ""
        note(f"finetune: {where}{len(variant_jobs)} LoRAs planned, {len(variant_jobs) - trained} re-used, "
             f"{trained} trained")
        tables.append(trained_table(variant_jobs, paths.lora))
        write_parquet(tables[-1], vpaths.lora_table)
    return per_variant(cfg, tables)


def _by_settings(jobs: dict, todo: set) -> list[tuple]:
    """The pending jobs as (a variant config, its base, the jobs) per distinct generator settings and base."""
    groups: dict = {}
    for key in sorted(todo):
        vcfg, base, job = jobs[key]
        groups.setdefault((vcfg.generator, base), (vcfg, base, []))[2].append(job)
    return list(groups.values())
