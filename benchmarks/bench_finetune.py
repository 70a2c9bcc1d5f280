"""LoRA training: latents (and the frozen text encoder's prompt embedding) cached once vs encoded every step.

    python benchmarks/bench_finetune.py [--skip-tiny] [--skip-sd15] [--threads 2]      (~10 min on 2 CPU cores)

generator.cache_latents (kohya's cache_latents) encodes each training image with the frozen VAE once; off, the
VAE runs on every batch. Both draw an image's latent with the same noise, so the loss curves agree up to float
rounding (printed: the largest relative difference of a step's loss). Measured, each setting cached and
uncached alternately, best of --repeats (the machine may be shared):
  tiny     the demo's LoRA: the tiny base, 14 images at 32 px, repeats 6, epochs 5, batch 8 (55 steps), with
           the text-encoder LoRA (demo) and without it (then the prompt's embedding is cached too)
  sd15     SD v1.5's architecture with random weights (base.sd15_architecture) at 256 px, 4 images, batch 2,
           2 epochs (4 steps), attention LoRA, text encoder frozen
Wall time is train_lora's: image loading, encoding, steps and writing both LoRA files.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ooc_ray.load import from_dict  # noqa: E402
from ooc_ray.diffusion.base import BaseModel, ensure_tiny_sd, load_pipeline, sd15_architecture  # noqa: E402
from ooc_ray.finetune import train_lora  # noqa: E402
from ooc_ray.protocol import LoraJob  # noqa: E402

TINY = {"resolution": 32, "repeats": 6, "epochs": 5, "batch_size": 8, "unet_lr": 3e-3,
        "unet_modules": "transformer+conv"}
SD15 = {"resolution": 256, "repeats": 1, "epochs": 2, "batch_size": 2, "unet_lr": 1e-4, "text_encoder_lr": 0.0}


def images(folder: Path, n: int, size: int) -> LoraJob:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"cell{i}.png"))
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    ids = tuple(f"c{i}" for i in range(n))
    return LoraJob("bench", -1, "cell", "", "a microscopy image of good organ on chip cells", ids, tuple(paths),
                   ("0" * 64,) * n)


def compare(name: str, pipe, job: LoraJob, generator: dict, work: Path, repeats: int) -> None:
    seconds, losses = {True: [], False: []}, {}
    for r in range(repeats):
        for cache in (True, False):
            gcfg = from_dict({"name": "bench", "generator": {**generator, "cache_latents": cache}}).generator
            out = work / f"{name}-{cache}-{r}"
            out.mkdir()
            meta = train_lora(pipe, job, gcfg, BaseModel("bench", "bench"), out)
            seconds[cache].append(meta["seconds"])
            losses[cache] = np.array(meta["loss_steps"])
    cached, fresh = min(seconds[True]), min(seconds[False])
    diff = np.max(np.abs(losses[False] - losses[True]) / np.abs(losses[True]))
    print(f"{name:<26} {len(losses[True]):>5} steps  cached {cached:7.1f} s  every step {fresh:7.1f} s  "
          f"speed-up {fresh / cached:4.2f}x  max rel. loss diff {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}; best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_tiny:
            tiny = load_pipeline(str(ensure_tiny_sd(work / "models")))
            job = images(work, 14, 32)
            compare("tiny, text-encoder LoRA", tiny, job, {**TINY, "text_encoder_lr": 1e-4}, work, args.repeats)
            compare("tiny, text encoder frozen", tiny, job, {**TINY, "text_encoder_lr": 0.0}, work, args.repeats)
        if not args.skip_sd15:
            sd15 = sd15_architecture(work / "tokenizer")
            compare("SD v1.5 arch., 256 px", sd15, images(work, 4, 256), SD15, work, args.repeats)


if __name__ == "__main__":
    main()
