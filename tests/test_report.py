"""Report numbers against hand-computed ones on a fixed trial table."""
import math

import numpy as np
import pandas as pd
import pytest

from ooc_ray.report import display_table, naive_baseline, paired_tests, read_trials, summary_tables, to_markdown

CLASSES = ["good", "acceptable", "bad"]


def _trial(fold, weight, ratio, acc, synthetic_only=False):
    return {"fold": fold, "weight": weight, "ratio": ratio, "synthetic_only": synthetic_only, "accuracy": acc,
            "precision_macro": acc - 0.1, "recall_macro": acc - 0.2, "f1_macro": acc - 0.3,
            "classes": CLASSES, "confusion": [[2, 1, 0], [0, 3, 0], [0, 0, 1]]}


@pytest.fixture
def trials():
    rows = []
    real = [0.70, 0.72, 0.74]
    plus50_w1 = [0.71, 0.74, 0.74]
    plus50_w08 = [0.70, 0.72, 0.74]  # identical to real: no test possible
    syn_w1 = [0.60, 0.62, 0.61]
    for f in range(3):
        rows.append(_trial(f, float("nan"), 0.0, real[f]))
        rows.append(_trial(f, 1.0, 0.5, plus50_w1[f]))
        rows.append(_trial(f, 0.8, 0.5, plus50_w08[f]))
        rows.append(_trial(f, 1.0, 1.0, syn_w1[f], synthetic_only=True))
    return pd.DataFrame(rows)


def test_summary_tables_by_hand(trials):
    tables = summary_tables(trials)
    assert list(tables) == [1.0, 0.8]  # weights high to low, like the paper's Table I then II
    t1 = tables[1.0]
    assert t1["arm"].tolist() == ["real only", "real + 50% synthetic", "synthetic only"]
    real, plus, syn = t1.iloc[0], t1.iloc[1], t1.iloc[2]
    assert real["accuracy_mean"] == pytest.approx(0.72) and real["accuracy_std"] == pytest.approx(0.02)
    assert real["recall_macro_mean"] == pytest.approx(0.52)
    assert math.isnan(real["paired_t_p"])  # real only is the reference row
    # differences (0.01, 0.02, 0.00): mean 0.01, sd 0.01, t = sqrt(3), df 2 -> p = 1 - t/sqrt(t^2 + 2)
    assert plus["accuracy_mean"] == pytest.approx(0.73)
    assert plus["accuracy_diff_vs_real"] == pytest.approx(0.01)
    assert plus["paired_t_p"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), abs=1e-9)
    assert syn["accuracy_mean"] == pytest.approx(0.61) and syn["accuracy_std"] == pytest.approx(0.01)
    assert syn["accuracy_diff_vs_real"] == pytest.approx(-0.11)
    t08 = tables[0.8]
    assert t08["arm"].tolist() == ["real only", "real + 50% synthetic"]
    assert t08.iloc[1]["accuracy_diff_vs_real"] == pytest.approx(0.0)
    assert math.isnan(t08.iloc[1]["paired_t_p"])  # all differences zero: no test


def test_display_and_markdown(trials):
    shown = display_table(summary_tables(trials)[1.0])
    assert shown.loc[0, "accuracy"] == "0.720 ± 0.020"
    assert shown.loc[1, "Δacc vs real"] == "+0.010"
    md = to_markdown(shown)
    assert md.splitlines()[0].startswith("| training set | folds | accuracy")
    assert "| real + 50% synthetic | 3 | 0.730 ± 0.017" in md


def test_paired_tests_pairs_by_fold():
    real = pd.Series([0.5, 0.6, 0.7], index=[0, 1, 2])
    other = pd.Series([0.8, 0.6], index=[2, 1])  # fold 0 missing, order shuffled
    out = paired_tests(real, other)
    assert out["n_pairs"] == 2 and out["mean_diff"] == pytest.approx(0.05)


def test_naive_baseline():
    from helpers import make_manifest

    m = make_manifest((6, 4), k=2, labels=("a", "b"))  # image j of a class held out in fold j % 2
    out = naive_baseline(m)
    assert out["overall"] == pytest.approx(0.6)
    # fold 0 test = 3 a + 2 b: train majority a -> 3/5; fold 1 the same
    assert out["per_fold_mean"] == pytest.approx(0.6)


def test_read_trials_one_glob(tmp_path, trials):
    (tmp_path / "history").mkdir()
    for i, row in trials.iterrows():
        pd.DataFrame([row]).to_parquet(tmp_path / f"t{i}.parquet")
    pd.DataFrame({"epoch": [0]}).to_parquet(tmp_path / "history" / "t0.parquet")
    back = read_trials(tmp_path)
    assert len(back) == len(trials)
    assert np.allclose(sorted(back["accuracy"]), sorted(trials["accuracy"]))
    with pytest.raises(FileNotFoundError, match="classify"):
        read_trials(tmp_path / "none")


def test_run_report_writes_everything(tmp_path, trials):
    from helpers import fake_synthetic

    from ooc_ray import keys
    from ooc_ray.config import from_dict
    from ooc_ray.data import run_data
    from ooc_ray.errors import DataError
    from ooc_ray.io import write_parquet
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.protocol import plan_trials
    from ooc_ray.report import run_report

    cfg = from_dict({"name": "r", "results_dir": str(tmp_path), "folds": {"k": 3},
                     "data": {"classes": CLASSES, "demo": {"per_class": [6, 6, 6], "size": 32}},
                     "generator": {"split": "fold"}, "sample": {"weights": [1.0, 0.8]},
                     "classify": {"ratios": [0.0, 0.5], "synthetic_only": True}})
    paths = ExperimentPaths.of(cfg)
    m = run_data(cfg, paths)
    synthetic = fake_synthetic(m, (1.0, 0.8), root=paths.root)
    write_parquet(synthetic, paths.synthetic_table)
    planned = {(t.spec.fold, -1.0 if t.spec.weight is None else t.spec.weight, t.spec.ratio, t.spec.synthetic_only):
               t.key for t in plan_trials(cfg, m, synthetic, "imagenet")}
    paths.trials.mkdir(parents=True)
    digest = keys.data_digest(m)
    for i, row in trials.iterrows():
        key = planned[(row["fold"], -1.0 if pd.isna(row["weight"]) else row["weight"], row["ratio"],
                       row["synthetic_only"])]
        pd.DataFrame([{**row, "trial_key": key, "data_digest": digest}]).to_parquet(paths.trials / f"{key}.parquet")
    pd.DataFrame([{**trials.iloc[0], "trial_key": "other-config", "data_digest": "x"}]).to_parquet(
        paths.trials / "old.parquet")
    text = run_report(cfg, paths).read_text()
    assert "- trials: 12" in text  # the other config's trial file is not reported
    assert f"manifest digest `{digest[:16]}`" in text and "18 images in 3 classes" in text
    assert "generator protocol: **fold**" in text and "naive (majority class) accuracy: 0.333" in text
    for name in ["table_w1.csv", "table_w1.md", "table_w1.tex", "table_w0.8.md", "summary.csv",
                 "accuracy_vs_ratio.png", "confusion_matrices.png", "real_vs_synthetic.png"]:
        assert (paths.report / name).stat().st_size > 0, name
    assert "\\begin{tabular}" in (paths.report / "table_w1.tex").read_text()
    # a trial file of other data under a current key (a copied folder, a bug): refused, never mixed
    key = next(iter(planned.values()))
    pd.DataFrame([{**trials.iloc[0], "trial_key": key, "data_digest": "0" * 64}]).to_parquet(paths.trial(key))
    with pytest.raises(DataError, match="trials of different data"):
        run_report(cfg, paths)


def test_real_only_grid_has_one_table(trials):
    real = trials[trials["weight"].isna()]
    tables = summary_tables(real)
    assert len(tables) == 1
    (table,) = tables.values()
    assert table["arm"].tolist() == ["real only"] and table["accuracy_mean"].iloc[0] == pytest.approx(0.72)
