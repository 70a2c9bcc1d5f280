"""Sample stage on the tiny base: pool sizes, seeds, provenance, reproducibility, Ray actors, crash + resume."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_manifest, write_manifest
from helpers import tiny_cfg as _tiny_cfg
from PIL import Image

from ooc_ray.paths import ExperimentPaths


def make_dataset(root: Path, per_class=(4, 2), **kwargs) -> pd.DataFrame:
    """Unbalanced by default (4 good, 2 bad), so pool sizes differ per class."""
    return make_manifest(per_class, root=root, **kwargs)


def tiny_cfg(root: Path, **sections):
    """A 10x higher UNet lr than the fine-tuning tests: LoRAs that visibly change images in 2 steps."""
    sections["generator"] = {"unet_lr": 1e-2, **sections.get("generator", {})}
    return _tiny_cfg(root, **sections)


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.xdist_group("sample")]  # one worker: one `trained`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny experiment with its 4 LoRAs (2 folds x 2 classes) trained; tests copy it."""
    from ooc_ray.finetune import run_finetune

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(root)
    paths = ExperimentPaths.of(cfg)
    manifest = make_dataset(root)
    write_manifest(manifest, paths)
    run_finetune(cfg, paths)
    return paths.root, manifest


def experiment(tmp_path: Path, trained, **sections):
    """A fresh experiment folder holding a copy of the trained base + LoRAs, with config `sections`."""
    src, manifest = trained
    cfg = tiny_cfg(tmp_path, **sections)
    paths = ExperimentPaths.of(cfg)
    for name in ("models", "lora"):
        shutil.copytree(src / name, paths.root / name)
    write_manifest(manifest, paths)
    return cfg, paths, manifest


def base_pipe(paths: ExperimentPaths):
    import diffusers

    from ooc_ray.diffusion.base import load_pipeline

    pipe = load_pipeline(str(paths.models / "tiny_sd"))
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def render(pipe, rows: pd.DataFrame) -> list[np.ndarray]:
    """Rows of one (lora, weight), rendered as the sampler does (same batch, prompts, per-row seeds)."""
    import torch

    images = pipe(prompt=list(rows.prompt), num_inference_steps=int(rows.steps.iloc[0]),
                  guidance_scale=float(rows.cfg.iloc[0]), height=32, width=32,
                  generator=[torch.Generator().manual_seed(int(s)) for s in rows.seed]).images
    return [np.array(im) for im in images]


def pngs(rows: pd.DataFrame) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in rows.path]


# ---------------------------------------------------------------------------------------------- pure parts


def test_image_seed_is_stable_and_distinct():
    from ooc_ray.sample import image_seed

    seeds = {image_seed(1234, k, w, i) for k in ("a", "b") for w in (1.0, 0.8) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(1234, "a", 1.0, 3) == image_seed(1234, "a", 1.0, 3) != image_seed(1235, "a", 1.0, 3)


# ---------------------------------------------------------------------------------------------- in process


def generator_stack() -> str:
    import diffusers
    import peft
    import torch
    import transformers

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
            f"transformers {transformers.__version__}")


def test_sample_provenance_and_reproducibility(tmp_path, trained):
    from ooc_ray.sample import SYNTHETIC_COLUMNS, image_seed, sample_pools

    cfg, paths, manifest = experiment(tmp_path, trained)
    table = sample_pools(cfg, paths, manifest, use_ray=False)
    # pools: fold 0 trains on 2 good + 1 bad, fold 1 the same; x 2 weights
    assert len(table) == (2 + 1) * 2 * 2 and list(table.columns) == SYNTHETIC_COLUMNS
    assert not table.duplicated(["lora_key", "weight", "index"]).any() and table.id.is_unique
    assert table["sha256"].str.len().eq(64).all() and table["sha256"].is_unique
    assert pd.read_parquet(paths.synthetic_table).equals(table)
    assert table.groupby(["fold", "label", "weight"]).size().to_dict() == {
        (f, c, w): n for f in (0, 1) for c, n in (("bad", 1), ("good", 2)) for w in (0.0, 1.0)}
    row = table.iloc[0]
    assert row.seed == image_seed(cfg.sample.seed, row.lora_key, row.weight, row["index"])
    assert (row.sampler, row.steps, row.cfg, row["mode"]) == ("euler_a", 2, 7.0, "txt2img")
    assert row.base_model.startswith("tiny-")  # the tiny base's content identity
    assert all(Image.open(p).size == (32, 32) for p in table.path)
    assert Path(row.path).relative_to(paths.synthetic).parts[0] == row.lora_key

    loras = pd.read_parquet(paths.lora / "loras.parquet").set_index("lora_key")
    # The libraries each image and LoRA was made with (the report's header names them; no key holds them).
    assert (table["versions"] == generator_stack()).all() and (loras["versions"] == generator_stack()).all()
    group = table[(table.fold == 0) & (table.label == "good")]
    w1, w0 = group[group.weight == 1.0], group[group.weight == 0.0]
    lora = loras.loc[w1.lora_key.iloc[0]]

    # weight 0.0 reproduces the base model's images exactly
    pipe = base_pipe(paths)
    for a, b in zip(render(pipe, w0), pngs(w0)):
        np.testing.assert_array_equal(a, b)
    # the saved LoRA reloads in a fresh pipeline to the same images; same seeds -> identical images
    pipe.load_lora_weights(lora.dir, weight_name=lora.file, adapter_name="diffusers")
    pipe.set_adapters(["diffusers"], adapter_weights=[1.0])
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())  # UNet and TE parts both load
    fresh = render(pipe, w1)
    for a, b in zip(fresh, pngs(w1)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(fresh[0], pngs(w0)[0])  # ...and the LoRA changes the image
    for a, b in zip(render(pipe, w1), fresh):
        np.testing.assert_array_equal(a, b)
    # the kohya/A1111 export loads in diffusers and gives the same images as the diffusers file
    kohya = base_pipe(paths)
    kohya.load_lora_weights(lora.dir, weight_name=lora.kohya_file, adapter_name="kohya")
    kohya.set_adapters(["kohya"], adapter_weights=[1.0])
    assert any("lora" in n for n, _ in kohya.text_encoder.named_parameters())  # the TE part loaded too
    for a, b in zip(render(kohya, w1), fresh):
        np.testing.assert_array_equal(a, b)

    # re-run: nothing to do, same table
    before = {p: os.stat(p).st_mtime_ns for p in table.path}
    assert sample_pools(cfg, paths, manifest, use_ray=False).equals(table)
    assert before == {p: os.stat(p).st_mtime_ns for p in table.path}


def test_img2img_records_init_image_and_resizes(tmp_path, trained):
    from ooc_ray.sample import sample_pools

    cfg, paths, manifest = experiment(
        tmp_path, trained, sample={"mode": "img2img", "strength": 0.5, "steps": 4, "output_size": 48,
                                   "weights": [0.8], "negative_prompt": "blurry"})
    table = sample_pools(cfg, paths, manifest, use_ray=False)
    assert len(table) == 6 and set(table["mode"]) == {"img2img"} and set(table.strength) == {0.5}
    assert set(table.negative_prompt) == {"blurry"}
    by_id = manifest.set_index("id")
    for row in table.itertuples():
        init = by_id.loc[row.init_image_id]
        assert init.label == row.label and init.fold != row.fold  # a training image of that class and fold
        assert Image.open(row.path).size == (48, 48) == (row.width, row.height)


def test_kill_midway_then_resume(tmp_path, trained, monkeypatch):
    """A worker crash mid-run leaves some PNGs; the re-run renders only the rest; no missing/duplicate rows."""
    from ooc_ray.sample import sample_pools
    from ooc_ray.sampler import FAIL_AFTER_ENV

    cfg, paths, manifest = experiment(tmp_path, trained)
    monkeypatch.setenv(FAIL_AFTER_ENV, "5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        sample_pools(cfg, paths, manifest, use_ray=False)
    done = sorted(paths.synthetic.rglob("*.png"))
    assert len(done) == 5 and not paths.synthetic_table.exists()
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.delenv(FAIL_AFTER_ENV)
    table = sample_pools(cfg, paths, manifest, use_ray=False)
    assert len(table) == 12 and not table.duplicated(["lora_key", "weight", "index"]).any()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished images were not redone
    assert sorted(map(str, paths.synthetic.rglob("*.png"))) == sorted(table.path)


# ---------------------------------------------------------------------------------------------- Ray


def test_ray_sampling_crash_resume_and_determinism(tmp_path, trained, monkeypatch):
    """run_sample through Ray Data actors: a crash inside an actor, a resume, then lost files re-rendered
    bit-identically (seeds are per image, so the actor and batch that render an image do not matter)."""
    from ooc_ray.raycluster import init_ray
    from ooc_ray.sample import run_sample
    from ooc_ray.sampler import FAIL_AFTER_ENV

    cfg, paths, _ = experiment(tmp_path, trained)
    # Ray first: a Ray started while the hook is set passes it to every worker of the session (a later test's
    # Tune trials sampled in-process and "crashed": CI of de3340d).
    init_ray(cfg)
    monkeypatch.setenv(FAIL_AFTER_ENV, "5")
    with pytest.raises(Exception, match="simulated crash"):
        run_sample(cfg, paths)
    partial = list(paths.synthetic.rglob("*.png"))
    assert 0 < len(partial) < 12 and not paths.synthetic_table.exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    table = run_sample(cfg, paths)
    assert len(table) == 12 and not table.duplicated(["lora_key", "weight", "index"]).any()
    assert pd.read_parquet(paths.synthetic_table).equals(table)
    # The images the crashed actor wrote before its batch failed (their rows never came back) keep their node and
    # cost from its render log; the logs are gone once pool.parquet records them.
    assert (table["node_id"] != "").all() and table["render_s"].notna().all(), table[["id", "node_id", "render_s"]]
    assert (table["versions"] == generator_stack()).all(), table["versions"].value_counts()  # ...and libraries
    assert not list(paths.synthetic.rglob(".rendered-*.jsonl"))

    lost = table.path.iloc[[0, 5, 11]].tolist()
    kept = {p: Path(p).read_bytes() for p in lost}
    for p in lost:
        os.remove(p)
    paths.synthetic_table.unlink()
    again = run_sample(cfg, paths)
    assert again.equals(table)
    assert all(Path(p).read_bytes() == data for p, data in kept.items())


def test_resources_reuse_new_settings_add_and_old_provenance_stays(tmp_path, trained, capsys):
    """A new batch size renders nothing; new steps sample new folders beside the old ones, whose
    pool.parquet is left as it was; synthetic.parquet holds the current pools; a damaged PNG is named and
    rendered again bit-identically."""
    from ooc_ray.sample import POOL_FILE, sample_pools

    cfg, paths, manifest = experiment(tmp_path, trained)
    table = sample_pools(cfg, paths, manifest, use_ray=False)
    pools = sorted(paths.synthetic.rglob(POOL_FILE))
    assert len(pools) == 4 * 2  # 4 LoRAs x 2 weights
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pools}
    pd.testing.assert_frame_equal(pd.concat([pd.read_parquet(p) for p in pools]).sort_values("id", ignore_index=True),
                                  table.drop(columns="sample_settings").sort_values("id", ignore_index=True),
                                  check_dtype=False)

    bigger = tiny_cfg(tmp_path, sample={"batch_size": 3, "actors": 2})
    assert sample_pools(bigger, paths, manifest, use_ray=False).equals(table)
    assert "12 re-used, 0 rendered" in capsys.readouterr().out

    more_steps = tiny_cfg(tmp_path, sample={"steps": 3})
    new = sample_pools(more_steps, paths, manifest, use_ray=False)
    assert not set(new["path"]) & set(table["path"]) and len(new) == len(table)
    assert pd.read_parquet(paths.synthetic_table).equals(new)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pools} == stamps  # old provenance untouched

    victim = Path(table["path"].iloc[2])
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a half-written file, e.g. a node lost mid-copy
    again = sample_pools(cfg, paths, manifest, use_ray=False)
    assert f"{victim} is damaged" in capsys.readouterr().out
    assert victim.read_bytes() == original and again.equals(table)


def test_a_lora_file_lacking_modules_of_its_own_config_fails_loud(tmp_path, trained):
    """peft loads what it finds and only warns about the rest: a LoRA partly applied samples plausible images
    from the wrong model (it happened: diffusers' old key format dropped every attention LoRA of a
    transformer+conv file). The sampler refuses such a file, naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ooc_ray.errors import StageError
    from ooc_ray.sampler import SampleWorker

    _, paths, _ = experiment(tmp_path, trained)
    lora = pd.read_parquet(paths.lora / "loras.parquet").iloc[0]
    whole = Path(lora.dir) / lora.file
    with safe_open(str(whole), framework="pt") as f:
        metadata = f.metadata()  # holds the LoRA config: target modules, rank, alpha
    tensors = load_file(str(whole))
    partial = {k: v for k, v in tensors.items() if ".to_q." not in k}
    assert 0 < len(partial) < len(tensors)
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=metadata)

    worker = SampleWorker(str(paths.models / "tiny_sd"), "txt2img", "euler_a", 32)
    worker._activate("whole", lora.dir, lora.file, 1.0)  # the trained file loads whole
    with pytest.raises(StageError, match="partial.safetensors does not load whole"):
        worker._activate("partial", str(tmp_path), "partial.safetensors", 1.0)


def test_ddim_with_clip_sample_bounds_the_predicted_latent(tmp_path, trained):
    """sample.clip_sample reaches the scheduler: DDIM clips its predicted clean latent to +-v, so at a small v
    the images change and their decoded latents stay inside what an unclipped run exceeds; the same settings
    give the same bytes twice, and the pool key (and so the folder) differs from the unclipped pool's."""
    import numpy as np
    import torch

    from ooc_ray import keys
    from ooc_ray.sampler import SampleWorker

    cfg, paths, _ = experiment(tmp_path, trained)
    base = str(paths.models / "tiny_sd")
    rows = pd.DataFrame({"prompt": ["a photo of good cells"] * 2, "steps": 4, "cfg": 1.0, "seed": [1, 2],
                         "negative_prompt": "", "lora_key": "x", "lora_dir": "", "lora_file": "", "weight": 0.0})
    clipped = SampleWorker(base, "txt2img", "ddim", 32, clip_sample=0.05)
    plain = SampleWorker(base, "txt2img", "ddim", 32)
    assert clipped.pipe.scheduler.config.clip_sample and clipped.pipe.scheduler.config.clip_sample_range == 0.05
    assert not plain.pipe.scheduler.config.clip_sample

    def latents(worker):
        out = worker.pipe(list(rows.prompt), num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                          output_type="latent", generator=[torch.Generator().manual_seed(s) for s in rows.seed])
        return out.images.abs().max().item()

    assert latents(clipped) <= 0.05 + 1e-6 < latents(plain)
    again = SampleWorker(base, "txt2img", "ddim", 32, clip_sample=0.05)
    for worker in (clipped, plain, again):
        worker._activate = lambda *a: None  # no LoRA: the base alone
    a, b = clipped.render(rows), again.render(rows)
    assert [np.asarray(i).tobytes() for i in a] == [np.asarray(i).tobytes() for i in b]
    assert np.asarray(a[0]).tobytes() != np.asarray(plain.render(rows)[0]).tobytes()
    ddim = tiny_cfg(tmp_path, sample={"sampler": "ddim"})
    ddim_clip = tiny_cfg(tmp_path, sample={"sampler": "ddim", "clip_sample": 0.05})
    assert keys.pool_key(ddim, "b", "w", None) != keys.pool_key(ddim_clip, "b", "w", None)


def test_a_sampling_actor_given_a_gpu_torch_cannot_use_fails_before_loading(tmp_path, trained):
    """What each Ray sampling actor runs first when sample.gpus_per_actor > 0: no usable CUDA device here."""
    from ooc_ray.errors import ResourceError
    from ooc_ray.gpu import node_name
    from ooc_ray.sampler import SampleWorker

    _, paths, _ = experiment(tmp_path, trained)
    with pytest.raises(ResourceError, match=f"sample: sample.gpus_per_actor=1: node {node_name()} was given a GPU"):
        SampleWorker(str(paths.models / "tiny_sd"), "txt2img", "euler_a", 32,
                     gpu_request="sample: sample.gpus_per_actor=1")


def test_gpu_actor_pool_grows_with_the_cluster(tmp_path):
    """With GPUs per actor the pool starts with the GPUs there are now (at least one) and may grow to one actor
    per batch as GPU nodes join; sample.actors fixes it; on CPUs one actor."""
    import ray

    from ooc_ray.raycluster import init_ray
    from ooc_ray.sampler import actor_pool_size

    cpu = tiny_cfg(tmp_path, sample={"actors": 0})
    init_ray(cpu)
    gpus_now = int(ray.cluster_resources().get("GPU", 0))
    assert actor_pool_size(cpu, 7, ray) == (1, 1)
    gpu = tiny_cfg(tmp_path, sample={"actors": 0, "gpus_per_actor": 1})
    assert actor_pool_size(gpu, 7, ray) == (max(1, min(gpus_now, 7)), 7)
    fixed = tiny_cfg(tmp_path, sample={"actors": 3, "gpus_per_actor": 1})
    assert actor_pool_size(fixed, 7, ray) == (3, 3) and actor_pool_size(fixed, 2, ray) == (2, 2)


def test_cpu_sampling_actors_share_the_largest_nodes_cores():
    """Ray gives an actor as many torch threads as CPUs it reserves (1 unless asked): a CPU-only actor sets its
    threads to the largest alive node's CPUs divided among the actors, never less than one."""
    from ooc_ray.sampler import cpus_per_cpu_actor

    class FakeRay:
        def __init__(self, *cpus, dead=()):
            self._nodes = [{"Alive": True, "Resources": {"CPU": c}} for c in cpus]
            self._nodes += [{"Alive": False, "Resources": {"CPU": c}} for c in dead]

        def nodes(self):
            return self._nodes

    assert cpus_per_cpu_actor(FakeRay(2.0), 1) == 2
    assert cpus_per_cpu_actor(FakeRay(2.0), 2) == 1
    assert cpus_per_cpu_actor(FakeRay(2.0), 3) == 1
    assert cpus_per_cpu_actor(FakeRay(4.0, 16.0, dead=(64.0,)), 3) == 5


def test_an_image_that_comes_out_nan_fails_the_stage_naming_its_lora_and_nothing_is_written(tmp_path, trained):
    """A LoRA weight so large that the UNet overflows gives NaN pixels, which the PIL conversion would cast to a
    black PNG (as an fp16 VAE does on a GPU): the stage stops, naming the LoRA, weight and image, and writes none
    of that batch. The same pools at weight 1.0 render finite images (the check is not what fails)."""
    from ooc_ray.errors import StageError
    from ooc_ray.sample import sample_pools

    cfg, paths, manifest = experiment(tmp_path, trained, sample={"weights": [1e30]})
    with pytest.raises(StageError, match=r"sample: \d of \d images of LoRA \w+ at weight 1e\+30 came out NaN "
                                         r"on cpu float32 \(e\.g\. \S+, seed \d+\); nothing written"):
        sample_pools(cfg, paths, manifest, use_ray=False)
    assert not list(paths.synthetic.rglob("*.png"))
    fine, fine_paths, _ = experiment(tmp_path / "fine", trained, sample={"weights": [1.0]})
    assert len(sample_pools(fine, fine_paths, manifest, use_ray=False)) == (2 + 1) * 2


def test_a_table_of_other_settings_is_refused_and_a_rerender_that_differs_from_its_record_too(tmp_path, trained):
    """synthetic.parquet carries the settings it was sampled with: the readers (classify, quality, report, through
    trainsets.current_synthetic) refuse it once a sampling or generator setting changed (classify and report
    used to train on and report the old pools under the new settings), not after a classifier setting changed.
    An image lost and rendered again must match its pool.parquet record, which trial keys name it by."""
    from ooc_ray.errors import MissingInputError, StageError
    from ooc_ray.fields import with_value
    from ooc_ray.sample import POOL_FILE, sample_pools
    from ooc_ray.trainsets import current_synthetic

    cfg, paths, manifest = experiment(tmp_path, trained)
    table = sample_pools(cfg, paths, manifest, use_ray=False)
    assert current_synthetic(cfg, paths).equals(table)
    assert current_synthetic(with_value(cfg, "classify.epochs", 9), paths).equals(table)
    for dotted, value in (("sample.steps", 3), ("generator.rank", 8), ("sample.weights", (1.0,))):
        with pytest.raises(MissingInputError, match="synthetic.parquet was sampled with other generator or sample "
                                                    "settings than this config's"):
            current_synthetic(with_value(cfg, dotted, value), paths)
    image = Path(table["path"].iloc[0])
    pool = image.parent / POOL_FILE
    record = pd.read_parquet(pool)
    record.loc[record["path"] == str(image), "sha256"] = "0" * 64  # as another node's rendering would have left it
    record.to_parquet(pool)
    image.unlink()
    with pytest.raises(StageError, match=rf"1 image\(s\) rendered again came out other than their pool.parquet "
                                         rf"records, e.g. {image}: sampling here does not reproduce the pool"):
        sample_pools(cfg, paths, manifest, use_ray=False)
