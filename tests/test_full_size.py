"""SD v1.5's real architecture on CPU (UNet 860M, VAE 84M, CLIP-L 123M parameters, built from its configs with
random weights: nothing downloaded): one LoRA training step at 64 px for both target presets, the kohya export
read back as the same LoRA, and LoRA weight 0.0 sampling the base exactly. The tiny base exercises the same code
in seconds; only this test meets the module names, shapes and attention heads of the checkpoint users load.
~1.5 min on 2 cores, most of it building and running the 860M-parameter UNet."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ooc_ray.load import from_dict
from ooc_ray.protocol import LoraJob

PRESETS = {
    # The paper's: attention projections of UNet and text encoder, alpha = rank.
    "attention": {"unet_modules": "attention", "text_encoder_modules": "attention", "rank": 4, "alpha": 4.0},
    # kohya's default LoRA: every linear layer of the UNet's transformer blocks and the text encoder's attention
    # and MLP, network_alpha 1.
    "kohya": {"unet_modules": "transformer", "text_encoder_modules": "attention+mlp", "rank": 4, "alpha": 1.0},
}


def unet_out(pipe, latents, text):
    import torch

    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), text).sample


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters at once are intended here
def test_sd15_architecture_trains_both_presets_round_trips_kohya_and_weight_zero_is_the_base(tmp_path):
    import torch

    from ooc_ray.diffusion.base import BaseModel, sd15_architecture
    from ooc_ray.diffusion.lora_files import DIFFUSERS_FILE, KOHYA_FILE
    from ooc_ray.finetune import train_lora

    torch.set_num_threads(2)
    pipe = sd15_architecture(tmp_path / "tokenizer")
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # SD v1.5's UNet, exactly
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"cell{i}.png"))
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    job = LoraJob("full", -1, "cell", "", "a microscopy image of a cell", ("c0", "c1"), tuple(paths), ("0" * 64,) * 2)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids = pipe.tokenizer(job.prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    base_out = unet_out(pipe, latents, text)

    for name, preset in PRESETS.items():
        gcfg = from_dict({"name": "full", "generator": {
            "resolution": 64, "epochs": 1, "repeats": 1, "batch_size": 2, "unet_lr": 1e-2, "text_encoder_lr": 1e-3,
            **preset}}).generator
        out = tmp_path / name
        out.mkdir()
        meta = train_lora(pipe, job, gcfg, BaseModel("sd15-architecture", "full-size-test"), out)
        assert len(meta["loss_steps"]) == 1 and np.isfinite(meta["loss_steps"][0])

        from safetensors import safe_open
        with safe_open(str(out / KOHYA_FILE), "pt") as f:
            kohya_keys = list(f.keys())
            alphas = {f.get_tensor(k).item() for k in kohya_keys if k.endswith(".alpha")}
        assert alphas == {preset["alpha"]}
        has_ff = any("_ff_net_2." in k for k in kohya_keys)
        has_mlp = any(k.startswith("lora_te_text_model_encoder_layers_11_mlp_fc2.") for k in kohya_keys)
        assert has_ff == has_mlp == (name == "kohya")
        # 16 transformer blocks x attn1+attn2 x q/k/v/out = 128 UNet modules carry the attention preset.
        n_unet = len({k.split(".")[0] for k in kohya_keys if k.startswith("lora_unet_")})
        assert n_unet == {"attention": 128, "kohya": 128 + 16 * 4}[name], n_unet

        # The diffusers file and the kohya export load as the same LoRA: same UNet output, which the LoRA moves.
        outputs = {}
        for fmt, file in (("diffusers", DIFFUSERS_FILE), ("kohya", KOHYA_FILE)):
            adapter = f"{name}_{fmt}"
            pipe.load_lora_weights(str(out), weight_name=file, adapter_name=adapter)
            pipe.set_adapters([adapter], adapter_weights=[1.0])
            outputs[fmt] = unet_out(pipe, latents, text)
        moved = (outputs["diffusers"] - base_out).abs().max().item()
        assert moved > 1e-3, moved
        assert torch.allclose(outputs["kohya"], outputs["diffusers"], atol=1e-5 * max(1.0, moved)), \
            (outputs["kohya"] - outputs["diffusers"]).abs().max().item()

        # LoRA weight 0.0 (the sampler's no-LoRA control) draws exactly the base's image.
        def sample():
            return np.asarray(pipe(prompt=job.prompt, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                                   generator=torch.Generator().manual_seed(3), output_type="np").images[0])
        pipe.set_adapters([f"{name}_diffusers"], adapter_weights=[0.0])
        at_zero = sample()
        pipe.disable_lora()
        assert np.array_equal(at_zero, sample())
        pipe.enable_lora()
        pipe.delete_adapters([f"{name}_diffusers", f"{name}_kohya"])
