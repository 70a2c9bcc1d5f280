"""GPU figures for one node, at SD v1.5's real size (built from its configs, random weights: nothing downloaded).

    python benchmarks/bench_gpu.py [--resolution 512] [--out bench_gpu.json] [--only lora,sampling,features,shared]
    # checks of the script on a CPU (minutes each); their figures mean nothing:
    python benchmarks/bench_gpu.py --device cpu --resolution 64 --only lora,sampling --lora-steps 1,2 \
        --lora-batches 1 --precisions fp32 --sampling-steps 2 --batches 1,2
    python benchmarks/bench_gpu.py --device cpu --only features --feature-batches 1
    python benchmarks/bench_gpu.py --device cpu --only features_torch --feature-batches 1

- lora: LoRA training steps/s and peak GPU memory per generator.mixed_precision (fp32, fp16 + GradScaler, bf16)
  and batch size, through ooc_ray.finetune.train_lora (rank 4, the paper's attention targets). Steps/s is
  measured between two LoRAs of different length on the same warm model, so latent caching and file writing
  cancel out.
- sampling: images/s per batch size through the sampler's own worker (fp16 base, 20 euler_a steps, CFG 7.5,
  one LoRA active), the first batch of each size a warm-up.
- features: EfficientNetB7 at 600 px (random weights), frozen-backbone images/s per batch (needs TensorFlow).
- features_torch: the same on classify.backend torch (Keras on torch, no TensorFlow), with peak GPU memory; its own
  call (`--only lora,sampling,features_torch`), as Keras takes one framework per process.
- shared: torch holding the SD UNet while TF runs B7 in the same process (a search trial): both finish, and
  what each holds (needs TensorFlow).
A section whose library is missing is reported as skipped with the reason. Random weights cost the same time
as trained ones: the work is the same matrix sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from ooc_ray.load import from_dict  # noqa: E402

DEVICE = "cuda"  # --device cpu runs every torch section on the CPU: a check of this script, not a figure


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def sync_and_reset() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    if DEVICE != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    return gib(torch.cuda.max_memory_allocated())


def write_images(folder: Path, n: int, size: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"cell{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


N_IMAGES = 4  # training images per benchmark LoRA


def generator_config(resolution: int, precision: str, steps: int, batch: int):
    """A LoRA of `steps` steps of `batch` images (one epoch of N_IMAGES x repeats; at least one repeat)."""
    return from_dict({"name": "bench", "generator": {
        "resolution": resolution, "mixed_precision": precision, "epochs": 1, "repeats": max(1, steps * batch // N_IMAGES),
        "batch_size": batch, "rank": 4, "alpha": 4.0, "unet_lr": 1e-4, "text_encoder_lr": 0.0,
        "unet_modules": "attention"}}).generator


def bench_lora(work: Path, resolution: int, steps_pair: tuple[int, int], precisions: list[str], batches: list[int]
               ) -> tuple[list[dict], object]:
    import torch

    from ooc_ray.diffusion.base import BaseModel, sd15_architecture
    from ooc_ray.finetune import train_lora
    from ooc_ray.diffusion.base import bf16_native, training_precision
    from ooc_ray.protocol import LoraJob

    images = write_images(work / "train", N_IMAGES, resolution)
    job = LoraJob("bench", -1, "cell", "", "a microscopy image of a cell",
                  tuple(f"cell{i}" for i in range(N_IMAGES)), tuple(images), ("0" * 64,) * N_IMAGES)
    cpu_pipe = sd15_architecture(work / "tokenizer")
    # Saved before any adapter is added: peft leaves its wrappers (to_q.base_layer...) in a model it trained.
    cpu_pipe.save_pretrained(work / "sd15")
    rows = []
    for precision in precisions:
        if DEVICE == "cpu" and precision == "fp16" or (
                DEVICE == "cuda" and precision == "bf16" and not bf16_native()):
            rows.append({"precision": precision, "skipped": f"no {precision} on this device"})
            continue
        dtype = training_precision(precision, DEVICE)[0]
        pipe = cpu_pipe.to(DEVICE, dtype)
        for batch in batches:
            timing = {}
            # A warm-up LoRA first (kernel selection, allocator growth: measured, it made the first short LoRA
            # slower than the long one), then the two timed ones, by default 4 and 24 steps.
            for run, steps in (("warmup", steps_pair[0]), ("short", steps_pair[0]), ("long", steps_pair[1])):
                sync_and_reset()
                out = work / f"lora_{precision}_{batch}_{run}"
                out.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                meta = train_lora(pipe, job, generator_config(resolution, precision, steps, batch),
                                  BaseModel("sd15-architecture", "bench"), out)
                peak = peak_gib()  # synchronises first
                timing[run] = (time.perf_counter() - start, len(meta["loss_steps"]), meta, peak)
            (t1, n1, _, _), (t2, n2, meta, peak) = timing["short"], timing["long"]
            rate = (n2 - n1) / (t2 - t1)
            rows.append({"precision": precision, "batch": batch, "base_dtype": meta["base_dtype"],
                         "steps_per_s": round(rate, 2), "images_per_s": round(rate * batch, 1), "peak_gib": peak,
                         "grad_scale_final": meta["grad_scale_final"]})
            print("lora", rows[-1], flush=True)
        cpu_pipe = pipe.to("cpu", torch.float32)
        del pipe
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows, cpu_pipe


def bench_sampling(work: Path, resolution: int, lora_dir: Path, batches: list[int], steps: int) -> list[dict]:
    import pandas as pd

    from ooc_ray.sampler import SampleWorker

    worker = SampleWorker(str(work / "sd15"), "txt2img", "euler_a", resolution,  # fp16 on a GPU
                          gpu_request="bench_gpu" if DEVICE == "cuda" else "")
    assert worker.pipe.device.type == DEVICE, worker.pipe.device
    rows = []
    for batch in batches:
        frame = pd.DataFrame({"lora_key": "bench", "lora_dir": str(lora_dir), "lora_file":
                              "pytorch_lora_weights.safetensors", "prompt": "a microscopy image of a cell",
                              "negative_prompt": "", "steps": steps, "cfg": 7.5, "seed": range(batch), "weight": 1.0})
        worker.render(frame)  # warm-up (cuDNN autotuning, adapter load)
        sync_and_reset()
        start = time.perf_counter()
        for _ in range(2):
            worker.render(frame)  # returns PIL images: the GPU work is done
        seconds = time.perf_counter() - start
        peak = peak_gib()
        rows.append({"batch": batch, "images_per_s": round(2 * batch / seconds, 2), "peak_gib": peak})
        print("sampling", rows[-1], flush=True)
    return rows


def bench_features(batches=(8, 32)) -> list[dict]:
    import tensorflow as tf

    from ooc_ray.backend.tensorflow_ops import setup as setup_tf
    from ooc_ray.networks import build_backbone, frozen
    from ooc_ray.gpu import require_tf_gpu

    setup_tf()
    if DEVICE == "cuda":
        require_tf_gpu("bench_gpu features")
    model = frozen(build_backbone("EfficientNetB7", None, 600))
    call = tf.function(lambda x: model(x), reduce_retracing=True)
    rows = []
    for batch in batches:
        x = tf.random.uniform((batch, 600, 600, 3), 0, 255)
        call(x).numpy()  # warm-up: graph trace and autotuning
        start = time.perf_counter()
        for _ in range(3):
            call(x).numpy()
        rows.append({"batch": batch, "images_per_s": round(3 * batch / (time.perf_counter() - start), 1)})
        print("features", rows[-1], flush=True)
    return rows


def bench_features_torch(batches=(8, 32)) -> list[dict]:
    """EfficientNetB7 at 600 px on classify.backend torch (Keras on torch: a node without TensorFlow), as the
    feature tasks run it (networks.framework().compiled: under no_grad); images/s and peak GPU memory."""
    from ooc_ray.backend import keras_side

    networks = keras_side("ooc_ray.networks", "torch")  # before anything imports Keras on another framework
    import torch

    from ooc_ray.gpu import require_torch_cuda

    if DEVICE == "cuda":
        require_torch_cuda("bench_gpu features_torch")
    ops = networks.framework()
    ops.setup()
    model = networks.frozen(networks.build_backbone("EfficientNetB7", None, 600))
    call = ops.compiled(lambda x: model(x))
    rows = []
    for batch in batches:
        x = torch.rand((batch, 600, 600, 3), device=DEVICE) * 255
        sync_and_reset()
        call(x)  # warm-up: cuDNN autotuning
        start = time.perf_counter()
        for _ in range(3):
            call(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        rows.append({"batch": batch, "images_per_s": round(3 * batch / (time.perf_counter() - start), 1),
                     "peak_gib": peak_gib()})
        print("features_torch", rows[-1], flush=True)
    rows.append({"tensorflow_imported": "tensorflow" in sys.modules})
    return rows


def bench_shared(work: Path, cpu_pipe) -> dict:
    import torch

    unet = cpu_pipe.unet.to("cuda", torch.float16)
    torch_gib = gib(torch.cuda.memory_allocated())
    rows = bench_features(batches=(8,))
    free, total = torch.cuda.mem_get_info()
    out = {"torch_holds_gib": torch_gib, "tf_images_per_s": rows[0]["images_per_s"],
           "card_free_gib_after": gib(free), "card_total_gib": gib(total)}
    unet.to("cpu", torch.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--only", default="lora,sampling,features,shared")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--batches", default="1,4,8,16", help="sampling batch sizes")
    ap.add_argument("--sampling-steps", type=int, default=20)
    ap.add_argument("--lora-steps", default="4,24", help="the two LoRA lengths whose difference is timed")
    ap.add_argument("--lora-batches", default="1,4", help="LoRA training batch sizes")
    ap.add_argument("--precisions", default="fp32,fp16,bf16")
    ap.add_argument("--feature-batches", default="8,32", help="EfficientNetB7 batch sizes")
    args = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: torch sees no CUDA device on this node")
    only = set(args.only.split(","))
    report: dict = {"card": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                    "resolution": args.resolution}
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    steps_pair = tuple(int(r) for r in args.lora_steps.split(","))
    lora_batches = [int(b) for b in args.lora_batches.split(",")]
    cpu_pipe = None
    if only & {"lora", "sampling", "shared"}:  # the others reuse its model and LoRA
        report["lora"], cpu_pipe = bench_lora(work, args.resolution, steps_pair, args.precisions.split(","),
                                              lora_batches)
    if "sampling" in only:
        lora = work / f"lora_{args.precisions.split(',')[0]}_{lora_batches[0]}_long"
        batches = [int(b) for b in args.batches.split(",")]
        report["sampling"] = bench_sampling(work, args.resolution, lora, batches, args.sampling_steps)
    feature_batches = tuple(int(b) for b in args.feature_batches.split(","))
    if "features_torch" in only and only & {"features", "shared"}:
        sys.exit("bench_gpu: features_torch runs Keras on torch, features and shared on TensorFlow; Keras takes one "
                 "framework per process: run them in separate calls")
    for name, fn in (("features_torch", lambda: bench_features_torch(feature_batches)),
                     ("features", lambda: bench_features(feature_batches)),
                     ("shared", lambda: bench_shared(work, cpu_pipe))):
        if name not in only:
            continue
        if name == "shared" and DEVICE != "cuda":
            report[name] = {"skipped": "needs a GPU"}
            continue
        try:
            report[name] = fn()
        except ImportError as exc:
            report[name] = {"skipped": f"{exc.name or exc} not installed"}
            print(name, report[name], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
