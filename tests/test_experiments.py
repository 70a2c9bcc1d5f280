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

from helpers import seed_trained_state

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
    # Each LoRA task ran on the thread it reserved (generator.cpus 1), whichever of Ray's reused workers it landed
    # in: one in the 2-CPU pretraining's worker too (tests/test_finetune.py says why).
    assert [json.loads(p.read_text())["torch_threads"] for p in (out / "lora").glob("*/metadata.json")] == [1] * 6
    # Predictions name each held-out image as the data source does, never by an absolute path.
    predictions, manifest = pd.read_parquet(out / "predictions"), pd.read_parquet(out / "manifest.parquet")
    assert set(predictions["file"]) == set(manifest["file"]) and not predictions["file"].str.startswith("/").any()
    check_schema_page(out)
    check_mlflow_experiment(out)


def check_mlflow_experiment(out: Path) -> None:
    """tracking.mlflow (on for the demo's run): one parent run for the experiment with config.yaml and report.html,
    and under it a run per pretrained base and per LoRA (settings, loss curves, key) and per classifier trial,
    with no Tune bookkeeping among the trials' metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["ooc_ray.stage"], []).append(run)
    (parent,) = by_stage["experiment"]
    assert parent.info.status == "FINISHED" and parent.data.params["classify.backbone"] == "SmallCNN"
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["config.yaml", "report.html"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["ooc_ray.stage"] for r in children) == sorted(
        [s for s in by_stage if s != "experiment" for _ in by_stage[s]])  # every other run is the parent's child
    (pretrain,) = by_stage["pretrain"]
    meta = json.loads(next((out / "models" / "pretrained").glob("*/ooc_ray_pretrain.json")).read_text())
    losses = [m.value for m in client.get_metric_history(pretrain.info.run_id, "unet_loss")]
    assert pretrain.data.tags["ooc_ray.trial"] == meta["key"] and losses == pytest.approx(meta["unet_loss_steps"])
    loras = pd.read_parquet(out / "lora" / "loras.parquet")
    assert sorted(r.data.tags["ooc_ray.trial"] for r in by_stage["finetune"]) == sorted(loras["lora_key"])
    for run in by_stage["finetune"]:
        lora = json.loads((out / "lora" / run.data.tags["ooc_ray.trial"] / "metadata.json").read_text())
        assert int(run.data.params["rank"]) == lora["config"]["rank"] and run.data.params["label"] == lora["label"]
        assert run.data.metrics["final_loss"] == pytest.approx(lora["final_loss"])
    trials = pd.read_parquet(out / "trials")
    assert sorted(r.data.tags["ooc_ray.trial"] for r in by_stage["classify"]) == sorted(trials["trial_key"])
    for run in by_stage["classify"]:
        assert not {"pid", "timestamp", "training_iteration", "time_total_s"} & set(run.data.metrics)
        assert {"loss", "test_accuracy"} <= set(run.data.metrics)


def check_schema_page(out: Path, per_file: dict[str, str] | None = None, ignore: set[str] = frozenset()) -> None:
    """Every column of every Parquet file the run wrote is in docs/results-schema.md, under its file's heading
    (`per_file`: heading -> file or folder; the pipeline's files by default)."""
    import pyarrow.parquet as pq

    page = (REPO / "docs" / "results-schema.md").read_text()
    documented = {}
    for section in page.split("\n## ")[1:]:
        name = section.split("`")[1]
        documented[name] = set(re.findall(r"^\| ([\w&;<>, .]+?) \|", section, re.M)) - {"column"}
    per_file = per_file or {"manifest.parquet": "manifest.parquet", "folds.parquet": "folds.parquet",
                "pretrain_images.parquet": "pretrain_images.parquet", "lora/loras.parquet": "lora/loras.parquet",
                "synthetic.parquet": "synthetic.parquet", "quality.parquet": "quality.parquet",
                "synthetic_scores.parquet": "synthetic_scores.parquet", "trials/<trial_key>.parquet": "trials",
                "history/<trial_key>.parquet": "history", "predictions/<trial_key>.parquet": "predictions"}
    for heading, found in per_file.items():
        files = sorted((out / found).glob("*.parquet")) if (out / found).is_dir() else [out / found]
        assert files, found
        columns = set(pq.read_schema(files[0]).names)
        missing = {c for c in columns if c not in documented[heading] | ignore and not c.startswith("prob_")}
        assert not missing, f"docs/results-schema.md, {heading}: columns not documented: {sorted(missing)}"


def check_lora_search(out: Path) -> None:
    results = pd.read_parquet(out / "search" / "results.parquet")
    # tiny: 2 trials of 1 or 2 epochs on fold 0 (k = 2: fold 1 is the confirmation's), reporting every epoch,
    # under ASHA (it may stop one at epoch 1); complete ones first, each group best first (objective cas)
    assert len(results) == 2 and (results["folds"].map(list) == [[0]] * 2).all()
    assert results["complete"].iloc[0] and (results["complete"] | (results["epochs_trained"] < results["generator.epochs"])).all()
    assert results["complete"].is_monotonic_decreasing
    best = json.loads((out / "search" / "best.json").read_text())
    assert best["stopped_early"] == (~results["complete"]).sum()
    assert best["score"] == results["score"].iloc[0]
    assert best["point"] == {name: results[name].iloc[0] for name in ("generator.unet_lr", "generator.rank",
                                                                        "generator.epochs")}
    complete = results[results["complete"]]
    assert complete["score"].is_monotonic_decreasing and best["spread"]["n_trials"] == len(complete)
    assert best["spread"]["max"] == complete["score"].max() and best["spread"]["min"] == complete["score"].min()
    # Confirmed on the other fold against the config's own settings, one row per (fold, settings).
    confirm = pd.read_parquet(out / "search" / "confirm.parquet").set_index("settings")
    assert best["confirm"]["folds"] == [1] and sorted(confirm.index) == ["best", "default"]
    assert best["confirm"]["best_mean"] == confirm.loc["best", "score"]
    assert best["confirm"]["default_mean"] == confirm.loc["default", "score"]
    gain = confirm.loc["best", "score"] - confirm.loc["default", "score"]  # objective cas: higher is better
    assert best["confirm"]["gain_mean"] == pytest.approx(gain)
    assert best["confirm"]["best_better_folds"] == int(gain > 0)
    assert best["confirm"]["verdict"] == "undefined (fewer than 2 paired folds)"  # one confirmation fold at k = 2
    # Images per LoRA, in the search (its subsets) and in the grid best.yaml runs (each fold's training images),
    # counted here from the manifest and folds: best.yaml says how many times the search's steps the grid takes.
    manifest = pd.read_parquet(out / "manifest.parquet").merge(pd.read_parquet(out / "folds.parquet"), on="id")
    per_fold = [manifest[manifest["fold"] != f].groupby("label").size() for f in sorted(manifest["fold"].unique())]
    grid = [int(min(s.min() for s in per_fold)), int(max(s.max() for s in per_fold))]
    searched = [int(per_fold[0].clip(upper=cfg_images_per_class(out)).min()),
                int(per_fold[0].clip(upper=cfg_images_per_class(out)).max())]
    assert best["lora_images"] == {"search": searched, "grid": grid}
    said = f"# the search trained each LoRA on {searched[0]}-{searched[1]} images (search.images_per_class)"
    assert (said in (out / "search" / "best.yaml").read_text()) == (grid[1] > searched[1])
    space = {name for name in results.columns if name.startswith(("generator.", "sample."))}  # the point's columns
    assert space == {"generator.unet_lr", "generator.rank", "generator.epochs"}
    check_schema_page(out, {"search/trials/<search_key>.parquet": "search/trials",
                            "search/confirm.parquet": "search/confirm.parquet"}, ignore=space)
    # Every search trial in MLflow (the embedded SQLite store), with its point and its own Parquet file.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("lora_search").experiment_id],
                              "tags.`ooc_ray.stage` = 'search'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    logged = {r.data.metrics["score"]: r for r in runs}
    for row in results.itertuples():
        run = logged[row.score]
        assert int(run.data.params["generator.rank"]) == results.loc[row.Index, "generator.rank"]
        assert {"epochs_trained", "score", "cas", "kid"} <= set(run.data.metrics)  # score_se: NaN with one fold, not logged
        assert [f.path for f in client.list_artifacts(run.info.run_id, "trials")] == [f"trials/{row.search_key}.parquet"]


def cfg_images_per_class(out: Path) -> int:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["search"]["images_per_class"]


def check_pipeline(out: Path) -> None:
    assert len(pd.read_parquet(out / "trials")) > 0 and (out / "report" / "report.md").exists()


def check_pbc(out: Path) -> None:
    manifest = pd.read_parquet(out / "manifest.parquet")
    # The real images of ../shared/data, 4 per class in tiny mode, hashed like any other data set.
    assert len(manifest) == 16 and manifest["path"].str.contains("pbc_blood_cells").all()
    assert sorted(manifest["label"].unique()) == ["eosinophil", "lymphocyte", "neutrophil", "platelet"]
    check_pipeline(out)


def variant_tables(out: Path, name: str) -> dict[str, pd.DataFrame]:
    """variants/<tag>/<name> of every variant, by tag."""
    return {d.name: pd.read_parquet(d / name) for d in sorted((out / "variants").iterdir())}


def check_axes_report(out: Path, tags: list[str], axis: str | None) -> pd.DataFrame:
    """One section and one table per variant, the axis plot, summary.csv with a row set per variant."""
    report = (out / "report" / "report.md").read_text()
    summary = pd.read_csv(out / "report" / "summary.csv", keep_default_na=False)
    assert sorted(summary["variant"].unique()) == sorted(tags)
    for tag in tags:
        assert (out / "report" / f"table_{tag}__w1.md").exists() and (out / "report" / f"{tag}__accuracy_vs_ratio.png").exists()
    if axis:
        assert f"![accuracy against {axis}](axis_{axis.replace('.', '-')}.png)" in report
    assert "| verdict |" in report and "cost s (LoRA + sampling + trials)" in report
    return summary


def check_axis_guidance(out: Path) -> None:
    synthetic = variant_tables(out, "synthetic.parquet")
    assert list(synthetic) == ["sample.cfg=1", "sample.cfg=2", "sample.cfg=7"]
    assert [float(t["cfg"].unique()[0]) for t in synthetic.values()] == [1.0, 2.0, 7.0]
    # Guidance is a sampling setting: the same LoRAs, three pools of them.
    assert len({frozenset(t["lora_key"]) for t in synthetic.values()}) == 1
    assert len({frozenset(t["sample_key"]) for t in synthetic.values()}) == 3
    assert len({frozenset(t["sha256"]) for t in synthetic.values()}) == 3
    trials = pd.read_parquet(out / "trials")
    # tiny: 2 folds x (real only, shared by the three values, + real + 100 % per value)
    assert len(trials) == 8 and (trials["ratio"] == 0).sum() == 2
    check_axes_report(out, list(synthetic), "sample.cfg")


def check_axis_img2img(out: Path) -> None:
    synthetic = variant_tables(out, "synthetic.parquet")
    assert [t["strength"].unique().tolist() for t in synthetic.values()] == [[0.5], [1.0]]
    manifest, folds = pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "folds.parquet")
    held = dict(zip(folds["id"], folds["fold"]))
    for table in synthetic.values():  # img2img starts from the LoRA's own training images, never held-out ones
        assert (table["mode"] == "img2img").all() and table["init_image_id"].isin(manifest["id"]).all()
        assert all(held[i] != f for i, f in zip(table["init_image_id"], table["fold"]))
    check_axes_report(out, list(synthetic), "sample.strength")


def check_axis_sampling(out: Path) -> None:
    synthetic = variant_tables(out, "synthetic.parquet")
    assert sorted(synthetic) == ["sample.steps=2__sample.mode=img2img", "sample.steps=2__sample.mode=txt2img",
                                 "sample.steps=4__sample.mode=img2img", "sample.steps=4__sample.mode=txt2img"]
    for tag, table in synthetic.items():
        steps, mode = (part.split("=")[1] for part in tag.split("__"))
        assert (table["steps"] == int(steps)).all() and (table["mode"] == mode).all()
        assert (table["init_image_id"] != "").all() == (mode == "img2img")
    assert len({frozenset(t["sha256"]) for t in synthetic.values()}) == 4  # four pools, the same LoRAs
    assert len({frozenset(t["lora_key"]) for t in synthetic.values()}) == 1
    check_axes_report(out, list(synthetic), "sample.steps")
    assert sorted(p.name for p in (out / "report").glob("axis_*.png")) == ["axis_sample-mode.png", "axis_sample-steps.png"]


def check_axis_lora(out: Path) -> None:
    loras = variant_tables(out, "loras.parquet")
    assert list(loras) == ["generator.rank=2", "generator.rank=8"] and not set(loras["generator.rank=2"]["lora_key"]) & set(
        loras["generator.rank=8"]["lora_key"])
    for tag, rank in (("generator.rank=2", 2), ("generator.rank=8", 8)):
        for key in loras[tag]["lora_key"]:
            meta = json.loads((out / "lora" / key / "metadata.json").read_text())
            assert meta["config"]["rank"] == rank
    check_axes_report(out, list(loras), "generator.rank")


def check_axis_base(out: Path) -> None:
    synthetic = variant_tables(out, "synthetic.parquet")
    bases = [t["base_model"].unique().tolist() for t in synthetic.values()]
    assert len(bases) == 2 and all(len(b) == 1 and b[0].startswith("pretrained-") for b in bases) and bases[0] != bases[1]
    check_axes_report(out, list(synthetic), "generator.pretrain.unet_steps")


def check_axis_lora_scope(out: Path) -> None:
    loras = variant_tables(out, "loras.parquet")
    assert list(loras) == ["generator.scope=class", "generator.scope=dataset"]
    assert len(loras["generator.scope=class"]) == 2 * 3 and len(loras["generator.scope=dataset"]) == 2  # tiny: k = 2
    assert (loras["generator.scope=dataset"]["label"] == "").all()
    synthetic = variant_tables(out, "synthetic.parquet")
    whole, per_class = synthetic["generator.scope=dataset"], synthetic["generator.scope=class"]
    # The data-set LoRA draws every class, each with its own prompt, as many images as the class LoRAs do.
    assert set(whole["lora_key"]) == set(loras["generator.scope=dataset"]["lora_key"])
    assert whole.groupby(["fold", "label"]).size().equals(per_class.groupby(["fold", "label"]).size())
    assert (whole["prompt"] == whole["label"].map("a microscopy image of {} organ on chip cells".format)).all()
    assert whole["id"].is_unique and whole["seed"].is_unique
    check_axes_report(out, list(synthetic), "generator.scope")


def check_mixing(out: Path) -> None:
    trials = pd.read_parquet(out / "trials")
    mixed = trials[(trials["ratio"] == 1.0) & (trials["control"] == "")]
    assert sorted(mixed["mixing"].unique()) == ["concat", "loss_weighted", "replace", "split_bn"]
    assert (trials["ratio"] == 0).sum() == 2  # real only: once per fold, shared by the four strategies
    steps = trials[trials["control"] == "real_steps"].set_index("fold")
    augmented = trials[trials["control"] == "real_augmented"].set_index("fold")
    concat = mixed[mixed["mixing"] == "concat"].set_index("fold")
    # The controls see as many training images as the arm they control, none of them synthetic.
    assert (steps["n_train_real"] == concat["n_train_real"] + concat["n_train_synthetic"]).all()
    assert (augmented["n_train_augmented"] == concat["n_train_synthetic"]).all()
    assert (steps["n_train_synthetic"] == 0).all() and (augmented["n_train_synthetic"] == 0).all()
    assert len(list((out / "augmented").glob("*.png"))) > 0
    summary = check_axes_report(out, [f"classify.mixing={m}" for m in ("concat", "loss_weighted", "replace", "split_bn")],
                                "classify.mixing")
    assert {"real only, steps of + 100%", "real + 100% classic augmentation"} <= set(summary["arm"])


def check_replicates(out: Path) -> None:
    synthetic = variant_tables(out, "synthetic.parquet")
    assert list(synthetic) == ["replicate=0", "replicate=1"]
    # Independent pools: other seeds, other images, the same LoRAs.
    assert not set(synthetic["replicate=0"]["seed"]) & set(synthetic["replicate=1"]["seed"])
    assert not set(synthetic["replicate=0"]["sha256"]) & set(synthetic["replicate=1"]["sha256"])
    assert set(synthetic["replicate=0"]["lora_key"]) == set(synthetic["replicate=1"]["lora_key"])
    trials = pd.read_parquet(out / "trials")
    arm = trials[trials["ratio"] == 2.0]  # beyond 100 %: twice the real training set, in synthetic images
    assert len(arm) == 4 and (arm["n_train_synthetic"] == 2 * arm["n_train_real"]).all()
    check_axes_report(out, list(synthetic), None)
    replicates = (out / "report" / "replicates.md").read_text()
    assert "| real + 200% synthetic | 1 | 2 |" in replicates and "Generator randomness" in (out / "report" / "report.md").read_text()


def check_real_fractions(out: Path) -> None:
    """tiny: fractions 0.5 and 1.0 of each training fold. Each half LoRA learns from part of the whole fold's
    images of its (fold, class); trials are tested on the same held-out images; the report states the worth."""
    loras = variant_tables(out, "loras.parquet")
    assert list(loras) == ["classify.real_fraction=0.5", "classify.real_fraction=1"]
    half, whole = (loras[tag].set_index(["fold", "label"]) for tag in loras)

    def images(key):
        return set(json.loads((out / "lora" / key / "metadata.json").read_text())["image_ids"])
    for (fold, label), row in half.iterrows():
        assert images(row["lora_key"]) < images(whole.loc[(fold, label), "lora_key"])
    trials = pd.read_parquet(out / "trials")
    real = trials[trials["ratio"] == 0].set_index("fold").sort_values("n_train_real")
    assert len(real) == 4 and (real.groupby("fold")["n_test"].nunique() == 1).all()  # the same held-out images
    assert (real.groupby("fold")["n_train_real"].agg(["min", "max"]).eval("min < max")).all()
    worth = pd.read_csv(out / "report" / "real_equivalence.csv")
    assert sorted(worth["classify.real_fraction"]) == [0.5, 1.0] and (worth["arm_id"] == "real+100%@w1").all()
    assert worth["statement"].str.match(r"1 synthetic image = |not estimable \(").all()
    report = (out / "report" / "report.md").read_text()
    assert "## What a synthetic image is worth in real images" in report and (out / "report" / "real_size.png").exists()
    assert "## Which quality measure predicted usefulness" in report  # quality on: 2 fractions x 2 folds = 4 pools
    check_axes_report(out, list(loras), "classify.real_fraction")


CHECKS = {"paper": check_paper, "demo": check_demo, "lora_search": check_lora_search, "pbc_blood_cells": check_pbc,
          "axis_guidance": check_axis_guidance, "axis_img2img": check_axis_img2img, "axis_lora": check_axis_lora,
          "axis_base": check_axis_base, "axis_lora_scope": check_axis_lora_scope, "axis_sampling": check_axis_sampling,
          "mixing": check_mixing, "real_fractions": check_real_fractions,
          "replicates": check_replicates}
COMMANDS = {"lora_search": "search"}  # what each file is for; `run` unless named here


def extends_small_cpu(name: str) -> bool:
    return "extends: base/small_cpu.yaml" in (REPO / "experiments" / f"{name}.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_tiny(name, tmp_path, capsys, request):
    if name == "pbc_blood_cells" and not (REPO.parent / "shared" / "data" / "pbc_blood_cells").is_dir():
        pytest.skip("../shared/data/pbc_blood_cells is absent (it is never committed)")
    if extends_small_cpu(name):  # the shared base's trained state, built once per session (conftest)
        seed_trained_state(request.getfixturevalue("trained_small_cpu"), tmp_path / name)
    command = COMMANDS.get(name, "run")
    extra = ["-o", "tracking.mlflow=true"] if name in ("lora_search", "demo") else []  # runs logged to MLflow
    code = main([command, str(REPO / "experiments" / f"{name}.yaml"), "--tiny", "-o", f"results_dir={tmp_path}",
                 *extra])
    assert code == 0
    CHECKS.get(name, check_pipeline)(tmp_path / name)
    if command == "run" and not (tmp_path / name / "variants").exists():  # one bar per stage without variants
        check_progress(tmp_path / name, capsys.readouterr().err)
    if name == "axis_guidance":  # a second run of a grid with axes re-uses every variant's LoRAs, pools and trials
        capsys.readouterr()
        assert main([command, str(REPO / "experiments" / f"{name}.yaml"), "--tiny", "-o", f"results_dir={tmp_path}"]) == 0
        out = capsys.readouterr().out
        assert out.count("0 trained") == 3 and out.count("0 rendered") == 3 and "8 re-used, 0 to run" in out


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
def test_repeated_cross_validation_runs_every_stage_per_repeat_and_fold(tmp_path, trained_small_cpu):
    """folds.repeats: 2 on the CPU examples' base (tiny: k = 2): LoRAs, pools and trials per (repeat, fold), fold
    ids 0-3, and a report whose tests pair all four folds. Repeat 0 keeps every key, so the session's trained
    base, LoRAs and pools (conftest) are repeat 0's; repeat 1 trains its own."""
    out = tmp_path / "small_cpu"
    seed_trained_state(trained_small_cpu, out)
    loras_before = set(pd.read_parquet(trained_small_cpu / "lora" / "loras.parquet")["lora_key"])
    code = main(["run", str(REPO / "experiments" / "base" / "small_cpu.yaml"), "--tiny", "-o", f"results_dir={tmp_path}",
                 "-o", "folds.repeats=2"])
    assert code == 0
    folds = pd.read_parquet(out / "folds.parquet")
    assert list(folds.columns) == ["id", "fold", "fold_r1"]
    trials = pd.read_parquet(out / "trials")
    assert sorted(trials["fold"].unique()) == [0, 1, 2, 3] and len(trials) == 8  # 2 x the tiny grid's 4
    for fold in range(4):  # each trial was tested on its own (repeat, fold)'s held-out images
        column, within = ("fold", fold) if fold < 2 else ("fold_r1", fold - 2)
        held = set(folds.loc[folds[column] == within, "id"])
        for key in trials.loc[trials["fold"] == fold, "trial_key"]:
            assert set(pd.read_parquet(out / "predictions" / f"{key}.parquet")["id"]) == held
    loras = pd.read_parquet(out / "lora" / "loras.parquet")
    assert sorted(loras["fold"].unique()) == [0, 1, 2, 3]  # leak-free: one LoRA set per (repeat, fold)
    assert set(loras.loc[loras["fold"] < 2, "lora_key"]) == loras_before  # repeat 0: the k-fold LoRAs, re-used
    report = (out / "report" / "report.md").read_text()
    assert "2-fold CV, 2 repeats (4 folds)" in report and "| real only | 4 |" in report
