"""Tiny offline fixtures for tests and the benchmark: a demo manifest and a fake synthetic table.
(Calibrated random-init backbone weights, which the demo uses too, live in model.py.)
"""
from __future__ import annotations

import pandas as pd

from ooc_ray.config import ExperimentConfig
from ooc_ray.io import write_parquet
from ooc_ray.paths import ExperimentPaths


def write_fake_synthetic(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame,
                         extra: int = 1, size: int | None = None) -> pd.DataFrame:
    """Demo-style images standing in for the sample stage: one pool per (fold or "all", weight, class),
    big enough for synthetic-only (the class's training count) plus `extra`. Writes synthetic.parquet."""
    from ooc_ray.data import class_names
    from ooc_ray.demo_data import make_image

    size = size or cfg.data.demo.size
    classes = class_names(manifest)
    folds = ["all"] if cfg.generator.split == "all" else [str(f) for f in range(cfg.folds.k)]
    rows = []
    for f_i, fold in enumerate(folds):
        train = manifest if fold == "all" else manifest[manifest["fold"] != int(fold)]
        for w_i, weight in enumerate(cfg.sample.weights):
            for c, label in enumerate(classes):
                n = int((train["label_index"] == c).sum()) + extra
                for i in range(n):
                    seed = 7_000_000 + f_i * 100_000 + w_i * 10_000 + c * 1_000 + i  # stable across processes
                    out = paths.synthetic / f"fold{fold}" / f"w{weight:g}" / label / f"{i:04d}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    if not out.exists():
                        make_image(label, i % 3, size, False, seed).save(out)
                    rows.append({"id": f"syn-{fold}-{weight:g}-{label}-{i:04d}", "path": str(out.resolve()),
                                 "label": label, "group": "", "fold": fold, "lora_key": f"lora-{fold}-{label}",
                                 "weight": float(weight), "seed": seed})
    table = pd.DataFrame(rows)
    write_parquet(table, paths.synthetic_table)
    return table


def make_tiny_experiment(cfg: ExperimentConfig, paths: ExperimentPaths):
    """Demo data (manifest + folds, via the data stage) and a fake synthetic table; returns both tables."""
    from ooc_ray.data import run_data

    manifest = run_data(cfg, paths)
    return manifest, write_fake_synthetic(cfg, paths, manifest)

