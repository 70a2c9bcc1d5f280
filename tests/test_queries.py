"""docs/results.md's example queries run (DuckDB and pandas) on a results folder of the documented shape."""
import re

import numpy as np
import pandas as pd
import pytest

duckdb = pytest.importorskip("duckdb")


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results" / "demo"
    for sub in ("trials", "predictions"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = [(float("nan"), 0.0, False), (1.0, 0.5, False), (1.0, 1.0, True), (0.8, 0.5, False)]
    for fold in range(3):
        for weight, ratio, syn in grid:
            key = f"f{fold}_w{weight}_r{ratio}_s{int(syn)}"
            acc = 0.7 + 0.01 * fold + (0.02 if ratio == 0.5 else 0) - (0.1 if syn else 0)
            pd.DataFrame([{"trial_key": key, "fold": fold, "weight": weight, "ratio": ratio,
                           "synthetic_only": syn, "arm": f"r{ratio}s{int(syn)}", "accuracy": acc}]).to_parquet(
                root / "trials" / f"{key}.parquet")
            labels = rng.integers(0, 3, 10)
            pd.DataFrame({"trial_key": key, "id": [f"i{i}" for i in range(10)],
                          "file": [f"img/{i}.png" for i in range(10)], "label_index": labels,
                          "pred_index": np.where(np.arange(10) < 2, (labels + 1) % 3, labels)}).to_parquet(
                root / "predictions" / f"{key}.parquet")
    return root


def doc_blocks(repo, lang):
    return re.findall(rf"```{lang}\n(.*?)```", (repo / "docs" / "results.md").read_text(), re.S)


def test_readme_sql_queries(repo, results):
    queries = doc_blocks(repo, "sql")
    assert len(queries) == 3
    con = duckdb.connect()
    out = [con.execute(q.replace("results/demo/", f"{results}/")).df() for q in queries]
    per_point, gains, wrong = out
    assert len(per_point) == 4 and (per_point["folds"] == 3).all()
    real = per_point[per_point["weight"].isna()].iloc[0]
    assert real["acc_mean"] == pytest.approx(0.71)
    assert sorted(gains["mean_gain"].round(3)) == [-0.1, 0.02, 0.02]
    assert (wrong["pred_index"] != wrong["label_index"]).all() and len(wrong) == 6  # 2 images x 3 folds


def test_readme_pandas_snippet(repo, results, monkeypatch):
    (snippet,) = doc_blocks(repo, "python")
    monkeypatch.chdir(results.parent.parent)
    scope = {}
    exec(snippet.replace("trials.groupby", "summary = trials.groupby"), scope)
    assert len(scope["trials"]) == 12
    assert scope["summary"]["count"].eq(3).all()
