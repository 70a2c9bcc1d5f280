"""LoRA hyperparameter search: subset selection and one scored trial (the Ray Tune + Optuna loop runs in
test_experiments.py, as `ooc-ray search experiments/lora_search.yaml --tiny`)."""
import pandas as pd
import pytest

from ooc_ray.backbones import backbone_weights
from ooc_ray.load import load_config
from ooc_ray.data import load_manifest, run_data
from ooc_ray.diffusion.base import resolve_base
from ooc_ray.errors import ConfigError
from ooc_ray.paths import ExperimentPaths
from ooc_ray.search import run_search_trial, search_subset

PARAMS = {"rank": 2, "alpha": 2.0, "unet_lr": 1e-3, "text_encoder_lr": 1e-5, "epochs": 1, "repeats": 1,
          "weight": 0.9}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def experiment(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg = load_config(repo / "experiments" / "lora_search.yaml", [f"results_dir={out}"], tiny=True)
    paths = ExperimentPaths.of(cfg)
    manifest = run_data(cfg, paths)
    return cfg, paths, backbone_weights(cfg.classify, paths.models, manifest), resolve_base("tiny", paths.models)


def test_subset_comes_from_training_folds_only(experiment):
    cfg, paths, _, _ = experiment
    manifest = load_manifest(paths)
    subset, test = search_subset(manifest, cfg.search)
    assert subset.groupby("label").size().le(3).all() and set(subset["label"]) == set(manifest["label"])
    assert not set(subset["id"]) & set(test["id"])
    assert (test["fold"] == cfg.search.fold).all()
    with pytest.raises(ConfigError, match="search.fold"):
        search_subset(manifest, cfg.search.__class__(fold=7))


def test_one_trial_scores_and_is_cached(experiment):
    cfg, paths, weights, base = experiment
    row = run_search_trial(PARAMS, cfg, paths, base, weights)
    assert 0.0 <= row["cas"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0 and row["score"] == row["cas"]
    assert row["rank"] == 2 and row["weight"] == 0.9
    files = list((paths.search / "trials").glob("*.parquet"))
    assert len(files) == 1
    again = run_search_trial(PARAMS, cfg, paths, base, weights)  # same point: read back, not retrained
    assert again["duration_s"] == row["duration_s"]
    # the trial sampled with sample.* as configured (img2img is no longer silently txt2img)
    synthetic = pd.concat([pd.read_parquet(p) for p in (paths.search / "synthetic").rglob("pool.parquet")])
    assert set(synthetic["mode"]) == {"txt2img"} and set(synthetic["steps"]) == {cfg.sample.steps}
    img2img = cfg.__class__(**{**cfg.__dict__, "sample": cfg.sample.__class__(
        **{**cfg.sample.__dict__, "mode": "img2img", "strength": 0.5})})
    other = run_search_trial(PARAMS, img2img, paths, base, weights)
    assert other["search_key"] != row["search_key"]
    pools = pd.concat([pd.read_parquet(p) for p in (paths.search / "synthetic").rglob("pool.parquet")])
    assert set(pools["mode"]) == {"txt2img", "img2img"} and set(pools["strength"]) == {1.0, 0.5}
