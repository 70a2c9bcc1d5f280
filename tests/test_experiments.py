"""Every experiment file runs end to end through the real CLI (`ooc-ray run`), shrunk to seconds-scale settings.

paper.yaml keeps its protocol (split all, weights 1.0/0.8, the full ratio list, synthetic only) and loses scale:
generated data, the tiny base, EfficientNetB0 without ImageNet weights at 32 px, and cached mode (26 exact-mode
trials cost ~3 minutes here; exact mode through Tune is tested in test_classify_grid.py)."""
import pandas as pd
import pytest

from ooc_ray.cli import main

TINY = ["data.source=demo", "data.demo.size=32", "folds.k=2", "generator.base=tiny", "generator.resolution=32",
        "generator.epochs=1", "generator.repeats=1", "generator.batch_size=4", "generator.gpus=0",
        "generator.mixed_precision=fp32", "sample.resolution=32", "sample.steps=2", "sample.gpus_per_actor=0",
        "classify.backbone=EfficientNetB0", "classify.weights=none", "classify.input_size=32",
        "classify.epochs=1", "classify.gpus_per_trial=0", "classify.cpus_per_trial=1", "ray.num_cpus=2",
        "quality.kid_subsets=2", "quality.kid_subset_size=4"]


def _run(repo, tmp_path, name, extra):
    code = main(["run", str(repo / "experiments" / f"{name}.yaml"), "-o", f"results_dir={tmp_path}",
                 *[a for o in TINY + extra for a in ("-o", o)]])
    assert code == 0
    return tmp_path / name


@pytest.mark.slow
def test_paper_protocol_smoke(repo, tmp_path):
    out = _run(repo, tmp_path, "paper", ["data.classes=[good, acceptable, bad]",
                                          "data.demo.per_class=[8, 6, 4]", "classify.mode=cached"])
    trials = pd.read_parquet(out / "trials")
    # 2 folds x (real only + 2 weights x (6 ratios - ratio 0 + synthetic only)) = 2 x 13 = 26 trials
    assert len(trials) == 26 and trials["trial_key"].is_unique
    assert set(trials["weight"].dropna()) == {1.0, 0.8}
    synthetic = pd.read_parquet(out / "synthetic.parquet")
    assert (synthetic["fold"] == -1).all()  # split "all": one pool per class shared by the folds
    report = (out / "report" / "report.md").read_text()
    assert "generator protocol: **all**" in report and "LoRA weight 0.8" in report


@pytest.mark.slow
def test_demo_smoke(repo, tmp_path):
    out = _run(repo, tmp_path, "demo", ["data.demo.per_class=[8, 6, 4]", "folds.k=2"])
    trials = pd.read_parquet(out / "trials")
    # 2 folds x (real only + 2 weights x (ratios 0.5, 1.0 + synthetic only)) = 14
    assert len(trials) == 14
    assert (out / "report" / "accuracy_vs_ratio.png").exists()
    assert (out / "quality.parquet").exists() and (out / "report" / "real_vs_synthetic.png").exists()
