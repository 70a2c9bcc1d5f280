"""A classifier trial's three files and whether they are whole: classify runs a trial again when they are not,
and report, plan and status count only whole ones, so a truncated, copied or hand-edited file is never a result.

A trial writes trials/<key>.parquet last (one summary row), after history/<key>.parquet and
predictions/<key>.parquet: the summary marks it done.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ooc_ray.io import parquet_problem
from ooc_ray.paths import ExperimentPaths

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")  # each in [0, 1] in a real summary


def trial_outputs(paths: ExperimentPaths, key: str) -> list[Path]:
    """The files of one trial; the summary (trials/<key>.parquet) is written last and marks it done."""
    return [paths.trial_history(key), paths.trial_predictions(key), paths.trial(key)]


def summary_problem(paths: ExperimentPaths, key: str) -> str:
    """'' when the trial's summary is whole and its own (one row, its key, every metric in [0, 1]), else what is
    wrong ('missing' when never run). What the report needs: it reads predictions where there are any."""
    path = paths.trial(key)
    if not path.exists():
        return "missing"
    problem = parquet_problem(path)
    if problem:
        return f"{path}: {problem}"
    summary = pd.read_parquet(path)
    if "trial_key" not in summary:
        return f"{path}: no trial_key column"
    if len(summary) != 1 or summary["trial_key"].iloc[0] != key:
        return f"{path}: holds {sorted(set(summary['trial_key']))[:2]}, not trial {key} alone"
    bad = [f"{m} {summary[m].iloc[0]}" for m in METRICS if m in summary and not 0 <= summary[m].iloc[0] <= 1]
    return f"{path}: {', '.join(bad)} outside [0, 1]" if bad else ""  # NaN fails the comparison too


def trial_problem(paths: ExperimentPaths, key: str) -> str:
    """'' when the trial's summary is its own (summary_problem) and its history and predictions are whole too,
    else what is wrong ('missing' when never run): classify runs the trial again unless it is ''."""
    problem = summary_problem(paths, key)
    if problem:
        return problem
    for path in trial_outputs(paths, key)[:2]:  # history, predictions
        problem = parquet_problem(path)
        if problem:
            return f"{path}: {problem}"
    return ""
