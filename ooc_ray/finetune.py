"""Fine-tune stage: one LoRA per (fold, class) [per group] on Stable Diffusion, kohya-style parameters.

Each LoRA is trained only on its fold's training images (rows with fold != f), so the synthetic images that
later augment fold f's classifier never saw fold f's held-out images (`generator.split: all` = the paper's
looser protocol). Outputs, per LoRA, in lora/<lora_key>/ (written atomically, skipped when present):
  pytorch_lora_weights.safetensors  diffusers format: pipe.load_lora_weights(dir)
  kohya_lora.safetensors            kohya/A1111 format (lora_unet_*/lora_te_* + .alpha), also loadable by diffusers
  metadata.json                     config slice, image ids, loss per step/epoch, file sha256
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ooc_ray.config import ConfigError, ExperimentConfig, GeneratorConfig, slice_key, to_dict
from ooc_ray.data import DataError, class_names, load_image, load_manifest
from ooc_ray.io import atomic_dir, write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.tiny_sd import TINY, TINY_SEED, TINY_VERSION, device_and_dtype, load_pipeline, resolve_base

ALL_FOLDS = -1  # `fold` value of LoRAs trained on all images (generator.split: all); key tag "all"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya_lora.safetensors"
METADATA_FILE = "metadata.json"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as kohya's default LoRA
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TABLE_COLUMNS = ["lora_key", "fold", "label", "group", "prompt", "dir", "file", "sha256", "weights_sha256",
                 "kohya_file", "kohya_sha256", "n_images", "final_loss"]
# Fields that do not change what a LoRA learns (they choose images/prompts, which enter the key directly,
# or where it runs): left out of the key so that e.g. moving to GPUs does not retrain everything.
_KEY_EXCLUDE = {"gpus", "split", "per_group", "prompt", "group_prompt"}


@dataclass(frozen=True)
class LoraJob:
    key: str
    fold: int  # ALL_FOLDS for split "all"
    label: str
    group: str  # "" unless generator.per_group
    prompt: str
    image_ids: tuple[str, ...]
    image_paths: tuple[str, ...]


def _safe(text: str) -> str:
    # Adapter names become torch ModuleDict keys (no dots) and folder names: keep [A-Za-z0-9_-].
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def base_spec(gcfg: GeneratorConfig) -> str:
    """What identifies the base model in keys: the hub id/path, or the tiny base's build version and seed."""
    return f"tiny-v{TINY_VERSION}-seed{TINY_SEED}" if gcfg.base == TINY else gcfg.base


def train_slice(gcfg: GeneratorConfig) -> dict:
    return {k: v for k, v in to_dict(gcfg).items() if k not in _KEY_EXCLUDE}


def _prompt(gcfg: GeneratorConfig, label: str, group: str) -> str:
    field, template = ("group_prompt", gcfg.group_prompt) if gcfg.per_group else ("prompt", gcfg.prompt)
    try:
        return template.format(label=label, group=group)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"generator.{field}: {template!r} has a bad placeholder ({exc}); use {{label}}/{{group}}")


def training_folds(manifest: pd.DataFrame, gcfg: GeneratorConfig) -> list[int]:
    return [ALL_FOLDS] if gcfg.split == "all" else sorted(int(f) for f in manifest["fold"].unique())


def training_rows(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Images a LoRA of `fold` may see: all for ALL_FOLDS, else those not held out in that fold."""
    return manifest if fold == ALL_FOLDS else manifest[manifest["fold"] != fold]


def plan_loras(cfg: ExperimentConfig, manifest: pd.DataFrame) -> list[LoraJob]:
    """Every LoRA the config asks for, with its images and key; raises DataError for an empty class."""
    gcfg = cfg.generator
    if gcfg.per_group and (manifest["group"] == "").any():
        raise ConfigError("generator.per_group: the manifest has no group column (set data.group_column)")
    jobs = []
    for fold in training_folds(manifest, gcfg):
        train = training_rows(manifest, fold)
        for label in class_names(manifest):
            rows = train[train["label"] == label]
            if rows.empty:
                where = "the data set" if fold == ALL_FOLDS else f"fold {fold}'s training images"
                raise DataError(f"class {label!r} has no images in {where}: cannot train its LoRA")
            groups = sorted(rows["group"].unique()) if gcfg.per_group else [""]
            for group in groups:
                sub = (rows[rows["group"] == group] if gcfg.per_group else rows).sort_values("id")
                ids = tuple(sub["id"])
                prompt = _prompt(gcfg, label, group)
                tag = "all" if fold == ALL_FOLDS else f"fold{fold}"
                name = "_".join([tag, _safe(label)] + ([_safe(group)] if gcfg.per_group else []))
                key = f"{name}_{slice_key(train_slice(gcfg), base_spec(gcfg), prompt, list(ids))}"
                jobs.append(LoraJob(key, fold, label, group, prompt, ids, tuple(sub["path"])))
    return jobs


def weights_digest(path: Path) -> str:
    """sha256 of a .safetensors file's tensors (names, dtypes, shapes, bytes), not of the file.

    The file's own hash is not reproducible: safetensors writes its metadata map in random order (two
    identical trainings gave different file sha256 and bit-identical tensors, measured). Keys built from this
    digest are the same on every run and machine, so sampled pools land in the same folders."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- state dicts


def _canonical_te_key(key: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files everywhere else (A1111, ComfyUI,
    # diffusers on transformers 4) name CLIP modules text_model.encoder.layers.N..., and diffusers on
    # transformers 5 still maps that name onto the flattened model, so write the portable one.
    return key if key.startswith("text_model.") else f"text_model.{key}"


def kohya_state_dict(unet_sd: dict, te_sd: dict | None, alpha: float) -> dict:
    """peft state dicts (module.lora_A/B.weight) -> kohya/A1111 keys.

    kohya names a module by its diffusers path with dots -> underscores, prefixed lora_unet_/lora_te_, stores
    lora_down (=A), lora_up (=B) and a scalar .alpha; scale = alpha / rank as in peft, so outputs match."""
    import torch

    out = {}
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_", te_sd or {})):
        for name, tensor in sd.items():
            module, kind = re.match(r"(.+)\.lora_([AB])\.weight$", name).groups()
            stem = prefix + module.replace(".", "_")
            out[f"{stem}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor.detach().cpu().contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def _lora_config(gcfg: GeneratorConfig, targets: list[str]) -> dict:
    # Stored in the diffusers file too: without it a loader assumes alpha = rank, which is wrong when
    # generator.alpha != generator.rank (kohya's default alpha is 1, peft's is r).
    return {"r": gcfg.rank, "lora_alpha": gcfg.alpha, "target_modules": targets, "init_lora_weights": "gaussian"}


# ---------------------------------------------------------------------------------------------- training


def _cached_latents(vae, paths: tuple[str, ...], resolution: int, gen):
    """VAE latents of the training images, encoded once (kohya's cache_latents): the VAE is frozen and no
    augmentation is applied, so re-encoding every step would only cost time."""
    import numpy as np
    import torch

    pixels = torch.stack([
        torch.from_numpy(np.array(load_image(p, size=resolution))).permute(2, 0, 1) for p in paths
    ]).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = [vae.encode(pixels[i : i + 8].to(vae.device, vae.dtype)).latent_dist.sample(gen)
                   for i in range(0, len(pixels), 8)]  # 8 at a time: SD's VAE at 512 px needs ~1 GB each
    return torch.cat(latents).float() * vae.config.scaling_factor


def _train_loop(pipe, latents, ids, gcfg: GeneratorConfig, optimizer, use_te: bool, gen, name: str):
    """kohya-style epochs: every image `repeats` times, shuffled, batches of batch_size (last may be short);
    epsilon (or v) prediction MSE at uniform random timesteps. Returns (loss per step, mean loss per epoch)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    unet, te = pipe.unet, pipe.text_encoder
    device = unet.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    autocast = torch.autocast(device.type, dtype=unet.dtype, enabled=unet.dtype != torch.float32)
    with torch.no_grad():
        cached_text = None if use_te else te(ids)[0]
    n = len(latents)
    step_losses, epoch_losses = [], []
    for _epoch in range(gcfg.epochs):
        order = torch.arange(n).repeat(gcfg.repeats)[torch.randperm(n * gcfg.repeats, generator=gen)]
        losses = []
        for i in range(0, len(order), gcfg.batch_size):
            idx = order[i : i + gcfg.batch_size]
            x0 = latents[idx].to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)  # CPU generator: same draws on any device
            t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
            noisy = sched.add_noise(x0, noise, t)
            target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            with autocast:
                text = te(ids)[0] if use_te else cached_text
                pred = unet(noisy.to(unet.dtype), t, text.expand(len(idx), -1, -1).to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            if not torch.isfinite(loss):
                raise RuntimeError(f"LoRA {name}: loss became {loss.item()} (lower generator.unet_lr?)")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        step_losses += losses
        epoch_losses.append(sum(losses) / len(losses))
    return step_losses, epoch_losses


def _save_lora(unet, te, name: str, gcfg: GeneratorConfig, out_dir: Path, use_te: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet_sd = {k: v.detach().cpu().float().contiguous()
               for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
    te_sd = ({_canonical_te_key(k): v.detach().cpu().float().contiguous()
              for k, v in get_peft_model_state_dict(te, adapter_name=name).items()} if use_te else None)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd) if te_sd else None,
        weight_name=DIFFUSERS_FILE,
        safe_serialization=True,
        unet_lora_adapter_metadata=_lora_config(gcfg, UNET_TARGETS),
        text_encoder_lora_adapter_metadata=_lora_config(gcfg, TE_TARGETS) if te_sd else None,
    )
    save_file(kohya_state_dict(unet_sd, te_sd, gcfg.alpha), str(out_dir / KOHYA_FILE), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(gcfg.rank),
        "ss_network_alpha": str(gcfg.alpha), "ss_base_model": base_spec(gcfg),
    })


def train_lora(pipe, job: LoraJob, gcfg: GeneratorConfig, out_dir: Path) -> dict:
    """Train one LoRA on `pipe`'s frozen base, write its files into out_dir, then remove the adapter again
    (one base per process, a fresh adapter per LoRA). Returns the metadata (also out_dir/metadata.json)."""
    import torch
    from peft import LoraConfig

    start = time.perf_counter()
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    for module in (unet, te, pipe.vae):
        module.requires_grad_(False)
    use_te = gcfg.text_encoder_lr > 0
    name = job.key
    # LoRA A matrices are drawn from the global RNG: seed it without disturbing the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gcfg.seed)
        unet.add_adapter(LoraConfig(**_lora_config(gcfg, UNET_TARGETS)), adapter_name=name)
        if use_te:
            te.add_adapter(LoraConfig(**_lora_config(gcfg, TE_TARGETS)), adapter_name=name)
    try:
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        te_params = [p for p in te.parameters() if p.requires_grad] if use_te else []
        for p in unet_params + te_params:
            p.data = p.data.float()  # LoRA weights train in fp32 even when the frozen base is fp16/bf16
        groups = [{"params": unet_params, "lr": gcfg.unet_lr}]
        if te_params:
            groups.append({"params": te_params, "lr": gcfg.text_encoder_lr})
        optimizer = torch.optim.AdamW(groups)  # kohya's default optimizer family, constant lr

        gen = torch.Generator().manual_seed(gcfg.seed)
        latents = _cached_latents(pipe.vae, job.image_paths, gcfg.resolution, gen)
        ids = tok(job.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(unet.device)
        unet.train()
        te.train(use_te)
        with torch.enable_grad():  # whatever the caller's grad mode
            step_losses, epoch_losses = _train_loop(pipe, latents, ids, gcfg, optimizer, use_te, gen, name)
        _save_lora(unet, te, name, gcfg, out_dir, use_te)
    finally:
        # Drop this adapter whatever happened, so the next LoRA starts from the untouched base.
        unet.eval()
        te.eval()
        unet.delete_adapters(name)
        if use_te:
            te.delete_adapter(name)

    meta = {
        "lora_key": job.key, "fold": job.fold, "label": job.label, "group": job.group, "prompt": job.prompt,
        "base": base_spec(gcfg), "split": gcfg.split, "per_group": gcfg.per_group,
        "config": train_slice(gcfg), "image_ids": list(job.image_ids),
        "n_images": len(job.image_ids),
        "steps_per_epoch": math.ceil(len(job.image_ids) * gcfg.repeats / gcfg.batch_size),
        "loss_steps": step_losses, "loss_epochs": epoch_losses, "final_loss": epoch_losses[-1],
        "file": DIFFUSERS_FILE, "sha256": _sha256(out_dir / DIFFUSERS_FILE),
        "weights_sha256": weights_digest(out_dir / DIFFUSERS_FILE),
        "kohya_file": KOHYA_FILE, "kohya_sha256": _sha256(out_dir / KOHYA_FILE),
        "device": str(unet.device), "seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return meta


_PIPES: dict = {}  # one base pipeline per process (Ray reuses worker processes between tasks)


def _base_pipeline(base_path: str, gcfg: GeneratorConfig):
    import torch

    device, _ = device_and_dtype()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[gcfg.mixed_precision]
    dtype = dtype if device == "cuda" else torch.float32  # fp16 matmuls on CPU are slow or unsupported
    key = (base_path, device, dtype)
    if key not in _PIPES:
        _PIPES.clear()
        _PIPES[key] = load_pipeline(base_path, device=device, dtype=dtype)
    return _PIPES[key]


def train_job(job: LoraJob, gcfg: GeneratorConfig, base_path: str, lora_root: Path) -> dict:
    """Train `job` into lora_root/<key>/ atomically (a kill leaves no half-written LoRA)."""
    pipe = _base_pipeline(base_path, gcfg)
    with atomic_dir(Path(lora_root) / job.key) as tmp:
        return train_lora(pipe, job, gcfg, tmp)


def read_metadata(lora_root: Path, key: str) -> dict | None:
    path = Path(lora_root) / key / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def lora_table(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per planned LoRA, from the metadata of trained ones; raises if any is missing."""
    rows = []
    for job in plan_loras(cfg, manifest):
        meta = read_metadata(paths.lora, job.key)
        if meta is None:
            raise FileNotFoundError(f"LoRA {job.key} not trained ({paths.lora / job.key}): run finetune first")
        for name, digest in ((meta["file"], meta["sha256"]), (meta["kohya_file"], meta["kohya_sha256"])):
            # Sampling hours later on a cluster must not meet a deleted or swapped LoRA: check it here.
            weights = paths.lora / job.key / name
            if not weights.is_file():
                raise DataError(f"LoRA file missing: {weights} (metadata.json is there); delete "
                                f"{weights.parent} and re-run finetune")
            if _sha256(weights) != digest:
                raise DataError(f"LoRA file changed since training: {weights} (sha256 differs from metadata.json)")
        rows.append({**{c: meta.get(c) for c in TABLE_COLUMNS}, "dir": str(paths.lora / job.key)})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def finetune_all(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame) -> pd.DataFrame:
    """Train every missing LoRA (in-process on CPU, Ray GPU tasks when generator.gpus > 0); return the table."""
    gcfg = cfg.generator
    jobs = plan_loras(cfg, manifest)
    todo = [j for j in jobs if read_metadata(paths.lora, j.key) is None]
    if todo:
        base_path = resolve_base(gcfg.base, paths.models)  # built here once, before any worker reads it
        if gcfg.gpus > 0:
            from ooc_ray.raycluster import init_ray

            ray = init_ray(cfg)
            # max_calls=1: the worker exits after its LoRA, so no idle process keeps a base model in GPU
            # memory while the sampling actors start; reloading SD v1.5 (~5 s) is small beside its training.
            remote = ray.remote(num_gpus=gcfg.gpus, max_retries=1, max_calls=1)(train_job)
            ray.get([remote.remote(j, gcfg, base_path, paths.lora) for j in todo])
        else:
            for job in todo:
                train_job(job, gcfg, base_path, paths.lora)
    table = lora_table(cfg, paths, manifest)
    write_parquet(table, paths.lora / "loras.parquet")
    return table


def run_finetune(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    return finetune_all(cfg, paths, load_manifest(paths))
