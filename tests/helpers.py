"""Builders for the tests: one manifest builder, fakes built from the real table schemas, and the experiment files
loaded as `--tiny` loads them (tiny_experiment), with each group of tests' differences named.

Tables come out in the shape the stages write them (manifest columns + fold; sample.TABLE_COLUMNS with integer
folds, ALL_FOLDS = -1 for split "all"), so no production code needs a branch for test data."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig
from ooc_ray.load import load_config
from ooc_ray.data import MANIFEST_COLUMNS
from ooc_ray.demo_data import make_image
from ooc_ray.folds import ALL_FOLDS, fold_ids, train_rows
from ooc_ray.io import write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.sample import TABLE_COLUMNS as SYNTHETIC_COLUMNS

LABELS = ("good", "bad", "acceptable", "other")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_manifest(per_class=(4, 4), k: int = 2, root: Path | None = None, size: int = 32, groups=("",),
                  labels=LABELS, fold_seed: int | None = None) -> pd.DataFrame:
    """A manifest with its `fold` column. With `root`, real PNGs (class i = a brightness level + noise) are
    written under root/images and hashed; without, paths and digests are names only (pure-pandas tests).
    Folds: image j of a class is in fold j % k, or a seeded permutation of that with fold_seed."""
    rng = np.random.default_rng(0)
    rows = []
    for li, n in enumerate(per_class):
        label = labels[li]
        folds = np.arange(n) % k
        if fold_seed is not None:
            folds = np.random.default_rng([fold_seed, li]).permutation(folds)
        for j in range(n):
            image_id = f"{label}-{j:03d}"
            if root is None:
                path, sha = f"/data/{label}/{j:03d}.png", _sha(image_id)
            else:
                arr = np.clip(40 + 150 * li + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                path = Path(root) / "images" / label / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
                path, sha = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append({"id": image_id, "path": path, "file": f"{label}/{Path(path).name}", "label": label,
                         "label_index": li, "group": groups[(j // k) % len(groups)], "sha256": sha, "size": 0,
                         "width": size, "height": size, "mode": "RGB", "fold": int(folds[j])})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["fold"])


def write_unlabeled(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    """n images drawn like helpers.make_manifest's classes (dark / bright + noise), other seed, no labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.clip(40 + 150 * (i % 2) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"u{i:03d}.png")
    return folder


def write_manifest(manifest: pd.DataFrame, paths: ExperimentPaths) -> None:
    """A manifest with its `fold` column -> manifest.parquet + folds.parquet, as the data stage writes them."""
    write_parquet(manifest.drop(columns="fold"), paths.manifest)
    write_parquet(manifest[["id", "fold"]], paths.folds)


def fake_synthetic(manifest: pd.DataFrame, weights=(1.0,), split: str = "fold", extra: int = 1,
                   root: Path | None = None, size: int = 32) -> pd.DataFrame:
    """A synthetic table in sample.TABLE_COLUMNS standing in for the sample stage: one pool per (fold, or
    ALL_FOLDS for split "all"; weight; class), big enough for synthetic only plus `extra`. With `root`, the
    images are demo drawings of their class (learnable), written and hashed; else names only."""
    classes = manifest.sort_values("label_index")["label"].unique().tolist()
    folds = [ALL_FOLDS] if split == "all" else fold_ids(manifest)
    rows = []
    for f_i, fold in enumerate(folds):
        train = train_rows(manifest, fold)
        for w_i, weight in enumerate(weights):
            for c, label in enumerate(classes):
                for i in range(int((train["label"] == label).sum()) + extra):
                    seed = 7_000_000 + f_i * 100_000 + w_i * 10_000 + c * 1_000 + i  # stable across processes
                    image_id = f"syn-{fold}-{weight:g}-{label}-{i:04d}"
                    path, sha = f"/syn/{fold}/{weight:g}/{label}/{i:04d}.png", _sha(image_id)
                    if root is not None:
                        out = Path(root) / "synthetic" / f"fold{fold}" / f"w{weight:g}" / label / f"{i:04d}.png"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        if not out.exists():
                            make_image(label if label in ("good", "acceptable", "bad") else "bad", i % 3, size,
                                       False, seed).save(out)
                        path, sha = str(out.resolve()), hashlib.sha256(out.read_bytes()).hexdigest()
                    rows.append({"id": image_id, "path": path, "sha256": sha, "label": label, "group": "",
                                 "fold": fold, "lora_key": f"lora-{fold}-{label}", "weight": float(weight),
                                 "index": i, "seed": seed})
    return pd.DataFrame(rows).reindex(columns=SYNTHETIC_COLUMNS)


REPO = Path(__file__).resolve().parents[1]

# The classifier tests' differences from the demo in tiny mode (config.TINY + demo.yaml's tiny: section): a
# small EfficientNetB0 with random weights, cached features of two views, real + 50 % synthetic.
CLASSIFY_TESTS = {"data.demo.size": 40, "folds.strategy": "stratified", "classify.backbone": "EfficientNetB0",
                  "classify.weights": "random",
                  "classify.epochs": 2, "classify.ratios": [0.0, 0.5], "classify.mode": "cached"}
CACHED_VIEWS = 2  # classify.feature_views in cached mode (exact mode refuses it: it is read only there)


def tiny_experiment(root: Path, file: str = "demo", **dotted) -> ExperimentConfig:
    """experiments/<file>.yaml as `--tiny` loads it, results under `root`, then the dotted overrides."""
    overrides = [f"results_dir={root}"] + [f"{key}={json.dumps(value)}" for key, value in dotted.items()]
    return load_config(REPO / "experiments" / f"{file}.yaml", overrides, tiny=True)


def classify_cfg(root: Path, name: str = "grid", per_class=(8, 6, 4), **classify) -> ExperimentConfig:
    """The demo in tiny mode with CLASSIFY_TESTS: three demo classes, one LoRA weight; `classify` updates."""
    if classify.get("mode", CLASSIFY_TESTS["classify.mode"]) == "cached":
        classify = {"feature_views": CACHED_VIEWS, **classify}
    return tiny_experiment(root, name=name, **{"data.demo.per_class": list(per_class), **CLASSIFY_TESTS,
                                               **{f"classify.{key}": value for key, value in classify.items()}})


# The generator tests' differences from the demo in tiny mode: they write their own two-class manifests and
# train on the untrained tiny base (no pretraining); LoRAs that change images visibly in 2 epochs; sampling with
# the LoRA-weight-0.0 control and guidance on.
GENERATOR_TESTS = {"name": "t", "generator.epochs": 2, "generator.unet_lr": 1e-3, "generator.text_encoder_lr": 1e-3,
                   "generator.rank": 4, "generator.alpha": 4.0, "generator.unet_modules": "attention",
                   "generator.pretrain.source": "", "sample.weights": [1.0, 0.0], "sample.cfg": 7.0,
                   "sample.batch_size": 4, "classify.ratios": [0.0, 0.5]}  # + synthetic_only: pools of 1.0 x n_train


def tiny_cfg(root: Path, **sections) -> ExperimentConfig:
    """The demo in tiny mode with GENERATOR_TESTS, results under root/results; `sections` set fields per section
    (a mapping given for a section, such as generator={"pretrain": {...}}, sets its fields, as extends merges)."""
    def leaves(key: str, value) -> dict:  # generator={"pretrain": {...}}: each field, over GENERATOR_TESTS'
        return ({k: v for inner, item in value.items() for k, v in leaves(f"{key}.{inner}", item).items()}
                if isinstance(value, dict) else {key: value})

    dotted = {k: v for section, values in sections.items() for k, v in leaves(section, values).items()}
    return tiny_experiment(root / "results", **{**GENERATOR_TESTS, **dotted})


def demo_experiment(cfg: ExperimentConfig) -> tuple[ExperimentPaths, pd.DataFrame, pd.DataFrame]:
    """The data stage on the config's demo set, and a learnable fake synthetic table written as the sample
    stage would; returns (paths, manifest, synthetic)."""
    from ooc_ray.data import run_data

    paths = ExperimentPaths.of(cfg)
    manifest = run_data(cfg, paths)
    synthetic = fake_synthetic(manifest, cfg.sample.weights, cfg.generator.split, root=paths.root,
                               size=cfg.data.demo.size).assign(sample_settings=keys.sample_settings(cfg))
    write_parquet(synthetic, paths.synthetic_table)
    return paths, manifest, synthetic


def calibrated_experiment(root: Path, cfg: ExperimentConfig) -> tuple:
    """demo_experiment and an EfficientNetB0 with calibrated BatchNorms at 32 px (its weights file): the tiny
    classifier tests' fixture. Returns (root, paths, manifest, synthetic, weights path)."""
    from ooc_ray.networks import write_calibrated_weights

    paths, manifest, synthetic = demo_experiment(cfg)
    path = write_calibrated_weights(paths.models / "b0.weights.h5", "EfficientNetB0", 32, manifest["path"].tolist())
    return root, paths, manifest, synthetic, str(path)


TRAINED_PARTS = ("models", "lora", "synthetic")  # what a run can re-use by content: pretrained base, LoRAs, pools


def seed_trained_state(trained: Path, out: Path) -> None:
    """Copy another run's trained parts (conftest's trained_small_cpu) into `out`, an experiment's results
    folder, before it runs: it re-uses what its own keys name and makes the rest."""
    for part in TRAINED_PARTS:
        if (trained / part).exists():
            shutil.copytree(trained / part, out / part, dirs_exist_ok=True)
