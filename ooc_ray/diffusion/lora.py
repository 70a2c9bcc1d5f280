"""Writing a trained LoRA in both formats, and the digest of its tensors (torch, peft and diffusers).

Per LoRA, in lora/<lora key>/ (ooc_ray.diffusion.lora_files names them):
  pytorch_lora_weights.safetensors  diffusers/peft format: pipe.load_lora_weights(dir)
  kohya_lora.safetensors            kohya/A1111 format (lora_unet_*/lora_te_* + .alpha), also loadable by diffusers
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ooc_ray.config import GeneratorConfig
from ooc_ray.diffusion.lora_files import DIFFUSERS_FILE, KOHYA_FILE, canonical_te_key, lora_config, te_targets, unet_targets


def kohya_state_dict(unet_sd: dict, te_sd: dict | None, alpha: float) -> dict:
    """peft state dicts (module.lora_A/B.weight) -> kohya/A1111 keys.

    kohya names a module by its diffusers path with dots -> underscores, prefixed lora_unet_/lora_te_, stores
    lora_down (=A), lora_up (=B) and a scalar .alpha; scale = alpha / rank as in peft, so outputs match."""

    out = {}
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_", te_sd or {})):
        for name, tensor in sd.items():
            module, kind = re.match(r"(.+)\.lora_([AB])\.weight$", name).groups()
            stem = prefix + module.replace(".", "_")
            out[f"{stem}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor.detach().cpu().contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(unet, te, name: str, gcfg: GeneratorConfig, base_id: str, out_dir: Path) -> None:
    """Write adapter `name` of unet (and te, or None) in both formats into out_dir."""
    unet_sd = {k: v.detach().cpu().float().contiguous()
               for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
    te_sd = ({canonical_te_key(k): v.detach().cpu().float().contiguous()
              for k, v in get_peft_model_state_dict(te, adapter_name=name).items()} if te is not None else None)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        # peft's own key names (lora_A/lora_B), not diffusers' older lora.down/lora.up: that converter renames
        # attention projections only, and a file mixing both namings loads without its attention LoRA (measured
        # with generator.unet_modules: transformer+conv; diffusers reads the file as peft format).
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd or None,
        weight_name=DIFFUSERS_FILE,
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_config(gcfg, unet_targets(gcfg)),
        text_encoder_lora_adapter_metadata=lora_config(gcfg, te_targets(gcfg)) if te_sd else None,
    )
    save_file(kohya_state_dict(unet_sd, te_sd, gcfg.alpha), str(out_dir / KOHYA_FILE), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(gcfg.rank),
        "ss_network_alpha": str(gcfg.alpha), "ss_base_model": base_id,
    })


def weights_digest(path: Path) -> str:
    """sha256 of a .safetensors file's tensors (names, dtypes, shapes, bytes), not of the file.

    The file's own hash is not reproducible: safetensors writes its metadata map in random order (two
    identical trainings gave different file sha256 and bit-identical tensors, measured). Keys built from this
    digest are the same on every run and machine, so sampled pools land in the same folders."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


