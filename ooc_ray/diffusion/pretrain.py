"""Domain pretraining of a Stable Diffusion base on unlabeled images, and the base every later stage uses.

What generator.pretrain trains (ooc_ray.pretrain is the stage that runs it):
  tiny base  its VAE from scratch (L1 + MSE reconstruction), then frozen, its latents standardised per channel;
             then its UNet from scratch on those latents with one class-agnostic caption;
  real base  its VAE kept; its UNet fine-tuned the same way (SD v1's own recipe, at generator.resolution).
The result is saved as a whole diffusers pipeline under models/pretrained/<pretrain key>/, where the key holds
the base's identity, the pretraining settings and the (id, sha256) of every image; its own identity (which enters
every LoRA and pool key) is the digest of its files, so LoRAs are never re-used on a base re-trained to other bytes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig, PretrainConfig
from ooc_ray.images import load_image
from ooc_ray.diffusion.base import TINY, BaseModel, folder_digest, optimizer_step, resolve_base, training_target
from ooc_ray.errors import MissingInputError
from ooc_ray.io import read_parquet
from ooc_ray.paths import ExperimentPaths

StepCallback = Optional[Callable[[int, float], None]]  # (steps done, that step's loss)

METADATA_FILE = "ooc_ray_pretrain.json"
VAE_KL_WEIGHT = 1e-6  # SD's VAE: KL 1e-6 beside its reconstruction losses; enough to keep latents bounded
# Initial log-variance of the VAE posterior: -6 (std 0.05) instead of ~0 (std 1), so sampled latents carry the
# image from the first step; with std 1 the random VAE spent its first ~100 of 150 steps shrinking it (measured).
VAE_LOGVAR_INIT = -6.0
ENCODE_BATCH = 32


def pixels_of(image_paths, resolution: int):
    """Images as a float tensor in [-1, 1], N x 3 x resolution x resolution (the VAE's input range)."""
    arrays = [np.asarray(load_image(p, size=resolution)) for p in image_paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pretrain_key(cfg: ExperimentConfig, base_id: str, images: pd.DataFrame) -> str:
    """The pretraining settings, the resolution it trains at, the base it starts from and its images' content."""
    return keys.digest("pretrain", keys.config_slice(cfg.generator.pretrain, "base"), cfg.generator.resolution,
                       base_id, keys.table_digest(images, keys.IMAGE_COLUMNS))


def source_key(cfg: ExperimentConfig) -> str:
    """Which unlabeled images generator.pretrain names: its source, and for "demo" how they are drawn. Rows of
    pretrain_images.parquet carry it, so each source (an axis may vary it) keeps its own list."""
    pcfg, demo = cfg.generator.pretrain, cfg.data.demo
    drawn = [pcfg.demo_images, pcfg.demo_seed, demo.size, demo.groups] if pcfg.source == "demo" else []
    return keys.digest("pretrain-source", str(Path(pcfg.source).expanduser()) if pcfg.source != "demo" else "demo",
                       *drawn, length=16)


def pretrain_images_of(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """The images `ooc-ray pretrain` last listed for cfg's generator.pretrain source (id, path, sha256); an error
    naming what to run where it has not listed them (another source, another draw of the demo's, or a table
    from before sources were told apart)."""
    table = read_parquet(paths.pretrain_images, "ooc-ray pretrain")
    if "source_key" not in table.columns:
        raise MissingInputError(f"{paths.pretrain_images} was written before each source kept its own list: run "
                                "`ooc-ray pretrain` once (it re-uses the pretrained base)")
    mine = table[table["source_key"] == source_key(cfg)]
    if mine.empty:
        raise MissingInputError(f"{paths.pretrain_images} lists no images of generator.pretrain.source "
                                f"{cfg.generator.pretrain.source!r} as configured (another source or draw); run "
                                "`ooc-ray pretrain` first")
    return mine.drop(columns="source_key").reset_index(drop=True)


def pretrained_dir(paths: ExperimentPaths, key: str) -> Path:
    return paths.models / "pretrained" / key


def generator_base(cfg: ExperimentConfig, paths: ExperimentPaths) -> BaseModel:
    """The base LoRAs train on and pools sample from: generator.base itself, or its domain-pretrained version
    when generator.pretrain.source is set (then `ooc-ray pretrain` must have run for the current images)."""
    base = resolve_base(cfg.generator.base, paths.models)
    if not cfg.generator.pretrain.source:
        return base
    images = pretrain_images_of(cfg, paths)
    folder = pretrained_dir(paths, pretrain_key(cfg, base.identity, images))
    if not (folder / METADATA_FILE).is_file():
        raise MissingInputError(f"pretrained base {folder} missing (generator.pretrain settings or images "
                                "changed); run `ooc-ray pretrain` first")
    return BaseModel(str(folder), f"pretrained-{folder_digest(folder, paths.models)}")


# ---------------------------------------------------------------------------------------------- training


def _batches(n: int, batch_size: int, steps: int, gen):

    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def train_vae(vae, pixels, pcfg: PretrainConfig, gen, on_step: StepCallback = None) -> list[float]:
    """Train a VAE from its random init on `pixels`; returns the loss per step (each also to `on_step`)."""
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = VAE_LOGVAR_INIT
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=pcfg.vae_lr)
    losses = []
    for idx in _batches(len(pixels), pcfg.batch_size, pcfg.vae_steps, gen):
        x = pixels[idx].to(vae.device)
        posterior = vae.encode(x).latent_dist
        # Drawn on the CPU generator: the same draws on any device.
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(vae.device)
        recon = vae.decode(z).sample
        # L1 keeps edges sharper than MSE alone (SD's VAE adds a perceptual and a GAN loss we cannot run offline).
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + VAE_KL_WEIGHT * posterior.kl().mean()
        losses.append(optimizer_step(optimizer, loss, "generator.pretrain.vae_lr"))
        if on_step:
            on_step(len(losses), losses[-1])
    vae.requires_grad_(False).eval()
    return losses


def standardise_latents(vae, pixels) -> None:
    """Fold each latent channel's mean and std over `pixels` into quant_conv / post_quant_conv, so the UNet sees
    zero-mean unit-variance latents (SD does this with one scalar, scaling_factor 0.18215; per channel is exact
    in the same two 1x1 convolutions). Decoding is unchanged; scaling_factor becomes 1."""
    c = vae.config.latent_channels
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + ENCODE_BATCH].to(vae.device)).latent_dist.mode()
                             for i in range(0, len(pixels), ENCODE_BATCH)])
        mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3)).clamp_min(1e-6)
        qc, pq = vae.quant_conv, vae.post_quant_conv
        qc.weight[:c] /= std[:, None, None, None]
        qc.bias[:c] = (qc.bias[:c] - mean) / std
        qc.bias[c:] -= 2 * std.log()  # log-variance of the scaled posterior
        pq.bias += pq.weight[:, :, 0, 0] @ mean
        pq.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


def encode_latents(vae, pixels):
    """Posterior means of the images and of their mirror images (microscopy has no left and right), scaled."""
    both = torch.cat([pixels, pixels.flip(3)])
    with torch.no_grad():
        latents = torch.cat([vae.encode(both[i:i + ENCODE_BATCH].to(vae.device)).latent_dist.mode()
                             for i in range(0, len(both), ENCODE_BATCH)])
    return latents * vae.config.scaling_factor


def train_unet(pipe, latents, pcfg: PretrainConfig, gen, on_step: StepCallback = None) -> list[float]:
    """Training of pipe.unet, on its scheduler's prediction target, on `latents` with the caption (or, at
    caption_dropout, the empty caption); text encoder and VAE frozen. Returns the loss per step (each also to
    `on_step`)."""
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ids = tok([pcfg.caption, ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        caption, empty = te(ids.to(te.device))[0].float()
    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=pcfg.unet_lr)
    losses = []
    for idx in _batches(len(latents), pcfg.batch_size, pcfg.unet_steps, gen):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen).to(x0.device)
        dropped = (torch.rand(len(idx), generator=gen) < pcfg.caption_dropout).to(x0.device)
        text = torch.where(dropped[:, None, None], empty, caption)
        pred = unet(sched.add_noise(x0, noise, t), t, text).sample
        target = training_target(sched, x0, noise, t)
        losses.append(optimizer_step(optimizer, F.mse_loss(pred, target), "generator.pretrain.unet_lr"))
        if on_step:
            on_step(len(losses), losses[-1])
    unet.requires_grad_(False).eval()
    return losses


def trains_vae(cfg: ExperimentConfig) -> bool:
    """Whether pretraining trains the VAE too: only the tiny base's, which starts untrained."""
    return cfg.generator.base == TINY


def pretrain_steps(cfg: ExperimentConfig) -> int:
    """Optimizer steps of one pretraining: the VAE's (tiny base only), then the UNet's."""
    pcfg = cfg.generator.pretrain
    return (pcfg.vae_steps if trains_vae(cfg) else 0) + pcfg.unet_steps


def pretrain(pipe, image_paths, cfg: ExperimentConfig, on_step: StepCallback = None) -> dict:
    """Train `pipe` in place on the images (VAE too when the base is the tiny one); returns its measurements.
    `on_step(steps done of pretrain_steps, loss)` after every step."""
    pcfg = cfg.generator.pretrain
    vae_steps = pcfg.vae_steps if trains_vae(cfg) else 0
    unet_step = (lambda done, loss: on_step(vae_steps + done, loss)) if on_step else None
    gen = torch.Generator().manual_seed(pcfg.seed)
    start = time.perf_counter()
    pixels = pixels_of(image_paths, cfg.generator.resolution)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    out: dict = {"n_images": len(pixels), "vae_loss_steps": [], "vae_recon_mse": None}
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(pcfg.seed)
        if trains_vae(cfg):
            out["vae_loss_steps"] = train_vae(pipe.vae, pixels, pcfg, gen, on_step)
            standardise_latents(pipe.vae, pixels)
        out["vae_seconds"] = round(time.perf_counter() - start, 1)
        latents = encode_latents(pipe.vae, pixels)
        out["unet_loss_steps"] = train_unet(pipe, latents, pcfg, gen, unet_step)
    with torch.no_grad():
        head = pixels[:ENCODE_BATCH].to(pipe.vae.device)
        recon = pipe.vae.decode(latents[:len(head)] / pipe.vae.config.scaling_factor).sample
        out["vae_recon_mse"] = round(((recon - head) ** 2).mean().item(), 5)  # in [-1, 1] units
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def save_pretrained(pipe, meta: dict, folder: Path) -> None:
    """Write the pipeline and its metadata so that the same training gives the same bytes: the folder's digest
    is the identity in every LoRA and pool key (and pool seeds derive from LoRA keys), so anything that differs
    between two identical runs would give them different synthetic images. diffusers writes the folder it
    loaded from as `_name_or_path` into each config.json (measured: two runs in two results folders differed
    only there and in the timings), so that entry is dropped, and timings are not written here."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for config_file in [Path(folder) / "model_index.json", *Path(folder).glob("*/config.json")]:
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    timing_free = {k: v for k, v in meta.items() if not k.endswith("seconds")}
    (Path(folder) / METADATA_FILE).write_text(json.dumps(timing_free, indent=1))
