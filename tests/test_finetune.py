"""Fine-tune stage on the tiny base: tokenizer, tiny model, LoRA planning, training, saved formats, resume."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_manifest, tiny_cfg, write_manifest

from ooc_ray.errors import ConfigError, DataError, MissingInputError, ModelError
from ooc_ray.paths import ExperimentPaths


pytestmark = pytest.mark.usefixtures("one_torch_thread")


BASE_ID = "tiny-test"  # planning tests only need some base identity


def make_dataset(root: Path, per_class=(4, 4), k: int = 2, groups=("",)):
    return make_manifest(per_class, k=k, root=root, groups=groups)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from ooc_ray.diffusion.base import ensure_tiny_sd

    return ensure_tiny_sd(tmp_path_factory.mktemp("models"))


def seed_models(paths: ExperimentPaths, tiny_base: Path) -> None:
    """Copy the module's tiny base into an experiment (building it costs seconds; it is deterministic)."""
    shutil.copytree(tiny_base, paths.models / "tiny_sd")


# ---------------------------------------------------------------------------------------------- base model


def test_clip_tokenizer_matches_openai_ids(tmp_path):
    from ooc_ray.diffusion.base import clip_tokenizer

    tok = clip_tokenizer(tmp_path / "tok")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_tiny_base_is_deterministic_and_reloads(tmp_path, tiny_base):
    from ooc_ray.diffusion.base import build_tiny_sd, ensure_tiny_sd, load_pipeline

    again = build_tiny_sd(tmp_path / "again")
    for part in ("unet", "vae", "text_encoder"):
        a = next((tiny_base / part).glob("*.safetensors")).read_bytes()
        b = next((again / part).glob("*.safetensors")).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), part
    assert ensure_tiny_sd(tiny_base.parent) == tiny_base  # marker found: not rebuilt
    pipe = load_pipeline(str(tiny_base))
    assert 0.5e6 < sum(p.numel() for p in pipe.unet.parameters()) < 1.5e6
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer("a photo of a cat").input_ids[:3] == [49406, 320, 1125]


def test_a_checkpoint_laid_out_like_sd15_loads_with_its_feature_extractor_and_without_its_safety_checker(
        tmp_path, tiny_base):
    """The hub checkpoint's folder also holds a feature_extractor (CLIP's image processor, in the old
    `CLIPFeatureExtractor` format) and names a safety checker: both as in stable-diffusion-v1-5's model_index.json
    and preprocessor_config.json. load_pipeline must read the first (transformers 5 still does, without
    torchvision) and skip the second, whose weights it never downloads."""
    from ooc_ray.diffusion.base import load_pipeline

    folder = tmp_path / "sd15_layout"
    shutil.copytree(tiny_base, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"feature_extractor": ["transformers", "CLIPImageProcessor"],
                  "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                  "requires_safety_checker": True})
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "feature_extractor").mkdir()
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    pipe = load_pipeline(str(folder))
    assert pipe.safety_checker is None
    pixels = pipe.feature_extractor(images=[np.zeros((40, 60, 3), np.uint8)], return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (1, 3, 224, 224)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_loras_per_fold_all_and_group(tmp_path):
    from ooc_ray.folds import ALL_FOLDS
    from ooc_ray.protocol import plan_loras

    m = make_dataset(tmp_path, per_class=(6, 4), k=2, groups=("huvec", "a549"))
    jobs = plan_loras(tiny_cfg(tmp_path), m, BASE_ID)
    assert [(j.fold, j.label) for j in jobs] == [(0, "good"), (0, "bad"), (1, "good"), (1, "bad")]
    for job in jobs:  # only that fold's training images, never its held-out ones
        expected = m[(m.fold != job.fold) & (m.label == job.label)].id
        assert sorted(job.image_ids) == sorted(expected)
        assert job.prompt == f"a microscopy image of {job.label} organ on chip cells"
    assert len({j.key for j in jobs}) == 4 and jobs[0].key.startswith("fold0_good_")
    assert [j.key for j in plan_loras(tiny_cfg(tmp_path), m, BASE_ID)] == [j.key for j in jobs]  # stable keys
    # gpus does not change the key; learning rate does
    assert plan_loras(tiny_cfg(tmp_path, generator={"gpus": 1.0}), m, BASE_ID)[0].key == jobs[0].key
    assert plan_loras(tiny_cfg(tmp_path, generator={"unet_lr": 2e-3}), m, BASE_ID)[0].key != jobs[0].key
    assert plan_loras(tiny_cfg(tmp_path), m, "another-base")[0].key != jobs[0].key
    # a training image's new bytes move exactly the LoRAs that learn from it: fold 1's "good" LoRA
    changed = m.copy()
    changed.loc[(changed.label == "good") & (changed.fold == 0), "sha256"] = "0" * 64
    moved = [a.key != b.key for a, b in zip(jobs, plan_loras(tiny_cfg(tmp_path), changed, BASE_ID))]
    assert moved == [False, False, True, False]

    all_jobs = plan_loras(tiny_cfg(tmp_path, generator={"split": "all"}), m, BASE_ID)
    assert [(j.fold, len(j.image_ids)) for j in all_jobs] == [(ALL_FOLDS, 6), (ALL_FOLDS, 4)]
    assert all_jobs[0].key.startswith("all_good_")

    grp = plan_loras(tiny_cfg(tmp_path, generator={"per_group": True}), m, BASE_ID)
    assert len(grp) == 2 * 2 * 2
    assert {j.prompt for j in grp if j.label == "bad"} == {"a microscopy image of bad huvec cells",
                                                         "a microscopy image of bad a549 cells"}
    assert all(set(m.set_index("id").loc[list(j.image_ids), "group"]) == {j.group} for j in grp)


def test_plan_loras_errors(tmp_path):
    from ooc_ray.protocol import plan_loras

    m = make_manifest((4, 4), k=2)
    m.loc[m.label == "bad", "fold"] = 1  # every "bad" image held out in fold 1: fold 1 cannot train it
    with pytest.raises(DataError, match="'bad' has no images in fold 1"):
        plan_loras(tiny_cfg(tmp_path), m, BASE_ID)
    with pytest.raises(ConfigError, match="per_group"):
        plan_loras(tiny_cfg(tmp_path, generator={"per_group": True}), make_manifest((4, 4)), BASE_ID)
    with pytest.raises(ConfigError, match="generator.prompt"):
        tiny_cfg(tmp_path, generator={"prompt": "{cls}"})  # checked when the config loads


# ---------------------------------------------------------------------------------------------- training


def test_lora_loss_falls_on_tiny_set(tmp_path, tiny_base):
    from ooc_ray.finetune import run_finetune

    # 16 draws of (t, noise) per epoch: the v-prediction loss of one draw depends on its t by 10x or more
    cfg = tiny_cfg(tmp_path, generator={"epochs": 10, "repeats": 16, "unet_lr": 1e-2, "text_encoder_lr": 0.0,
                                        "unet_modules": "transformer+conv"})
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    m = make_dataset(tmp_path, per_class=(2, 2), k=2)
    write_manifest(m[m.label == "good"], paths)  # one class, two folds: 2 LoRAs of one image each
    table = run_finetune(cfg, paths)
    for d in table["dir"]:
        epochs = json.loads((Path(d) / "metadata.json").read_text())["loss_epochs"]
        first, last = np.mean(epochs[:3]), np.mean(epochs[-3:])
        assert last < 0.97 * first, epochs  # seeded, so stable


def train_in_this_process(cfg, paths) -> pd.DataFrame:
    """run_finetune's LoRAs trained here, not as Ray tasks: the table it would write."""
    from ooc_ray.data import load_manifest
    from ooc_ray.diffusion.lora_files import trained_table
    from ooc_ray.diffusion.pretrain import generator_base
    from ooc_ray.finetune import train_job
    from ooc_ray.protocol import plan_loras

    base = generator_base(cfg, paths)
    jobs = plan_loras(cfg, load_manifest(paths), base.identity)
    for job in jobs:
        train_job(job, cfg.generator, base, paths.lora)
    return trained_table(jobs, paths.lora)


def test_a_lora_trains_on_its_tasks_cpus_whatever_threads_its_process_had(tmp_path, tiny_base):
    """Ray reuses worker processes, and torch takes its threads from OMP_NUM_THREADS only when first imported: a
    1-CPU LoRA task in the worker of a 2-CPU task (the demo's pretraining) found 2 threads, and 1 vs 2 threads
    change a LoRA's bits. The task sets its own threads, records them, and gives the process back its own."""
    import torch

    from ooc_ray.finetune import run_finetune

    m = make_dataset(tmp_path, per_class=(6, 2), k=2)
    runs = {}
    for where in ("ray", "here"):
        cfg = tiny_cfg(tmp_path / where, generator={"epochs": 2, "repeats": 4, "batch_size": 4, "split": "all",
                                                   "text_encoder_lr": 0.0, "cpus": 1})
        paths = ExperimentPaths.of(cfg)
        seed_models(paths, tiny_base)
        write_manifest(m[m.label == "good"], paths)
        if where == "ray":  # a Ray task, in whichever worker of the session's Ray is free
            row = run_finetune(cfg, paths).iloc[0]
        else:  # this process on 2 threads, as that worker was
            torch.set_num_threads(2)
            try:
                row = train_in_this_process(cfg, paths).iloc[0]
                assert torch.get_num_threads() == 2
            finally:
                torch.set_num_threads(1)  # the module's one_torch_thread
        runs[where] = json.loads((Path(row["dir"]) / "metadata.json").read_text())
    assert runs["ray"]["torch_threads"] == runs["here"]["torch_threads"] == 1
    # The tensors' digest, not the file's: safetensors writes its metadata map in an order that varies by process.
    # On 2 threads the tensors differ (the test fails without the task's own threads).
    assert runs["ray"]["weights_sha256"] == runs["here"]["weights_sha256"]


def test_a_tasks_threads_hold_numpys_blas_too_and_give_it_back():
    """task_threads holds NumPy's BLAS (KID's products and the probes of a search trial) to the task's CPUs too:
    OpenBLAS, like torch, takes its threads once, when a worker first loads it, and 1 vs 2 threads change x @ y.T
    in its last bits."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from ooc_ray.diffusion.base import task_threads

    def blas() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(2, user_api="blas"):  # a worker whose first task had 2 CPUs
        assert blas() == {2}
        with task_threads(1) as n:
            assert n == 1 and blas() == {1}
        assert blas() == {2}


def test_cached_latents_train_the_same_lora_as_encoding_every_step(tmp_path, tiny_base, monkeypatch):
    """generator.cache_latents encodes each image once (and the frozen text encoder's prompt once); off, the
    VAE and the text encoder run at every step. Same noise per image, so the same loss curve up to rounding."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    calls = {"vae": 0, "text": 0}
    encode, text_forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(AutoencoderKL, "encode", counted("vae", encode))
    monkeypatch.setattr(CLIPTextModel, "forward", counted("text", text_forward))
    m = make_dataset(tmp_path, per_class=(10, 2), k=2)
    runs = {}
    for cache in (True, False):
        calls.update(vae=0, text=0)
        cfg = tiny_cfg(tmp_path / str(cache), generator={"epochs": 3, "repeats": 2, "batch_size": 4, "split": "all",
                                                        "text_encoder_lr": 0.0, "cache_latents": cache})
        paths = ExperimentPaths.of(cfg)
        seed_models(paths, tiny_base)
        write_manifest(m[m.label == "good"], paths)
        row = train_in_this_process(cfg, paths).iloc[0]  # where the calls above are counted (not a Ray task)
        runs[cache] = (row, json.loads((Path(row["dir"]) / "metadata.json").read_text()), dict(calls))
    (cached, meta_c, calls_c), (fresh, meta_f, calls_f) = runs[True], runs[False]
    steps = 3 * 5  # 10 images x 2 repeats / batch 4, 3 epochs
    assert len(meta_c["loss_steps"]) == steps
    assert calls_c == {"vae": 2, "text": 1}  # 10 images in chunks of 8; one prompt
    assert calls_f == {"vae": steps, "text": steps}
    assert cached.lora_key == fresh.lora_key  # a resource: the key (and so re-use) does not depend on it
    np.testing.assert_allclose(meta_f["loss_steps"], meta_c["loss_steps"], rtol=1e-4)
    assert meta_c["cache_latents"] and not meta_f["cache_latents"]


def test_finetune_outputs_formats_and_resume(tmp_path, tiny_base, monkeypatch):
    import torch
    from safetensors import safe_open

    import ooc_ray.finetune as ft

    cfg = tiny_cfg(tmp_path)
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    m = make_dataset(tmp_path, per_class=(4, 2), k=2)
    write_manifest(m, paths)
    table = ft.run_finetune(cfg, paths)

    assert list(table.columns[:10]) == ["lora_key", "fold", "label", "group", "prompt", "dir", "file", "sha256",
                                        "weights_sha256", "kohya_file"]
    assert table["weights_sha256"].str.len().eq(64).all()
    assert len(table) == 4 and table.lora_key.is_unique
    assert table.set_index(["fold", "label"]).n_images.to_dict() == {(0, "good"): 2, (0, "bad"): 1,
                                                                     (1, "good"): 2, (1, "bad"): 1}
    assert pd.read_parquet(paths.lora / "loras.parquet").equals(table)
    row = table.iloc[0]
    d = Path(row.dir)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["sha256"] == hashlib.sha256((d / row.file).read_bytes()).hexdigest() == row.sha256
    assert meta["kohya_sha256"] == hashlib.sha256((d / row.kohya_file).read_bytes()).hexdigest()
    assert meta["image_ids"] == sorted(m[(m.fold != row.fold) & (m.label == row.label)].id)
    assert len(meta["loss_steps"]) == cfg.generator.epochs * meta["steps_per_epoch"]
    assert meta["config"]["rank"] == 4 and "gpus" not in meta["config"]
    assert meta["image_sha256"] == m.set_index("id").loc[meta["image_ids"], "sha256"].tolist()
    assert not list(paths.lora.glob(".*.tmp"))  # atomic_dir leaves no temp folder

    with safe_open(str(d / row.kohya_file), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(next(k for k in keys if k.endswith(".alpha"))).item() == 4.0
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up") for k in keys)

    # The shared base is left as loaded: no adapter, weights equal to a fresh load.
    base = ft.base_pipeline(str(paths.models / "tiny_sd"), cfg.generator)
    fresh = ft.load_pipeline(str(paths.models / "tiny_sd"))
    assert not any("lora" in n for n, _ in base.unet.named_parameters())
    assert not any("lora" in n for n, _ in base.text_encoder.named_parameters())
    for (n, a), b in zip(base.unet.state_dict().items(), fresh.unet.state_dict().values()):
        assert torch.equal(a, b), n

    # Re-run: everything found, nothing trained.
    monkeypatch.setattr(ft, "train_job", lambda *a, **k: pytest.fail("retrained a finished LoRA"))
    assert ft.run_finetune(cfg, paths).equals(table)


@pytest.mark.restarts_ray
def test_a_gpu_task_that_sees_no_cuda_fails_naming_node_and_request(tmp_path, tiny_base):
    """generator.gpus > 0 sends each LoRA to a Ray task with num_gpus. A node that advertises a GPU its torch
    cannot use (here: a fake GPU resource on this CPU machine) must fail the stage, not train on the CPU."""
    import ray

    from ooc_ray.errors import ResourceError
    from ooc_ray.finetune import run_finetune
    from ooc_ray.gpu import node_name

    if ray.is_initialized():  # an earlier test's local Ray has no GPU resource: restart with a fake one
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test cluster: no token auth
    cfg = tiny_cfg(tmp_path, generator={"gpus": 0.5, "epochs": 1, "split": "all"})  # 2 LoRAs, 2 GPU tasks
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    write_manifest(make_dataset(tmp_path, per_class=(2, 2), k=2), paths)
    # address "local": without it ray.init joins the last cluster `ray start` made on this machine (the
    # multi-node module's, when it runs on the other xdist worker), which refuses num_cpus/num_gpus.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ResourceError, match=f"finetune: generator.gpus=0.5: node {node_name()} was given a "
                                                "GPU but torch .* sees no usable CUDA device"):
            run_finetune(cfg, paths)
    finally:
        ray.shutdown()
    assert not list(paths.lora.glob("*/metadata.json"))  # nothing trained, nothing half-written


def test_bf16_trains_under_cpu_autocast_and_fp16_needs_a_gpu(tmp_path, tiny_base):
    """generator.mixed_precision is honoured or refused, never swapped: bf16 runs on CPUs (autocast; the LoRA
    parameters stay fp32), fp16 has no CPU path and raises naming the key."""
    from safetensors.torch import load_file

    from ooc_ray.errors import ModelError
    from ooc_ray.finetune import run_finetune

    m = make_dataset(tmp_path, per_class=(2, 2), k=2)
    trained = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_cfg(tmp_path / precision, generator={"epochs": 2, "text_encoder_lr": 0.0, "split": "all",
                                                        "mixed_precision": precision})
        paths = ExperimentPaths.of(cfg)
        seed_models(paths, tiny_base)
        write_manifest(m[m.label == "good"], paths)
        row = run_finetune(cfg, paths).iloc[0]
        trained[precision] = load_file(Path(row["dir"]) / "pytorch_lora_weights.safetensors")
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in trained["bf16"].values())
    # Same seeds, same data: bf16 matmuls round differently, so the LoRAs differ (autocast ran), but only a little.
    diffs = [(trained["bf16"][k] - trained["fp32"][k]).abs().max().item() for k in trained["fp32"]]
    scale = max(trained["fp32"][k].abs().max().item() for k in trained["fp32"])
    assert 0 < max(diffs) < 0.2 * scale, (max(diffs), scale)

    cfg = tiny_cfg(tmp_path / "fp16", generator={"mixed_precision": "fp16", "split": "all"})
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    write_manifest(m[m.label == "good"], paths)
    with pytest.raises(ModelError, match="generator.mixed_precision=fp16 needs a CUDA GPU"):
        run_finetune(cfg, paths)


def test_missing_or_changed_lora_is_named_then_retrained(tmp_path, tiny_base, capsys):
    """A LoRA deleted or swapped after training stops sampling with the file named, before any actor starts;
    the finetune stage names it and trains it again (and only it)."""
    import ooc_ray.finetune as ft
    from ooc_ray.diffusion.base import resolve_base
    from ooc_ray.diffusion.lora_files import DIFFUSERS_FILE, KOHYA_FILE, trained_table
    from ooc_ray.protocol import plan_loras

    cfg = tiny_cfg(tmp_path, generator={"epochs": 1})
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    m = make_dataset(tmp_path, per_class=(2, 2), k=2)
    write_manifest(m, paths)
    table = ft.run_finetune(cfg, paths)
    jobs = plan_loras(cfg, m, resolve_base("tiny", paths.models).identity)
    first = Path(table["dir"].iloc[0])
    (first / KOHYA_FILE).write_bytes(b"not the trained weights")
    with pytest.raises(DataError, match=f"changed since training: .*{KOHYA_FILE}"):
        trained_table(jobs, paths.lora)
    (first / DIFFUSERS_FILE).unlink()
    with pytest.raises(DataError, match=f"missing: .*{DIFFUSERS_FILE}"):
        trained_table(jobs, paths.lora)
    others = {d: (Path(d) / "metadata.json").stat().st_mtime_ns for d in table["dir"].iloc[1:]}
    again = ft.run_finetune(cfg, paths)
    assert f"LoRA {first.name} is damaged (file missing" in capsys.readouterr().out
    assert again["weights_sha256"].tolist() == table["weights_sha256"].tolist()  # seeded: the same LoRA again
    assert {d: (Path(d) / "metadata.json").stat().st_mtime_ns for d in again["dir"].iloc[1:]} == others
    shutil.rmtree(first)
    with pytest.raises(MissingInputError, match="not trained"):
        trained_table(jobs, paths.lora)


def test_weights_digest_ignores_file_layout(tmp_path):
    """Two files with the same tensors and metadata in another order: file hashes differ, the digest does not."""
    import torch
    from safetensors.torch import save_file

    from ooc_ray.diffusion.lora import weights_digest
    from ooc_ray.io import sha256_file as _sha256

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}
    save_file(tensors, str(tmp_path / "one.safetensors"), metadata={"format": "pt", "x": "1"})
    save_file(dict(reversed(list(tensors.items()))), str(tmp_path / "two.safetensors"), metadata={"x": "1"})
    assert _sha256(tmp_path / "one.safetensors") != _sha256(tmp_path / "two.safetensors")
    assert weights_digest(tmp_path / "one.safetensors") == weights_digest(tmp_path / "two.safetensors")
    save_file({**tensors, "a.weight": torch.ones(4) * 2}, str(tmp_path / "three.safetensors"))
    assert weights_digest(tmp_path / "three.safetensors") != weights_digest(tmp_path / "one.safetensors")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_training_target_is_the_one_the_schedulers_prediction_type_names(kind):
    """Pretraining and LoRA training share training_target; checked against the formulas written out here
    (DDPM: alpha_bar_t = prod(1 - beta), v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0)."""
    import torch
    from diffusers import DDPMScheduler

    from ooc_ray.diffusion.base import training_target

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          prediction_type=kind)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    alpha_bar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[kind]
    torch.testing.assert_close(training_target(sched, x0, noise, t), expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_prediction_type_is_refused():
    from types import SimpleNamespace

    from ooc_ray.diffusion.base import training_target

    with pytest.raises(ModelError, match="generator.base.*'flow'"):
        training_target(SimpleNamespace(config=SimpleNamespace(prediction_type="flow")), None, None, None)


def test_a_data_set_lora_conditions_each_image_on_its_own_class_prompt(tmp_path, tiny_base, monkeypatch):
    """generator.scope: dataset trains one LoRA per fold on both classes; the UNet sees, per image in a batch, the
    embedding of that image's class prompt (two distinct ones here), not one prompt for all."""
    import torch
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *a, **k):
        if self.training:
            seen.append(encoder_hidden_states.detach().flatten(1).clone())
        return forward(self, sample, timestep, encoder_hidden_states, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    cfg = tiny_cfg(tmp_path, generator={"epochs": 2, "repeats": 1, "batch_size": 4, "text_encoder_lr": 0.0,
                                        "scope": "dataset"})
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    m = make_dataset(tmp_path, per_class=(4, 4), k=2)
    write_manifest(m, paths)
    table = train_in_this_process(cfg, paths)  # where the UNet's inputs are recorded (not a Ray task)
    assert len(table) == 2 and (table["label"] == "").all()  # one LoRA per fold, no class of its own
    meta = json.loads((Path(table["dir"].iloc[0]) / "metadata.json").read_text())
    assert meta["labels"] == ["bad", "good"] and meta["n_images"] == 4 and np.isfinite(meta["final_loss"])
    rows = torch.cat(seen)
    distinct = torch.unique(rows, dim=0)
    assert len(distinct) == 2 and len(rows) == 2 * 2 * 4  # 2 LoRAs x 2 epochs x 4 images, two captions
    assert any(len(torch.unique(batch, dim=0)) == 2 for batch in seen)  # classes mixed within a batch


def test_the_optimizer_gives_each_lora_its_own_learning_rate(tmp_path, tiny_base):
    """Two parameter groups: the UNet's LoRA weights at generator.unet_lr, the text encoder's at
    generator.text_encoder_lr, each group exactly its model's trainable LoRA parameters (the paper's 5e-4 and
    1e-4: one rate for both would train the text encoder 5x faster than asked)."""
    from ooc_ray.diffusion.base import load_pipeline
    from ooc_ray.finetune import _add_adapters

    pipe = load_pipeline(str(tiny_base))
    gcfg = tiny_cfg(tmp_path, generator={"unet_lr": 5e-4, "text_encoder_lr": 1e-4}).generator
    optimizer = _add_adapters(pipe, "probe", gcfg, use_te=True)
    try:
        unet_group, te_group = optimizer.param_groups
        assert (unet_group["lr"], te_group["lr"]) == (5e-4, 1e-4)
        unet_lora = {id(p) for name, p in pipe.unet.named_parameters() if "lora_" in name}
        te_lora = {id(p) for name, p in pipe.text_encoder.named_parameters() if "lora_" in name}
        assert unet_lora and te_lora
        assert {id(p) for p in unet_group["params"]} == unet_lora
        assert {id(p) for p in te_group["params"]} == te_lora
    finally:
        pipe.unet.delete_adapters("probe")
        pipe.text_encoder.delete_adapter("probe")


def test_a_lora_trained_in_steps_beside_another_is_the_lora_trained_at_once(tmp_path, tiny_base):
    """LoraTraining as a search trial uses it: two LoRAs on one base, interleaved (A to epoch 1, saved; B to 1,
    saved; A on to 3; B on to 3), each with text-encoder LoRA. Every save has the weights train_lora writes for
    generator.epochs = 1 and 3 alone, so a checkpoint is keyed and re-used as the LoRA of its epochs."""
    import dataclasses

    from ooc_ray.diffusion.base import load_pipeline
    from ooc_ray.diffusion.pretrain import generator_base
    from ooc_ray.diffusion.lora import weights_digest
    from ooc_ray.finetune import LoraTraining, train_lora
    from ooc_ray.protocol import plan_loras

    cfg = tiny_cfg(tmp_path, generator={"epochs": 3, "repeats": 2, "text_encoder_lr": 1e-3, "unet_lr": 1e-2})
    paths = ExperimentPaths.of(cfg)
    seed_models(paths, tiny_base)
    m = make_dataset(tmp_path, per_class=(3, 3), k=2)
    manifest = m[m.label == "good"]
    base = generator_base(cfg, paths)
    at = {e: dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, epochs=e)) for e in (1, 3)}
    jobs = {e: plan_loras(c, manifest, base.identity) for e, c in at.items()}  # two folds: two LoRAs per epochs
    assert len(jobs[3]) == 2 and {j.key for j in jobs[1]}.isdisjoint(j.key for j in jobs[3])
    pipe = load_pipeline(str(tiny_base))
    stepped = {}
    trainings = [LoraTraining(pipe, job, cfg.generator) for job in jobs[3]]
    try:
        for epochs in (1, 3):
            for training, job in zip(trainings, jobs[epochs]):
                training.train_to(epochs)
                (tmp_path / "stepped" / job.key).mkdir(parents=True)
                training.save(job, at[epochs].generator, base, tmp_path / "stepped" / job.key)
                stepped[job.key] = weights_digest(tmp_path / "stepped" / job.key / "pytorch_lora_weights.safetensors")
    finally:
        for training in trainings:
            training.close()
    assert not getattr(pipe.unet, "peft_config", None) and not getattr(pipe.text_encoder, "peft_config", None)
    alone = {}
    for epochs, epoch_jobs in jobs.items():
        for job in epoch_jobs:
            (tmp_path / "alone" / job.key).mkdir(parents=True)
            meta = train_lora(pipe, job, at[epochs].generator, base, tmp_path / "alone" / job.key)
            alone[job.key] = meta["weights_sha256"]
            assert len(meta["loss_epochs"]) == epochs
    assert stepped == alone and len(set(alone.values())) == 4
