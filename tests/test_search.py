"""LoRA search: its space (checked like axes), a trial on several folds with checkpoints, the confirmation's paired
comparison, and a search that starts from bad settings, is killed, resumed with --resume and must end in the good
region and beat its start on folds it never scored (the plain Tune + Optuna loop also runs in test_experiments.py,
as `ooc-ray search experiments/lora_search.yaml --tiny`)."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import make_manifest, write_unlabeled
from scipy import stats

from ooc_ray import keys
from ooc_ray.backbones import backbone_weights
from ooc_ray.cli import main
from ooc_ray.data import load_manifest, run_data
from ooc_ray.diffusion.base import resolve_base
from ooc_ray.errors import ConfigError
from ooc_ray.fields import to_dict, with_value
from ooc_ray.folds import train_rows
from ooc_ray.load import from_dict, load_config
from ooc_ray.paths import ExperimentPaths
from ooc_ray.search.confirm import compare
from ooc_ray.search.space import default_point, point_config, split_folds, tune_space
from ooc_ray.search.trial import fold_part, plan_part_loras, trial_reports

POINT = {"generator.unet_lr": 1e-3, "generator.rank": 2, "generator.epochs": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def experiment(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg = load_config(repo / "experiments" / "lora_search.yaml", [f"results_dir={out}"], tiny=True)
    paths = ExperimentPaths.of(cfg)
    manifest = run_data(cfg, paths)
    return cfg, paths, backbone_weights(cfg.classify, paths.models, manifest), resolve_base("tiny", paths.models)


# ---------------------------------------------------------------------------------------------- space


def test_the_space_is_checked_like_axes_and_every_bad_dimension_is_named_at_once():
    with pytest.raises(ConfigError) as caught:
        from_dict({"search": {"space": {
            "generator.rank": {"choice": [0, 4]},  # a value the field refuses
            "generator.unet_lr": {"uniform": [1e-2, 1e-4]},  # low above high
            "folds.k": {"choice": [3]},  # data and folds stay fixed
            "sample.actors": {"choice": [1, 2]},  # a resource
            "classify.epochs": {"choice": [1, 2]},  # the search's probe never trains a classifier
            "generator.epochs": {"uniform": [1, 4]},  # an integer field
            "sample.cfg": {"normal": [1, 2]},  # no such distribution
        }}})
    message = str(caught.value)
    for named in ("search.space.generator.rank = 0: generator.rank: need at least 1",
                  "search.space.generator.unet_lr.uniform: expected [low, high]", "search.space.folds.k:",
                  "search.space.sample.actors: changes no result", "search.space.classify.epochs: the search trains",
                  "search.space.generator.epochs.uniform: the field holds int values; use randint or choice",
                  "search.space.sample.cfg: expected one of", "(7 problems)"):
        assert named in message, named
    with pytest.raises(ConfigError, match=r"search.folds / search.confirm_folds: \[1\] in both"):
        from_dict({"folds": {"k": 3}, "search": {"folds": [0, 1], "confirm_folds": [1]}})
    with pytest.raises(ConfigError, match="search.confirm_folds: fold 5 does not exist"):
        from_dict({"folds": {"k": 3}, "search": {"confirm_folds": [5]}})
    with pytest.raises(ConfigError, match="search.scheduler: asha stops trials at their reports"):
        from_dict({"search": {"report_every": 0}})


def test_a_search_refuses_to_score_on_a_random_backbone_before_any_work(tmp_path):
    """The probe scores on quality.features whether or not the quality stage is on: SmallCNN's random
    initialisation (classify.weights none) cannot tell cells from noise, so the search refuses before the data
    stage, with the key named (the quality stage's own check is in the config's)."""
    from ooc_ray.search import run_search

    cfg = from_dict({"results_dir": str(tmp_path), "classify": {"backbone": "SmallCNN", "weights": "none",
                                                                "mode": "exact"}, "quality": {"enabled": False}})
    with pytest.raises(ConfigError, match="quality.features: backbone measures on classify.backbone SmallCNN's"):
        run_search(cfg, ExperimentPaths.of(cfg))
    assert not any(tmp_path.iterdir())


def test_a_space_becomes_tune_distributions_and_round_trips_through_the_saved_config(repo):
    cfg = load_config(repo / "experiments" / "lora_search.yaml", [])
    space = tune_space(cfg.search.space)
    assert space["generator.rank"].categories == [2, 4, 8, 16]
    assert (space["generator.unet_lr"].lower, space["generator.unet_lr"].upper) == (3e-4, 1e-2)
    assert (space["generator.epochs"].lower, space["generator.epochs"].upper) == (2, 9)  # Tune's end is exclusive
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))) == cfg  # as best.yaml is written
    # The config's own settings as a point; a point applied: its values, split fold, one LoRA weight.
    own = default_point(cfg)
    assert own["generator.unet_lr"] == 3e-3 and own["sample.weights"] == 1.0 and own["sample.cfg"] == 1.0
    applied = point_config(cfg, {**own, "sample.weights": 0.7, "generator.rank": 16})
    assert applied.sample.weights == (0.7,) and applied.generator.rank == 16 and applied.generator.split == "fold"
    # The default space (no search.space in the file): kohya's LoRA settings and the weight.
    plain = from_dict({})
    assert [name for name, _, _ in plain.search.space][-1] == "sample.weights"
    # 4 folds: two scored, the last ceil(4 / 3) = 2 kept for the confirmation.
    manifest = pd.DataFrame({"fold": [0, 1, 2, 3] * 3})
    assert split_folds(cfg, manifest) == ([0, 1], [2, 3])


# ---------------------------------------------------------------------------------------------- one trial


def test_folds_parts_come_from_training_images_only(experiment):
    """A part's subset: search.images_per_class of each class of the fold's training images (of their
    classify.real_fraction), never a held-out one; its LoRAs train on that whole subset (the fraction taken
    once: plan_loras alone would take it again)."""
    cfg, paths, _, base = experiment
    manifest = load_manifest(paths)
    for fraction in (1.0, 0.5):
        fcfg = with_value(with_value(cfg, "classify.real_fraction", fraction), "search.images_per_class", 4)
        parts = [fold_part(manifest, fold, fcfg.search, fraction) for fold in (0, 1)]
        for fold, part, jobs in zip((0, 1), parts, plan_part_loras(fcfg, parts, base)):
            train = train_rows(manifest, fold, fraction)
            assert set(part.subset["id"]) <= set(train["id"]) and set(part.subset["label"]) == set(manifest["label"])
            assert (part.subset.groupby("label").size() == train.groupby("label").size().clip(upper=4)).all()
            assert not set(part.subset["id"]) & set(part.test["id"]) and (part.test["fold"] == fold).all()
            assert {job.label: set(job.image_ids) for job in jobs} == {
                label: set(rows["id"]) for label, rows in part.subset.groupby("label")}
    # A finished search is re-used by its run key: searches at other fractions (whose LoRAs saw other images),
    # and those from before the fraction was taken once, are not this one.
    run_keys = {fraction: keys.search_run_key(with_value(cfg, "classify.real_fraction", fraction), base.identity, "w",
                                              manifest) for fraction in (1.0, 0.5, 0.25)}
    assert len(set(run_keys.values())) == 3
    # The space (rank, lr, epochs) holds no weight: the weight its trials sample with keys the search and each
    # trial (weights 1.0 and 0.5 were keyed alike, and a finished search at the other weight was re-used).
    assert "sample.weights" not in {name for name, _, _ in cfg.search.space}
    at_half = with_value(cfg, "sample.weights", (0.5,))
    assert keys.search_run_key(at_half, base.identity, "w", manifest) != keys.search_run_key(cfg, base.identity, "w",
                                                                                             manifest)
    test = manifest[manifest["fold"] == 0]
    assert keys.search_trial_key(point_config(at_half, POINT), POINT, ["l"], test, "f") != \
        keys.search_trial_key(point_config(cfg, POINT), POINT, ["l"], test, "f")


def test_a_trial_on_two_folds_reports_at_checkpoints_that_are_the_loras_of_their_epochs(experiment):
    """POINT trains 2 epochs and reports after each (report_every 1) on folds 0 and 1. The objective is the mean of
    the folds' values, and each fold's value is what a trial on that fold alone scores. The epoch-1 checkpoint is
    the LoRA of generator.epochs = 1: a trial at that point re-uses it (trains nothing) and scores the same."""
    cfg, paths, weights, base = experiment
    rows = list(trial_reports(POINT, cfg, paths, base, weights, [0, 1], every=1))
    assert [r["epochs_trained"] for r in rows] == [1, 2] and [r["complete"] for r in rows] == [False, True]
    last = rows[-1]
    assert last["folds"] == [0, 1] and last["score"] == pytest.approx(np.mean(last["fold_scores"]))
    assert last["score_se"] == pytest.approx(stats.sem(last["fold_scores"]))
    n_test = sum(len(load_manifest(paths).query(f"fold == {f}")) for f in (0, 1))
    assert last["n_test"] == n_test and last["resolution"] == pytest.approx(1 / n_test)
    for fold, value in zip((0, 1), last["fold_scores"]):
        (alone,) = trial_reports(POINT, cfg, paths, base, weights, [fold], every=0)
        assert alone["score"] == value and alone["cas"] == alone["score"]
    loras = {p.name for p in (paths.search / "lora").iterdir()}
    (shorter,) = trial_reports({**POINT, "generator.epochs": 1}, cfg, paths, base, weights, [0, 1], every=0)
    assert {p.name for p in (paths.search / "lora").iterdir()} == loras  # the checkpoint's LoRAs, re-used
    assert shorter["fold_scores"] == rows[0]["fold_scores"] and shorter["complete"]
    # A finished trial is read back, not run again.
    (again,) = trial_reports(POINT, cfg, paths, base, weights, [0, 1], every=1)
    assert again["duration_s"] == last["duration_s"] and again["search_key"] == last["search_key"]
    # A finished row from before an objective existed is scored again (its LoRAs and pool re-used), never
    # reported without it.
    file = paths.search / "trials" / f"{last['search_key']}.parquet"
    pd.read_parquet(file).drop(columns=["vendi"]).to_parquet(file)
    (rescored,) = trial_reports(POINT, cfg, paths, base, weights, [0, 1], every=0)
    assert rescored["duration_s"] != last["duration_s"] and rescored["fold_scores"] == last["fold_scores"]
    assert rescored["vendi"] == pytest.approx(last["vendi"])
    assert {p.name for p in (paths.search / "lora").iterdir()} == loras


def test_trials_at_once_train_a_shared_lora_once_taking_the_unclaimed_ones_first(experiment, monkeypatch):
    """Trials running at once in a space of sampling settings need the same LoRAs. While another trial holds the
    claim on one of them (here: this test), a trial trains the others, then waits and uses the one the holder
    made: no LoRA is trained twice."""
    import threading

    import ooc_ray.search.trial as trial_module
    from ooc_ray.finetune import LoraTraining, base_pipeline
    from ooc_ray.io import atomic_dir
    from ooc_ray.lock import claim
    from ooc_ray.protocol import plan_loras

    cfg, paths, weights, base = experiment
    point = {**POINT, "generator.rank": 4, "generator.epochs": 1}  # LoRAs no other test here trains
    tcfg = point_config(cfg, point)
    jobs = plan_loras(tcfg, fold_part(load_manifest(paths), 0, cfg.search).manifest, base.identity, folds=[0])
    held, others, root = jobs[0], jobs[1:], paths.search / "lora"
    trained = []  # the LoRAs the trial trained itself
    monkeypatch.setattr(trial_module, "LoraTraining",
                        lambda pipe, job, gcfg: trained.append(job.key) or LoraTraining(pipe, job, gcfg))
    rows = []
    with claim(root / ".claims" / held.key, wait=True):
        trial = threading.Thread(target=lambda: rows.extend(trial_reports(point, cfg, paths, base, weights, [0], 0)))
        trial.start()
        deadline = time.monotonic() + 300
        while not all((root / job.key / "metadata.json").exists() for job in others):
            assert trial.is_alive() and time.monotonic() < deadline, "the unclaimed LoRAs were not trained"
            time.sleep(0.2)
        time.sleep(1.0)
        assert trial.is_alive() and not (root / held.key).exists()  # waiting for the claimed one
        training = LoraTraining(base_pipeline(base.path, tcfg.generator), held, tcfg.generator)
        training.train_to(tcfg.generator.epochs)
        with atomic_dir(root / held.key) as tmp:
            training.save(held, tcfg.generator, base, tmp)
        training.close()
    trial.join(timeout=300)
    assert sorted(trained) == sorted(job.key for job in others) and len(trained) == len(jobs) - 1 == 2
    assert rows[-1]["complete"] and rows[-1]["folds"] == [0]


def test_a_trial_that_fails_is_named_not_ranked_and_said_again_when_the_finished_search_is_reused(
        experiment, monkeypatch, capsys, tmp_path):
    """A point whose training fails (a LoRA that diverges, a node's error) is left out of the ranking: through
    Ray Tune, the search keeps the others, warns with the trial's own error, and says so again each time the
    finished search is re-used (its record keeps the failures), so the search never looks whole."""
    import ooc_ray.search as search_module
    from ray import tune

    from ooc_ray.raycluster import init_ray

    cfg, paths, weights, base = experiment
    cfg = with_value(cfg, "search.num_samples", 3)
    doomed = tmp_path / "doomed"  # the point of the first trial to start: it fails there (and at its retry)

    def trainable(params, cfg, paths, base, weights, folds):  # defined here, so Ray ships it by value
        lr = f"{params['generator.unet_lr']:.9f}"
        try:
            with open(doomed, "x") as first:
                first.write(lr)
        except FileExistsError:
            pass
        if doomed.read_text() == lr:
            raise ValueError(f"LoRA diverged at unet_lr {lr}")
        tune.report({"search_key": f"fake-{lr}", "score": 0.5, "score_se": 0.0, "cas": 0.5, "epochs_trained": 1,
                     "complete": True})

    monkeypatch.setattr(search_module, "_tune_trainable", trainable)
    init_ray(cfg)
    record = search_module._search_trials(cfg, paths, base, weights, [0], "fails", None)
    found = record["trials"]
    lr = doomed.read_text()
    assert len(found) == 2 and f"fake-{lr}" not in found and all(key.startswith("fake-") for key in found)
    said = capsys.readouterr().err
    assert f"search: 1 trial(s) failed and are not ranked, e.g. LoRA diverged at unet_lr {lr}" in said
    assert record["failed"] == [f"LoRA diverged at unet_lr {lr}"]
    assert search_module._finished_trials(paths, "fails") == record
    assert f"search: 1 trial(s) of it failed and are not ranked, e.g. LoRA diverged at unet_lr {lr}" in \
        capsys.readouterr().err


def test_every_objective_the_config_allows_is_one_a_trial_reports_with_its_direction():
    from typing import get_args, get_type_hints

    from ooc_ray.config import SearchConfig
    from ooc_ray.search.trial import OBJECTIVE_MODE, REPORTED

    assert set(get_args(get_type_hints(SearchConfig)["objective"])) == set(OBJECTIVE_MODE) <= set(REPORTED)
    assert OBJECTIVE_MODE["fd"] == OBJECTIVE_MODE["kid"] == "min" and OBJECTIVE_MODE["coverage"] == "max"


def test_a_trial_samples_with_sample_settings_as_configured(experiment):
    cfg, paths, weights, base = experiment
    img2img = from_dict({**to_dict(cfg), "sample": {**to_dict(cfg.sample), "mode": "img2img", "strength": 0.5}})
    (row,) = trial_reports({**POINT, "generator.epochs": 1}, img2img, paths, base, weights, [0], every=0)
    pools = pd.concat([pd.read_parquet(p) for p in (paths.search / "synthetic").rglob("pool.parquet")])
    assert row["search_key"] in {p.stem for p in (paths.search / "trials").iterdir()}
    assert {"img2img"} <= set(pools["mode"]) and 0.5 in set(pools["strength"])


# ---------------------------------------------------------------------------------------------- confirmation


def test_the_confirmation_is_the_corrected_paired_t_test_of_the_gain(repo):
    """Hand-worked: gains 0.10 and 0.30 on two folds, n_test / n_train = 1/3: mean 0.2, sd 0.1414, corrected se
    sqrt((1/2 + 1/3) 0.02) = 0.1291, t = 1.549 on 1 df, p = 0.365: inconclusive. For KID (lower is better) the
    sign turns. One fold: no test."""
    cfg = load_config(repo / "experiments" / "lora_search.yaml", [])
    table = pd.DataFrame({"fold": [2, 2, 3, 3], "settings": ["best", "default"] * 2, "score": [0.8, 0.7, 0.9, 0.6]})
    out = compare(table, cfg, 1 / 3)
    assert out["gain_mean"] == pytest.approx(0.2) and out["best_better_folds"] == 2
    se = math.sqrt((1 / 2 + 1 / 3) * 0.02)
    assert out["corrected_p"] == pytest.approx(2 * stats.t.sf(0.2 / se, 1)) and out["corrected_p"] == pytest.approx(0.365, abs=1e-3)
    assert out["gain_ci"][0] == pytest.approx(0.2 - stats.t.ppf(0.975, 1) * se)
    assert out["verdict"] == "inconclusive"
    raw = to_dict(cfg)
    raw["search"]["objective"] = "kid"
    kid = from_dict(raw)
    assert compare(table, kid, 1 / 3)["gain_mean"] == pytest.approx(-0.2)
    one = compare(table[table["fold"] == 2], cfg, 1 / 3)
    assert one["verdict"] == "undefined (fewer than 2 paired folds)" and math.isnan(one["corrected_p"])


def test_the_confirmations_overlap_term_counts_the_images_a_trial_learns_from(experiment):
    """The corrected t's n_test / n_train, as the report counts a trial's training images: a confirmation
    trial's LoRAs and probe learn from search.images_per_class per class, not the whole training fold (which
    made the correction 3-4x smaller, and the verdict less cautious, than the report's own convention)."""
    from ooc_ray.search.confirm import held_out_ratio

    cfg, paths, _, _ = experiment
    manifest = load_manifest(paths)
    two = with_value(cfg, "search.images_per_class", 2)
    by_hand = np.mean([(manifest["fold"] == f).sum() / (2 * manifest["label"].nunique()) for f in (0, 1)])
    assert held_out_ratio(manifest, [0, 1], two) == pytest.approx(by_hand)


# ---------------------------------------------------------------------------------------------- a whole search


def bad_start_experiment(root) -> dict:
    """Two classes that differ in brightness (dark good, bright bad), a tiny base pretrained on unlabeled images of
    both, LoRAs that learn each class's brightness in 6 epochs, and sampling at LoRA weight 0.1: deliberately
    bad, as both classes' pools then come out the same grey (measured: 152 grey levels each, against the real 40
    and 190), so a probe trained on them guesses (CAS 0.5). The known good region is weight >= 0.5. The search
    varies the weight and follows CAS. (KID on the image statistics ranked 0.1 first: every pool is smooth where
    the real images are noisy, and that texture gap swamps the brightness.)"""
    make_manifest((16, 16), root=root)
    return {
        "name": "bad_start", "results_dir": str(root / "results"),
        "data": {"source": str(root / "images"), "classes": ["good", "bad"]},
        "folds": {"k": 4},
        "generator": {"base": "tiny", "resolution": 32, "epochs": 6, "repeats": 2, "batch_size": 4, "rank": 4,
                      "alpha": 4.0, "unet_lr": 2e-3, "text_encoder_lr": 0.0, "unet_modules": "transformer+conv",
                      "pretrain": {"source": str(write_unlabeled(root / "unlabeled", 64, seed=7)), "vae_steps": 30,
                                   "unet_steps": 80, "batch_size": 16}},
        "sample": {"weights": [0.1], "steps": 8, "cfg": 1.5, "resolution": 32, "batch_size": 12},
        "classify": {"backbone": "SmallCNN", "weights": "none", "input_size": 32},
        "quality": {"features": "image_statistics", "kid_subsets": 10, "kid_subset_size": 4},
        "search": {"num_samples": 4, "objective": "cas", "images_per_class": 12, "scheduler": "none",
                   "report_every": 0, "folds": [0, 1],
                   "space": {"sample.weights": {"uniform": [0.05, 1.0]}}},
        "ray": {"num_cpus": 2},
    }


def search_command(path, *extra) -> list[str]:
    return [sys.executable, "-m", "ooc_ray.cli", "search", str(path), "-q", *extra]


@pytest.mark.slow
def test_a_search_from_bad_settings_killed_and_resumed_finds_the_good_region_and_beats_its_start(tmp_path, capsys):
    path = tmp_path / "bad_start.yaml"
    path.write_text(yaml.safe_dump(bad_start_experiment(tmp_path)))
    out = tmp_path / "results" / "bad_start" / "search"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Killed (the whole process group, Ray with it) once its first trial is written.
    proc = subprocess.Popen(search_command(path), env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "trials").glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.parquet")}
    # Run again as before: refused, naming --resume (the CLI in this process: a subprocess would pay ~6 s of
    # imports and a Ray start to print one line); then resumed to its end.
    assert main(["search", str(path), "-q"]) == 1
    refused = capsys.readouterr().err
    assert "unfinished search of this config" in refused and "--resume" in refused
    resumed = subprocess.run(search_command(path, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4 and results["complete"].all()
    assert results["sample.weights"].tolist().count(0.1) == 1  # the config's own settings: one of the trials
    for name, stamp in first.items():  # the trial finished before the kill was not run again
        assert (out / "trials" / name).stat().st_mtime_ns == stamp
    best = json.loads((out / "best.json").read_text())
    assert best["point"]["sample.weights"] >= 0.5, results[["sample.weights", "score"]]
    assert best["score"] == results["score"].max() and results["complete"].all() and best["failed"] == []
    # Its lead over the start on the search's folds: the mean of the per-fold differences = the difference of means.
    own = results.loc[results["sample.weights"] == 0.1, "score"].iloc[0]
    assert best["lead_over_own"]["own_score"] == own and best["lead_over_own"]["lead"] == pytest.approx(best["score"] - own)
    checked = best["confirm"]
    assert checked["folds"] == [2, 3] and checked["default_point"] == {"sample.weights": 0.1}
    # The start scores chance (0.5) on every fold; the best point's CAS is higher on average over the unseen folds
    # (measured on this set, uninterrupted: best weight 0.57, CAS 1.0 on folds 0-1 and 0.94 on folds 2-3 against
    # the start's 0.50; a fold's 8 held-out images move it in steps of 0.125).
    assert checked["gain_mean"] > 0 and checked["best_better_folds"] >= 1, checked
    confirm = pd.read_parquet(out / "confirm.parquet")
    assert sorted(zip(confirm["fold"], confirm["settings"])) == [(2, "best"), (2, "default"), (3, "best"), (3, "default")]
    # best.yaml: the experiment with the winning weight, which `ooc-ray` loads as it is.
    applied = load_config(out / "best.yaml", [])
    assert applied.sample.weights == (pytest.approx(best["point"]["sample.weights"]),)
    assert applied.generator == from_dict(bad_start_experiment(tmp_path)).generator


def test_best_yaml_says_when_its_loras_train_on_more_images_than_the_search_scored(experiment, tmp_path):
    """The search trains each LoRA on search.images_per_class images per class; the grid best.yaml runs trains
    on each fold's whole training set, so the same epochs and repeats take more optimizer steps there. Both
    counts (here from the manifest and folds) are in best.json, and best.yaml's header gives the ratio."""
    from ooc_ray.search import lora_images, write_best_yaml

    cfg, paths, _, base = experiment
    manifest = load_manifest(paths)
    per_fold = [manifest[manifest["fold"] != f].groupby("label").size() for f in sorted(manifest["fold"].unique())]
    grid = [int(min(s.min() for s in per_fold)), int(max(s.max() for s in per_fold))]
    two = with_value(cfg, "search.images_per_class", 2)
    counted = lora_images(two, POINT, manifest, base, [0])
    assert counted == {"search": [2, 2], "grid": grid} and grid[0] > 2
    out = write_best_yaml(two, dataclasses.replace(paths, root=tmp_path), POINT,
                          {"objective": "cas", "score": 0.5, "folds": [0], "lora_images": counted})
    assert (f"# the search trained each LoRA on 2-2 images (search.images_per_class); this config trains them on "
            f"{grid[0]}-{grid[1]}, so its generator.epochs and repeats give {grid[0] / 2:.1f}-{grid[1] / 2:.1f}x the "
            "optimizer steps the search scored") in out.read_text()
    same = lora_images(with_value(cfg, "search.images_per_class", 1000), POINT, manifest, base, [0])
    assert same["search"][1] == int(per_fold[0].max())
    out = write_best_yaml(two, dataclasses.replace(paths, root=tmp_path), POINT,
                          {"objective": "cas", "score": 0.5, "folds": [0], "lora_images": same})
    assert ("images (search.images_per_class)" in out.read_text()) == (grid[1] > same["search"][1])
