"""LoRA files, without torch: their names, which modules carry a LoRA, and reading a trained LoRA's metadata
(the finetune stage writes them with ooc_ray.diffusion.lora; the sample stage, the search and the report read).

Per LoRA, in lora/<lora key>/ (written atomically):
  pytorch_lora_weights.safetensors  diffusers/peft format: pipe.load_lora_weights(dir)
  kohya_lora.safetensors            kohya/A1111 format (lora_unet_*/lora_te_* + .alpha), also loadable by diffusers
  metadata.json                     config slice, image ids, loss per step/epoch, file sha256, tensor digest
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ooc_ray.config import GeneratorConfig
from ooc_ray.errors import DataError, MissingInputError
from ooc_ray.io import sha256_file

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya_lora.safetensors"
METADATA_FILE = "metadata.json"
# generator.unet_modules -> the UNet module names (suffixes, as peft matches them) that carry the LoRA.
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_TRANSFORMER = _ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_MODULES = {"attention": _ATTENTION, "transformer": _TRANSFORMER,
                "transformer+conv": _TRANSFORMER + ["conv1", "conv2"]}
_TE_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_MODULES = {"attention": _TE_ATTENTION, "attention+mlp": _TE_ATTENTION + ["fc1", "fc2"]}


def unet_targets(gcfg: GeneratorConfig) -> list[str]:
    return UNET_MODULES[gcfg.unet_modules]


def te_targets(gcfg: GeneratorConfig) -> list[str]:
    return TEXT_ENCODER_MODULES[gcfg.text_encoder_modules]


def lora_config(gcfg: GeneratorConfig, targets: list[str]) -> dict:
    # Stored in the diffusers file too: without it a loader assumes alpha = rank, which is wrong when
    # generator.alpha != generator.rank (kohya's default alpha is 1, peft's is r).
    return {"r": gcfg.rank, "lora_alpha": gcfg.alpha, "target_modules": targets, "init_lora_weights": "gaussian"}


def canonical_te_key(key: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files everywhere else (A1111, ComfyUI,
    # diffusers on transformers 4) name CLIP modules text_model.encoder.layers.N..., and diffusers on
    # transformers 5 still maps that name onto the flattened model, so write the portable one.
    return key if key.startswith("text_model.") else f"text_model.{key}"


def read_metadata(lora_dir: Path) -> dict | None:
    """The metadata of a trained LoRA folder, or None when there is none (or it does not parse)."""
    try:
        return json.loads((Path(lora_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def lora_problem(lora_dir: Path) -> str:
    """'' when lora_dir holds a whole trained LoRA (metadata + both files, bytes as recorded), else what is wrong."""
    meta = read_metadata(lora_dir)
    if meta is None:
        return "not trained (no readable metadata.json)"
    for name, recorded in ((meta["file"], meta["sha256"]), (meta["kohya_file"], meta["kohya_sha256"])):
        weights = Path(lora_dir) / name
        if not weights.is_file():
            return f"file missing: {weights}"
        if sha256_file(weights) != recorded:
            return f"file changed since training: {weights} (sha256 differs from metadata.json)"
    return ""


TABLE_COLUMNS = ["lora_key", "fold", "label", "group", "prompt", "dir", "file", "sha256", "weights_sha256",
                 "kohya_file", "kohya_sha256", "n_images", "final_loss", "versions"]


def trained_table(jobs, lora_root: Path) -> pd.DataFrame:
    """One row per planned LoRA (protocol.LoraJob), from the metadata of trained ones. Raises, naming the
    folder, when one is not trained or its files are not the ones trained: sampling hours later on a cluster
    must not meet a deleted or swapped LoRA."""
    rows = []
    for job in jobs:
        folder = Path(lora_root) / job.key
        problem = lora_problem(folder)
        if problem.startswith("not trained"):
            raise MissingInputError(f"LoRA {job.key} not trained ({folder}): run finetune first")
        if problem:
            raise DataError(f"LoRA {problem}; re-run finetune (it trains a damaged LoRA again)")
        meta = read_metadata(folder)
        rows.append({**{c: meta.get(c) for c in TABLE_COLUMNS}, "dir": str(folder)})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
