"""GPU suite (`pytest -m gpu`): the CUDA paths a cluster runs, skipped where torch sees no CUDA device.

Run it on a node before a long experiment: LoRA training per precision (fp16 with its GradScaler, bf16), sampling
on the GPU (weight 0.0 reproduces the base, the same seed the same image), the classifier on Keras's torch
backend (features and trials, no TensorFlow), and, where TensorFlow is installed with CUDA, TF and torch sharing
one GPU in one process (what a search trial does). Tiny models built from
configs: nothing is downloaded. Speed and memory at SD v1.5's real size: benchmarks/bench_gpu.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_manifest, tiny_cfg, write_manifest

from ooc_ray.paths import ExperimentPaths

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]


@pytest.fixture(scope="module")
def gpu_experiment(tmp_path_factory):
    """A tiny 2-class experiment (one LoRA per class, split all) with the tiny base built."""
    from ooc_ray.diffusion.base import ensure_tiny_sd

    root = tmp_path_factory.mktemp("gpu")
    manifest = make_manifest((3, 3), k=2, root=root)
    models = ensure_tiny_sd(root / "models")
    return root, manifest, models


def finetuned(root: Path, manifest, models: Path, precision: str, epochs: int = 8, lr: float = 1e-2):
    import shutil

    from ooc_ray.finetune import run_finetune

    cfg = tiny_cfg(root / f"{precision}-{epochs}-{lr}", generator={"epochs": epochs, "unet_lr": lr,
                                                                "text_encoder_lr": 0.0,
                                                "split": "all", "unet_modules": "transformer+conv",
                                                "mixed_precision": precision})
    paths = ExperimentPaths.of(cfg)
    if not (paths.models / "tiny_sd").is_dir():  # a second call with the same settings re-uses its LoRAs
        shutil.copytree(models, paths.models / "tiny_sd")
        write_manifest(manifest, paths)
    return cfg, paths, run_finetune(cfg, paths)


def test_this_node_passes_the_request_checks():
    from ooc_ray.gpu import require_torch_cuda

    require_torch_cuda("gpu suite")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lora_training_in_mixed_precision_on_the_gpu(gpu_experiment, precision):
    """The base is stored in the low precision on the GPU, the LoRA trains in fp32 (fp16: under a GradScaler),
    its loss falls, and after a few steps it is close to the fp32 LoRA of the same seed (later, at a high lr,
    rounding differences grow: measured 1.4 relative after 8 epochs at lr 1e-2 on an H200)."""
    from safetensors.torch import load_file

    root, manifest, models = gpu_experiment
    from ooc_ray.diffusion.base import bf16_native

    if precision == "bf16" and not bf16_native():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16")
    for row in finetuned(root, manifest, models, precision)[2].itertuples():
        meta = json.loads((Path(row.dir) / "metadata.json").read_text())
        assert meta["device"].startswith("cuda") and meta["base_dtype"] == {"fp16": "float16",
                                                                            "bf16": "bfloat16"}[precision]
        assert (meta["grad_scale_final"] is not None) == (precision == "fp16")
        epochs = meta["loss_epochs"]
        assert np.isfinite(epochs).all() and np.mean(epochs[-3:]) < np.mean(epochs[:3]), epochs
    short = {p: finetuned(root, manifest, models, p, epochs=2, lr=1e-3)[2] for p in ("fp32", precision)}
    for low, full in zip(short[precision].itertuples(), short["fp32"].itertuples()):
        a = load_file(Path(low.dir) / low.file)
        b = load_file(Path(full.dir) / full.file)
        assert all(t.dtype == torch.float32 for t in a.values())
        diff = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
        rel = (diff / torch.cat([b[k].flatten() for k in b]).norm()).item()
        assert 0 < rel < 0.3, rel


def test_sampling_on_the_gpu_is_reproducible_and_weight_zero_is_the_base(gpu_experiment):
    from ooc_ray.sampler import SampleWorker

    root, manifest, models = gpu_experiment
    cfg, paths, table = finetuned(root, manifest, models, "fp32")
    lora = table.iloc[0]
    worker = SampleWorker(str(paths.models / "tiny_sd"), "txt2img", "euler_a", 32,
                          gpu_request="gpu suite: sample.gpus_per_actor=1")
    assert worker.pipe.device.type == "cuda" and worker.pipe.unet.dtype == torch.float16

    import pandas as pd
    rows = pd.DataFrame({"lora_key": lora.lora_key, "lora_dir": lora.dir, "lora_file": lora.file,
                         "prompt": lora.prompt, "negative_prompt": "", "steps": 4, "cfg": 2.0,
                         "seed": [11, 12], "weight": 1.0})
    first = [np.asarray(im) for im in worker.render(rows)]
    again = [np.asarray(im) for im in worker.render(rows)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    zero = [np.asarray(im) for im in worker.render(rows.assign(weight=0.0))]
    worker.pipe.disable_lora()
    base = [np.asarray(im) for im in worker.pipe(
        prompt=list(rows.prompt), num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
        generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images]
    assert all(np.array_equal(a, b) for a, b in zip(zero, base))
    assert not all(np.array_equal(a, b) for a, b in zip(first, zero))  # the LoRA does change the images


def test_ddim_clip_sample_on_the_gpu_in_fp16(gpu_experiment):
    """sample.sampler ddim with sample.clip_sample on CUDA in fp16: the predicted latent stays inside the clip
    range (to fp16 rounding), and the same seeds give the same images twice."""
    from ooc_ray.sampler import SampleWorker

    root, manifest, models = gpu_experiment
    _, paths, _ = finetuned(root, manifest, models, "fp32")
    worker = SampleWorker(str(paths.models / "tiny_sd"), "txt2img", "ddim", 32, clip_sample=0.05,
                          gpu_request="gpu suite: sample.gpus_per_actor=1")
    assert worker.pipe.device.type == "cuda" and worker.pipe.scheduler.config.clip_sample

    def latents():
        return worker.pipe(prompt=["a microscopy image of cells"] * 2, num_inference_steps=4, guidance_scale=1.0,
                           height=32, width=32, output_type="latent",
                           generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images

    first, again = latents(), latents()
    assert first.abs().max().item() <= 0.05 * (1 + 2e-3) and torch.equal(first, again)


def test_tensorflow_and_torch_share_one_gpu_in_one_process():
    """A search trial trains a LoRA (torch) and then a classifier (TF) in one process on one GPU: TF must see
    the GPU and grow its memory instead of taking all of it from torch."""
    tf = pytest.importorskip("tensorflow")
    from ooc_ray.backend.tensorflow_ops import setup as setup_tf
    from ooc_ray.gpu import require_tf_gpu

    held = torch.ones(256, 1024, 1024, device="cuda")  # 1 GiB held by torch first
    setup_tf()
    require_tf_gpu("gpu suite")
    with tf.device("/GPU:0"):
        x = tf.random.normal((512, 512))
        y = float(tf.reduce_sum(tf.matmul(x, x)).numpy())
    assert np.isfinite(y) and float(held.sum().item()) == 256 * 1024 * 1024
    free, total = torch.cuda.mem_get_info()
    assert free > 0.5 * total  # TF grew its memory instead of reserving the card


def test_the_classifier_on_keras_torch_runs_on_the_gpu(tmp_path):
    """classify.backend torch on a CUDA node, as a node without TensorFlow runs it (tests/backend_trials.py in a
    process of its own): features and trials on the GPU, every mixing strategy, exact == cached within float
    error. (Bit-identity of a reused model is checked on CPU: cuDNN may pick non-deterministic kernels.)"""
    import os
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "torch.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "backend_trials.py"), "torch", str(tmp_path),
                           str(tmp_path / "b0.weights.h5"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["device"].startswith("cuda") and "tensorflow" not in found["frameworks"]
    np.testing.assert_allclose(found["exact"]["probs"], found["cached"]["probs"], atol=1e-3)
