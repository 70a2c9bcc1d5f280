"""LoRA hyperparameter search: subset selection, one scored trial, and the Ray Tune + Optuna loop."""
import pandas as pd
import pytest

from ooc_ray.classify.model import with_backbone_weights
from ooc_ray.config import ConfigError, load_config
from ooc_ray.data import load_manifest, run_data
from ooc_ray.paths import ExperimentPaths
from ooc_ray.search import run_search, run_search_trial, search_subset

PARAMS = {"rank": 2, "alpha": 2.0, "unet_lr": 1e-3, "text_encoder_lr": 1e-5, "epochs": 1, "repeats": 1,
          "weight": 0.9}


@pytest.fixture(scope="module")
def experiment(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg = load_config(repo / "experiments" / "lora_search.yaml", [
        f"results_dir={out}", "data.demo.per_class=[8, 6, 6]", "data.demo.size=32", "generator.resolution=32",
        "sample.resolution=32", "sample.steps=2", "classify.input_size=32", "search.images_per_class=3",
        "search.num_samples=2", "search.epochs=[1, 1]", "search.repeats=[1, 1]", "ray.num_cpus=2",
    ])
    paths = ExperimentPaths.of(cfg)
    cfg = with_backbone_weights(cfg, paths, run_data(cfg, paths))  # "calibrated" -> a weights file
    return cfg, paths


def test_subset_comes_from_training_folds_only(experiment):
    cfg, paths = experiment
    manifest = load_manifest(paths)
    subset, test = search_subset(manifest, cfg)
    assert subset.groupby("label").size().le(3).all() and set(subset["label"]) == set(manifest["label"])
    assert not set(subset["id"]) & set(test["id"])
    assert (test["fold"] == cfg.search.fold).all()
    with pytest.raises(ConfigError, match="search.fold"):
        search_subset(manifest, cfg.__class__(**{**cfg.__dict__, "search": cfg.search.__class__(fold=7)}))


def test_one_trial_scores_and_is_cached(experiment):
    from ooc_ray.tiny_sd import resolve_base

    cfg, paths = experiment
    base = resolve_base(cfg.generator.base, paths.models)
    row = run_search_trial(PARAMS, cfg, str(paths.root), base)
    assert 0.0 <= row["cas"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0 and row["score"] == row["cas"]
    assert row["rank"] == 2 and row["weight"] == 0.9
    files = list((paths.search / "trials").glob("*.parquet"))
    assert len(files) == 1
    again = run_search_trial(PARAMS, cfg, str(paths.root), base)  # same point: read back, not retrained
    assert again["duration_s"] == row["duration_s"]


@pytest.mark.slow
def test_tune_optuna_search(experiment):
    cfg, paths = experiment
    results = run_search(cfg, paths)
    assert len(results) >= 2 and results["score"].is_monotonic_decreasing
    assert (paths.search / "best.json").exists()
    assert set(pd.read_parquet(paths.search / "results.parquet")["search_key"]) == set(results["search_key"])
