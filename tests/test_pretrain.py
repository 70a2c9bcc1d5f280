"""Pretrain stage: domain pretraining of the tiny base, its caching and identity, the leakage rule, and the test
that catches a broken generator (synthetic-only training beats chance on real images, and not without the LoRA)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_manifest, tiny_cfg, write_manifest, write_unlabeled
from PIL import Image

from ooc_ray.errors import ConfigError, DataError, MissingInputError
from ooc_ray.paths import ExperimentPaths

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRETRAIN = {"vae_steps": 4, "unet_steps": 4, "batch_size": 4, "cpus": 1}  # cpus: demo.yaml's 2 would wait for both


def pretrained_experiment(tmp_path: Path, n_unlabeled: int = 8, per_class=(4, 4), **pretrain):
    """A 2-class experiment (manifest written as the data stage would) with a folder of unlabeled images."""
    source = write_unlabeled(tmp_path / "unlabeled", n_unlabeled, seed=7)
    cfg = tiny_cfg(tmp_path, generator={"base": "tiny", "resolution": 32, "epochs": 1, "repeats": 1,
                                        "batch_size": 4, "rank": 4, "alpha": 4.0, "unet_lr": 1e-3,
                                        "text_encoder_lr": 0.0, "unet_modules": "transformer+conv",
                                        "pretrain": {"source": str(source), **PRETRAIN, **pretrain}})
    paths = ExperimentPaths.of(cfg)
    manifest = make_manifest(per_class, k=2, root=tmp_path)
    write_manifest(manifest, paths)
    return cfg, paths, manifest, source


def test_pretrain_config_checks_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="generator.pretrain.vae_steps: the tiny base"):
        tiny_cfg(tmp_path, generator={"base": "tiny", "pretrain": {"source": "demo", "vae_steps": 0}})
    with pytest.raises(ConfigError, match="generator.pretrain.vae_steps: generator.base 'me/sd' keeps its trained VAE"):
        tiny_cfg(tmp_path, generator={"base": "me/sd", "pretrain": {"source": "demo", "vae_steps": 10}})
    with pytest.raises(ConfigError, match="generator.pretrain.caption_dropout"):
        tiny_cfg(tmp_path, generator={"base": "tiny", "pretrain": {"source": "demo", "vae_steps": 1,
                                                                   "caption_dropout": 1.0}})


def test_pretraining_trains_once_per_content_and_its_files_are_the_identity(tmp_path, capsys):
    from ooc_ray import logs
    from ooc_ray.diffusion.base import resolve_base
    from ooc_ray.diffusion.pretrain import METADATA_FILE, generator_base
    from ooc_ray.pretrain import run_pretrain

    cfg, paths, _, source = pretrained_experiment(tmp_path)
    with pytest.raises(MissingInputError, match="run `ooc-ray pretrain` first"):
        generator_base(cfg, paths)
    logs.configure()  # the CLI's default level: progress bars shown
    folder = run_pretrain(cfg, paths)
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["n_images"] == 8 and len(meta["unet_loss_steps"]) == 4 and len(meta["vae_loss_steps"]) == 4
    # The driver's bar counted the task's 4 VAE + 4 UNet steps and showed the last UNet loss; its file is gone.
    bar = re.findall(r"pretrain: 100%\|[^|]*\| 8/8 \[[^\]]*(?:step/s|s/step), loss=([0-9.]+)\]", capsys.readouterr().err)
    assert bar and float(bar[-1]) == pytest.approx(meta["unet_loss_steps"][-1], abs=1e-4)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert meta["vae_recon_mse"] is not None
    base = generator_base(cfg, paths)
    tiny = resolve_base("tiny", paths.models)
    assert base.path == str(folder) and base.identity.startswith("pretrained-") and base.identity != tiny.identity
    # Its weights moved away from the tiny base's (VAE and UNet trained), the text encoder did not.
    from safetensors.torch import load_file
    for part, trained in (("vae", True), ("unet", True), ("text_encoder", False)):
        new = load_file(next((folder / part).glob("*.safetensors")))
        old = load_file(next((Path(tiny.path) / part).glob("*.safetensors")))
        moved = any(not np.array_equal(new[k].numpy(), old[k].numpy()) for k in old)
        assert moved == trained, part

    stamp = (folder / METADATA_FILE).stat().st_mtime_ns
    assert run_pretrain(cfg, paths) == folder  # same images, same settings: re-used, not re-trained
    assert (folder / METADATA_FILE).stat().st_mtime_ns == stamp

    # The same pretraining in another results folder (other absolute paths, other timings) gives a byte-identical
    # base: its identity seeds every LoRA key and pool seed, so two runs of one config must draw the same images.
    cfg2, paths2, _, _ = pretrained_experiment(tmp_path / "elsewhere")
    run_pretrain(cfg2, paths2)
    assert generator_base(cfg2, paths2).identity == base.identity

    # One unlabeled image's bytes change: another pretraining, another identity for every LoRA key.
    write_unlabeled(tmp_path / "other", 1, seed=99)
    shutil.copy(tmp_path / "other" / "u000.png", source / "u003.png")
    assert run_pretrain(cfg, paths) != folder
    assert generator_base(cfg, paths).identity != base.identity


def test_pretraining_refuses_labelled_images(tmp_path):
    from ooc_ray.pretrain import run_pretrain

    cfg, paths, manifest, source = pretrained_experiment(tmp_path)
    shutil.copy(manifest["path"].iloc[5], source / "renamed_copy.png")
    with pytest.raises(DataError, match=r"1 image\(s\) are also labelled images \(e.g. .*renamed_copy.png = "
                                        + manifest["id"].iloc[5]):
        run_pretrain(cfg, paths)
    assert not (paths.models / "pretrained").exists()
    # The same picture saved again as a JPEG: other bytes, still a held-out image the generator would learn.
    (source / "renamed_copy.png").unlink()
    Image.open(manifest["path"].iloc[6]).save(source / "resaved.jpg", quality=95)
    with pytest.raises(DataError, match=r"1 image\(s\) are labelled images re-encoded or resized \(e.g. "
                                        rf".*resaved.jpg ~ {manifest['file'].iloc[6]}\); pretraining on them leaks"):
        run_pretrain(cfg, paths)
    assert not (paths.models / "pretrained").exists()


def _cas(synthetic: pd.DataFrame, real: pd.DataFrame, weight: float) -> float:
    """Train a logistic regression on one pool's images (mean and std of the pixels), test on real images."""
    from sklearn.linear_model import LogisticRegression

    def feats(paths_):
        arrs = [np.asarray(Image.open(p).convert("L"), np.float32) / 255.0 for p in paths_]
        return np.array([[a.mean(), a.std()] for a in arrs])

    pool = synthetic[synthetic["weight"] == weight]
    probe = LogisticRegression().fit(feats(pool["path"]), pool["label"])
    return float(probe.score(feats(real["path"]), real["label"]))


def _mean_grey(image_paths) -> float:
    return float(np.mean([np.asarray(Image.open(p).convert("L"), np.float32).mean() for p in image_paths]))


def test_a_working_generator_teaches_a_classifier_and_one_without_its_lora_does_not(tmp_path):
    """Issue 10's broken-generator test, on the real stages (pretrain, finetune, sample): classes differ in
    brightness (dark "good", bright "bad"). With the class LoRAs, a probe trained only on a fold's synthetic
    images must classify that fold's held-out real images, and the pools must reproduce a good part of the real
    brightness gap between the classes. With the LoRAs off (weight 0.0: the pretrained base, which saw both
    classes under one caption) the class prompts alone can still order the pools (a probe scored 1.0 too in one
    run), but the gap shrinks to under half, so a sampler that dropped the LoRA fails the gap check."""
    from ooc_ray.finetune import run_finetune
    from ooc_ray.pretrain import run_pretrain
    from ooc_ray.sample import sample_pools

    cfg, paths, manifest, _ = pretrained_experiment(tmp_path, n_unlabeled=64, per_class=(12, 12), vae_steps=60,
                                                    unet_steps=120, batch_size=16)
    cfg = tiny_cfg(tmp_path, generator={**_as_dict(cfg.generator), "epochs": 10, "repeats": 2},
                   sample={"weights": [1.0, 0.0], "steps": 8, "cfg": 1.5, "resolution": 32, "batch_size": 12,
                           "actors": 1}, classify={"ratios": [1.0]})
    run_pretrain(cfg, paths)
    run_finetune(cfg, paths)
    synthetic = sample_pools(cfg, paths, manifest, use_ray=False)
    real_gap, gaps = [], {1.0: [], 0.0: []}
    for fold in (0, 1):
        pools, held_out = synthetic[synthetic["fold"] == fold], manifest[manifest["fold"] == fold]
        assert _cas(pools, held_out, 1.0) >= 0.875, fold
        real = {c: _mean_grey(held_out.loc[held_out["label"] == c, "path"]) for c in ("good", "bad")}
        real_gap.append(real["bad"] - real["good"])  # ~150 grey levels by construction
        for weight in gaps:
            pool = pools[pools["weight"] == weight]
            gaps[weight].append(_mean_grey(pool.loc[pool["label"] == "bad", "path"])
                                - _mean_grey(pool.loc[pool["label"] == "good", "path"]))
    with_lora, without_lora = np.mean(gaps[1.0]), np.mean(gaps[0.0])
    # Measured: 92 vs -32 grey levels (real 150); the CAS with LoRA 1.0 in both folds.
    assert with_lora >= 0.3 * np.mean(real_gap), (gaps, real_gap)
    assert without_lora < 0.5 * with_lora, (gaps, real_gap)


def _as_dict(section) -> dict:
    from ooc_ray.fields import to_dict

    return to_dict(section)


def test_each_pretraining_source_keeps_its_own_image_list(tmp_path):
    """pretrain_images.parquet is one file for every source an axis may name: each source's rows are its own, so
    a variant never reads another's list (the last variant's list used to serve them all, and a source changed
    since the last pretraining was read as the old one's). A source never listed, or a table from before
    sources were told apart, names what to run."""
    from ooc_ray.diffusion.pretrain import pretrain_images_of
    from ooc_ray.errors import MissingInputError
    from ooc_ray.fields import with_value
    from ooc_ray.pretrain import record_images, unlabeled_images

    cfg, paths, _, _ = pretrained_experiment(tmp_path)
    other = with_value(cfg, "generator.pretrain.source", str(write_unlabeled(tmp_path / "wells_b", 5, seed=8)))
    with pytest.raises(MissingInputError, match="run `ooc-ray pretrain` first"):
        pretrain_images_of(cfg, paths)
    lists = {}
    for config in (cfg, other):
        lists[config.generator.pretrain.source] = unlabeled_images(config, paths)
        record_images(config, paths, lists[config.generator.pretrain.source])
    for config in (cfg, other):
        pd.testing.assert_frame_equal(pretrain_images_of(config, paths), lists[config.generator.pretrain.source])
    assert len(pd.read_parquet(paths.pretrain_images)) == 8 + 5
    never = with_value(cfg, "generator.pretrain.source", str(tmp_path / "wells_c"))
    with pytest.raises(MissingInputError, match="lists no images of generator.pretrain.source .*wells_c"):
        pretrain_images_of(never, paths)
    pd.read_parquet(paths.pretrain_images).drop(columns="source_key").to_parquet(paths.pretrain_images)
    with pytest.raises(MissingInputError, match="written before each source kept its own list: run `ooc-ray pretrain`"):
        pretrain_images_of(cfg, paths)
