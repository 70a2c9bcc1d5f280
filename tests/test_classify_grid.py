"""The classify stage end to end through Ray Tune on CPU: a tiny grid, killed mid-run and resumed.
~1.5-2 min on 2 cores (each trial is a fresh Ray worker importing TensorFlow)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import classify_cfg, demo_experiment

from ooc_ray.classify import run_classify
from ooc_ray.config import TrackingConfig
from ooc_ray.fields import to_dict
from ooc_ray.trainsets import plan_trials


DRIVER = textwrap.dedent("""
    import json, sys
    from ooc_ray.load import from_dict
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.classify import run_classify
    cfg = from_dict(json.loads(sys.argv[1]))
    run_classify(cfg, ExperimentPaths.of(cfg))
""")


def summaries(paths):
    return {p.name: p.stat().st_mtime_ns for p in paths.trials.glob("*.parquet")}


@pytest.mark.restarts_ray
def test_small_pool_fails_before_ray(tmp_path):
    import ray

    from ooc_ray.errors import TrainsetError

    if ray.is_initialized():  # the session's Ray: this test checks that planning fails before any Ray start
        ray.shutdown()
    cfg = classify_cfg(tmp_path, ratios=[0.0, 2.0])  # 2 x n_train synthetic: more than the pools hold
    paths, _, _ = demo_experiment(cfg)
    with pytest.raises(TrainsetError, match=r"fold 0, class 'good', LoRA weight 1: need \d+"):
        run_classify(cfg, paths)
    assert not ray.is_initialized() and not paths.trials.exists()


def mlflow_runs(paths) -> pd.DataFrame:
    """Every MLflow run of the experiment, read back with the real client from the embedded SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{paths.mlflow.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grid")
    runs = client.search_runs([experiment.experiment_id])
    return pd.DataFrame([{"key": r.data.tags["ooc_ray.trial"], "status": r.info.status, "params": r.data.params,
                          "losses": [m.value for m in sorted(client.get_metric_history(r.info.run_id, "loss"),
                                                             key=lambda m: m.step)],
                          "artifacts": sorted(f.path for folder in client.list_artifacts(r.info.run_id)
                                              for f in client.list_artifacts(r.info.run_id, folder.path))}
                         for r in runs])


def test_grid_killed_and_resumed(tmp_path, monkeypatch):
    # max_concurrent 1: trials run one after another, so the kill lands between finished and pending ones.
    # MLflow tracking on: every trial is logged once, with its history, however often the grid is resumed.
    cfg = dataclasses.replace(classify_cfg(tmp_path, max_concurrent=1), tracking=TrackingConfig(mlflow=True))
    paths, manifest, synthetic = demo_experiment(cfg)
    specs = plan_trials(cfg, manifest, synthetic, "none")
    assert len(specs) == 6  # 2 folds x (real, real+50%, synthetic only)

    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(to_dict(cfg))], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 240
    while len(summaries(paths)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    first = summaries(paths)
    assert 2 <= len(first) < 6, f"kill did not land mid-run: {len(first)} trials finished"

    rows = run_classify(cfg, paths)  # resume
    keys = [t.key for t in specs]
    assert rows["trial_key"].tolist() == keys and not rows["trial_key"].duplicated().any()
    after = summaries(paths)
    assert set(after) == {f"{k}.parquet" for k in keys}
    assert all(after[name] == mtime for name, mtime in first.items())  # finished trials were not re-run
    assert len(list((paths.history).glob("*.parquet"))) == 6
    assert len(list((paths.predictions).glob("*.parquet"))) == 6

    # What analysts read: one glob, summary rows only.
    table = pd.read_parquet(paths.trials)
    assert len(table) == 6 and set(table["trial_key"]) == set(keys)
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.connect().execute(f"select count(*) from read_parquet('{paths.trials}/*.parquet')").fetchall()[0][0]
    assert n == 6
    real = rows[rows["arm"] == "real"]
    assert len(real) == 2 and real["weight"].isna().all() and (real["n_train_synthetic"] == 0).all()
    synth = rows[rows["synthetic_only"]]
    assert (synth["n_train_real"] == 0).all() and (synth["n_train_synthetic"] == real["n_train_real"].values).all()
    half = rows[rows["arm"] == "real+50%"]
    assert (half["n_train_synthetic"] == np.floor(half["n_train_real"] * 0.5 + 0.5)).all()
    assert rows["accuracy"].between(0, 1).all() and (rows["mode"] == "cached").all()
    assert (rows["confusion"].map(lambda c: int(np.sum(np.stack(c)))) == rows["n_test"]).all()
    history = pd.read_parquet(paths.history)
    assert sorted(history["epoch"].unique()) == [1, 2]
    runs = mlflow_runs(paths)
    finished = runs[runs["status"] == "FINISHED"].set_index("key")
    assert sorted(finished.index) == sorted(keys)  # one finished run per trial, none twice
    assert set(runs["status"]) <= {"FINISHED", "KILLED"}  # the trial the kill interrupted: closed, not left RUNNING
    for row in rows.itertuples():
        logged = finished.loc[row.trial_key]
        own = history[history["trial_key"] == row.trial_key].sort_values("epoch")
        np.testing.assert_allclose(logged["losses"], own["loss"], rtol=1e-6)  # per-epoch, as the trial's history
        assert logged["params"]["fold"] == str(row.fold) and logged["params"]["arm"] == row.arm
        assert logged["params"]["classify.mode"] == "cached"
        assert logged["artifacts"] == sorted(f"{d}/{row.trial_key}.parquet" for d in ("history", "predictions",
                                                                                        "trials"))

    # One trial file deleted (the finished Tune experiments kept): only that trial runs again, with the same numbers.
    lost = keys[3]
    (paths.trials / f"{lost}.parquet").unlink()
    again = run_classify(cfg, paths)
    assert again["trial_key"].tolist() == keys
    final = summaries(paths)
    assert all(final[name] == after[name] for name in after if name != f"{lost}.parquet")
    pd.testing.assert_series_equal(again["accuracy"], rows["accuracy"])
    assert (mlflow_runs(paths)["status"] == "FINISHED").sum() == 6  # the re-made trial is not logged twice
    (paths.trials / f"{lost}.parquet").unlink()  # the same trial lost again: its finished experiment is not reused
    assert run_classify(cfg, paths)["trial_key"].tolist() == keys

    # A finished trial that a restored Tune experiment runs again reports its recorded epochs (so the MLflow run
    # opened for it has them all), then its result marked skipped.
    from ray import tune

    from ooc_ray.classify.grid import GridTrial, _tune_trial

    reported = []
    monkeypatch.setattr(tune, "report", reported.append)
    _tune_trial({"trial_key": keys[0]}, paths, {t.key: GridTrial(cfg, t, None) for t in specs})
    own = history[history["trial_key"] == keys[0]].sort_values("epoch")
    assert [r["loss"] for r in reported[:-1]] == own["loss"].tolist() and reported[-1]["skipped"]

    # Everything done: no Ray, no TF, just the rows.
    start = time.perf_counter()
    assert run_classify(cfg, paths)["trial_key"].tolist() == keys
    assert time.perf_counter() - start < 5


def test_exact_mode_through_tune(tmp_path):
    cfg = classify_cfg(tmp_path, mode="exact", epochs=1, ratios=[0.0], synthetic_only=False,
                       augment=["flip", "rotation"])
    paths, _, _ = demo_experiment(cfg)
    rows = run_classify(cfg, paths)
    assert len(rows) == 2 and sorted(rows["fold"]) == [0, 1]
    assert (rows["mode"] == "exact").all() and (rows["arm"] == "real").all()
    assert rows["n_test"].sum() == 18  # every image held out exactly once
    row = rows.iloc[0]
    assert row["classes"].tolist() == ["good", "acceptable", "bad"] and len(row["per_class_recall"]) == 3
    assert rows.dtypes["fold"] == np.int64 and rows.dtypes["weight"] == np.float64
    assert not paths.features.exists()  # exact mode caches nothing


def test_a_trial_that_fails_in_tune_is_named_with_its_own_error(tmp_path):
    """A trial raising inside its Tune worker: the stage's error names the trial and says why in the trial's own
    words (here an lr that overflows the head: run_trial refuses its NaN), not only "see the Tune error files"."""
    from ooc_ray.errors import StageError

    cfg = classify_cfg(tmp_path, lr=1e38, max_failures=0, epochs=2, ratios=[0.0], synthetic_only=False)
    paths, _, _ = demo_experiment(cfg)
    with pytest.raises(StageError, match=r"2 classifier trial\(s\) did not finish, e\.g\. classify: trial [\w-]+ "
                                         r"\(fold \d, real\): its (loss became nan at epoch \d|predictions are "
                                         r"NaN/inf); nothing written \(lower classify\.lr=1e\+38\?\); see the Tune"):
        run_classify(cfg, paths)
    assert not list(paths.trials.glob("*.parquet"))


def test_a_seed_axis_over_calibrated_weights_gives_each_seed_its_own_weights(tmp_path):
    """"calibrated" weights are computed with classify.seed: the classify stage resolves them per seed, as the
    report plans them (each seed's trials were keyed with the first seed's weights, and the report then found
    none of the other seeds' trials)."""
    import types

    from helpers import make_manifest

    from ooc_ray.backbones import backbone_weights
    from ooc_ray.classify.grid import _Weights
    from ooc_ray.config import ExperimentConfig

    manifest = make_manifest((6, 4), k=2)
    cfg = ExperimentConfig()
    ccs = [dataclasses.replace(cfg.classify, backbone="EfficientNetB0", weights="calibrated", seed=s) for s in (0, 1)]
    for cc in ccs:  # both calibrated files in place, so nothing is built
        Path(backbone_weights(cc, tmp_path, manifest).value).touch()
    resolve = _Weights(cfg, types.SimpleNamespace(models=tmp_path), manifest)
    identities = [resolve(cc).identity for cc in ccs]
    assert identities == [backbone_weights(cc, tmp_path, manifest).identity for cc in ccs]
    assert identities[0] != identities[1]


def test_the_files_of_a_trial_another_config_left_without_a_summary_leave_too(tmp_path):
    """A run killed between a trial's predictions and its summary leaves predictions/ and history/ files without
    one; once the config changes, they move to superseded/ with the rest of its trials (only summaries did), so a
    glob of predictions/ reads the current config's alone."""
    from ooc_ray.classify.grid import _keep_trials_current
    from ooc_ray.paths import ExperimentPaths

    paths = ExperimentPaths(tmp_path)
    for folder, key in ((paths.trials, "old-whole"), (paths.history, "old-whole"), (paths.predictions, "old-whole"),
                        (paths.history, "old-cut"), (paths.predictions, "old-cut")):
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"trial_key": [key]}).to_parquet(folder / f"{key}.parquet")
    _keep_trials_current(paths, [])
    assert not [f for folder in (paths.trials, paths.history, paths.predictions) for f in folder.glob("*.parquet")]
    assert sorted(p.relative_to(paths.superseded).as_posix() for p in paths.superseded.rglob("*.parquet")) == [
        "history/old-cut.parquet", "history/old-whole.parquet", "predictions/old-cut.parquet",
        "predictions/old-whole.parquet", "trials/old-whole.parquet"]
