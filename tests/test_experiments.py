"""Every experiment file runs end to end through the real CLI (`ooc-ray run --tiny`): its own settings, shrunk
by config.TINY and the file's `tiny:` section. A new file in experiments/ is picked up here; one without a
`tiny:` section fails (tiny mode refuses it).

paper.yaml keeps its protocol (split all, weights 1.0/0.8, ratios, synthetic only) and loses scale (three of
its six ratios); exact mode through Tune is tested in test_classify_grid.py."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from ooc_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def check_paper(out: Path) -> None:
    trials = pd.read_parquet(out / "trials")
    # tiny: 2 folds x (real only + 2 weights x (ratios 0.1 and 1.0 + synthetic only)) = 2 x 7 = 14 trials
    assert len(trials) == 14 and trials["trial_key"].is_unique
    assert set(trials["ratio"]) == {0.0, 0.1, 1.0} and trials["synthetic_only"].sum() == 4
    assert set(trials["weight"].dropna()) == {1.0, 0.8}
    synthetic = pd.read_parquet(out / "synthetic.parquet")
    assert (synthetic["fold"] == -1).all()  # split "all": one pool per class shared by the folds
    report = (out / "report" / "report.md").read_text()
    assert "generator protocol: **all**" in report and "LoRA weight 0.8" in report


def check_demo(out: Path) -> None:
    trials = pd.read_parquet(out / "trials")
    # tiny: 2 folds x (real only + 1 weight x (ratio 1.0 + synthetic only)) = 6, SmallCNN from scratch
    assert len(trials) == 6 and set(trials["backbone"]) == {"SmallCNN"}
    assert (out / "report" / "accuracy_vs_ratio.png").exists()
    assert (out / "quality.parquet").exists() and (out / "report" / "real_vs_synthetic.png").exists()
    # Sampled from the domain-pretrained base (generator.pretrain: demo), never from the untrained tiny one.
    synthetic = pd.read_parquet(out / "synthetic.parquet")
    assert synthetic["base_model"].str.startswith("pretrained-").all()
    assert len(pd.read_parquet(out / "pretrain_images.parquet")) == 24  # tiny: generator.pretrain.demo_images


def check_lora_search(out: Path) -> None:
    results = pd.read_parquet(out / "search" / "results.parquet")
    assert len(results) == 2 and results["score"].is_monotonic_decreasing  # tiny: search.num_samples 2
    best = json.loads((out / "search" / "best.json").read_text())
    assert best["score"] == results["score"].iloc[0]
    assert best["spread"]["n_trials"] == 2 and best["spread"]["max"] == results["score"].max()
    assert best["spread"]["min"] == results["score"].min()
    # Confirmed on the other fold (tiny: k = 2) against the config's own settings, one row per (fold, settings).
    confirm = pd.read_parquet(out / "search" / "confirm.parquet").set_index("settings")
    assert best["confirm"]["folds"] == [1] and sorted(confirm.index) == ["best", "default"]
    assert best["confirm"]["best_mean"] == confirm.loc["best", "score"]
    assert best["confirm"]["default_mean"] == confirm.loc["default", "score"]
    gain = confirm.loc["best", "score"] - confirm.loc["default", "score"]  # objective cas: higher is better
    assert best["confirm"]["gain_mean"] == pytest.approx(gain)
    assert best["confirm"]["best_better_folds"] == int(gain > 0)
    # Every search trial in MLflow (the embedded SQLite store), with its point and its own Parquet file.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("lora_search").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    logged = {r.data.metrics["score"]: r for r in runs}
    for row in results.itertuples():
        run = logged[row.score]
        assert int(run.data.params["rank"]) == row.rank
        assert [f.path for f in client.list_artifacts(run.info.run_id, "trials")] == [f"trials/{row.search_key}.parquet"]


def check_pipeline(out: Path) -> None:
    assert len(pd.read_parquet(out / "trials")) > 0 and (out / "report" / "report.md").exists()


def check_pbc(out: Path) -> None:
    manifest = pd.read_parquet(out / "manifest.parquet")
    # The real images of ../shared/data, 4 per class in tiny mode, hashed like any other data set.
    assert len(manifest) == 16 and manifest["path"].str.contains("pbc_blood_cells").all()
    assert sorted(manifest["label"].unique()) == ["eosinophil", "lymphocyte", "neutrophil", "platelet"]
    check_pipeline(out)


CHECKS = {"paper": check_paper, "demo": check_demo, "lora_search": check_lora_search, "pbc_blood_cells": check_pbc}
COMMANDS = {"lora_search": "search"}  # what each file is for; `run` unless named here


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_tiny(name, tmp_path, capsys):
    if name == "pbc_blood_cells" and not (REPO.parent / "shared" / "data" / "pbc_blood_cells").is_dir():
        pytest.skip("../shared/data/pbc_blood_cells is absent (it is never committed)")
    command = COMMANDS.get(name, "run")
    extra = ["-o", "tracking.mlflow=true"] if name == "lora_search" else []  # its trials logged to MLflow
    code = main([command, str(REPO / "experiments" / f"{name}.yaml"), "--tiny", "-o", f"results_dir={tmp_path}",
                 *extra])
    assert code == 0
    CHECKS.get(name, check_pipeline)(tmp_path / name)
    if command == "run":
        check_progress(tmp_path / name, capsys.readouterr().err)


def final_bar(err: str, what: str) -> tuple[int, int, str]:
    """(done, total, unit) of the last state of tqdm bar `what` in the captured stderr."""
    states = re.findall(rf"{what}: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^\]]*?([a-zA-Z]+)/s\]", err)
    states += re.findall(rf"{what}: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^\]]*?s/([a-zA-Z]+)\]", err)
    assert states, f"no progress bar for {what} in stderr"
    done, total, unit = max(states, key=lambda s: int(s[0]))
    return int(done), int(total), unit


def check_progress(out: Path, err: str) -> None:
    """Finetune, sample and classify each showed a bar that counted every LoRA, image and trial it made."""
    assert final_bar(err, "finetune") == (n := len(pd.read_parquet(out / "lora" / "loras.parquet")), n, "LoRA")
    assert final_bar(err, "sample") == (n := len(pd.read_parquet(out / "synthetic.parquet")), n, "image")
    assert final_bar(err, "classify") == (n := len(pd.read_parquet(out / "trials")), n, "trial")


def test_a_file_without_tiny_overrides_is_refused(tmp_path, capsys):
    path = tmp_path / "new.yaml"
    path.write_text("classify:\n  epochs: 3\n")
    assert main(["run", str(path), "--tiny", "-o", f"results_dir={tmp_path}"]) == 2
    assert "no `tiny:` mapping" in capsys.readouterr().err


@pytest.mark.slow
def test_repeated_cross_validation_runs_every_stage_per_repeat_and_fold(tmp_path):
    """folds.repeats: 2 on the demo (tiny: k = 2): LoRAs, pools and trials per (repeat, fold), fold ids 0-3,
    and a report whose tests pair all four folds."""
    code = main(["run", str(REPO / "experiments" / "demo.yaml"), "--tiny", "-o", f"results_dir={tmp_path}",
                 "-o", "folds.repeats=2"])
    assert code == 0
    out = tmp_path / "demo"
    folds = pd.read_parquet(out / "folds.parquet")
    assert list(folds.columns) == ["id", "fold", "fold_r1"]
    trials = pd.read_parquet(out / "trials")
    assert sorted(trials["fold"].unique()) == [0, 1, 2, 3] and len(trials) == 12  # 2 x the tiny grid's 6
    for fold in range(4):  # each trial was tested on its own (repeat, fold)'s held-out images
        column, within = ("fold", fold) if fold < 2 else ("fold_r1", fold - 2)
        held = set(folds.loc[folds[column] == within, "id"])
        for key in trials.loc[trials["fold"] == fold, "trial_key"]:
            assert set(pd.read_parquet(out / "predictions" / f"{key}.parquet")["id"]) == held
    loras = pd.read_parquet(out / "lora" / "loras.parquet")
    assert sorted(loras["fold"].unique()) == [0, 1, 2, 3]  # leak-free: one LoRA set per (repeat, fold)
    report = (out / "report" / "report.md").read_text()
    assert "2-fold CV, 2 repeats (4 folds)" in report and "| real only | 4 |" in report
