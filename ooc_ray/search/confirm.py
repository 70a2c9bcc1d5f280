"""The search's confirmation: the best point against the config's own settings on folds the search never scored
on (a best trial is selected partly for its folds' noise; these folds are data it never saw), each a whole trial
per (fold, settings), compared with the report's corrected paired t-test and TOST, and a verdict."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ooc_ray.backbones import BackboneWeights
from ooc_ray.comparisons import corrected_t, equivalence, verdict
from ooc_ray.config import ExperimentConfig
from ooc_ray.data import load_manifest
from ooc_ray.diffusion.base import BaseModel
from ooc_ray.io import write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.raycluster import init_ray, wait_all
from ooc_ray.search.space import default_point
from ooc_ray.search.trial import better_sign, fold_part


def held_out_ratio(manifest: pd.DataFrame, folds: list[int], cfg: ExperimentConfig) -> float:
    """n_test / n_train of the folds (their mean), n_train the images a fold's LoRAs and probe learn from
    (fold_part: at most search.images_per_class per class), as the report counts a trial's real training images:
    the corrected t's variance correction. (The whole training fold gave 1/3 where 16 images per class give ~1.)"""
    parts = [fold_part(manifest, fold, cfg.search, cfg.classify.real_fraction) for fold in folds]
    return float(np.mean([len(part.test) / len(part.subset) for part in parts]))


def compare(table: pd.DataFrame, cfg: ExperimentConfig, ratio: float) -> dict:
    """The paired comparison of `table` (fold, settings best|default, score): the mean gain of the best point
    (sign-adjusted: > 0 is better whatever the objective's direction), the corrected t and TOST, the verdict."""
    scores = table.pivot(index="fold", columns="settings", values="score")
    gain = (better_sign(cfg.search.objective) * (scores["best"] - scores["default"])).to_numpy()
    margin = cfg.report.equivalence_margin
    test, tost = corrected_t(gain, ratio), equivalence(gain, ratio, margin)
    return {"folds": [int(f) for f in scores.index], "best_mean": float(scores["best"].mean()),
            "default_mean": float(scores["default"].mean()), "gain_mean": float(gain.mean()),
            "gain_ci": [test["ci_low"], test["ci_high"]], "corrected_p": test["p"], "tost_p": tost["p"],
            "margin": margin, "undefined": test["undefined"], "best_better_folds": int((gain > 0).sum()),
            "verdict": verdict(float(gain.mean()), test["p"], tost["p"], margin, test["undefined"])}


def confirm(cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel, weights: BackboneWeights,
            best: dict, folds: list[int], task) -> dict:
    """Score the best point and the defaults on each confirmation fold (Ray tasks of `task`, a whole trial each,
    with the search trials' resources); writes search/confirm.parquet, returns the comparison."""
    init_ray(cfg)
    s = cfg.search
    points = {"best": best, "default": default_point(cfg)}
    # Settings-major: the two points share their LoRAs when the search space holds only sampling settings, and
    # tasks start in this order, so (fold, best) and (fold, default) running at once would train one LoRA twice
    # (search.trial saves whichever finishes first); one fold per point first, the other point re-uses them.
    runs = [(fold, settings, point) for settings, point in points.items() for fold in folds]
    request = {"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial}
    done = wait_all(cfg, [task.remote(point, cfg, paths, base, weights, [fold]) for fold, _, point in runs], request,
                    "search: confirmation")
    table = pd.DataFrame([{"fold": fold, "settings": settings, "score": float(row["score"]),
                           "search_key": row["search_key"]} for (fold, settings, _), row in zip(runs, done)])
    write_parquet(table, paths.search / "confirm.parquet")
    return {**compare(table, cfg, held_out_ratio(load_manifest(paths), folds, cfg)), "default_point": points["default"]}
