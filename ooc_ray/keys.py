"""Every artifact key, derived in this one module (docs/design.md: Provenance).

A key = sha256(the config fields that can change the artifact's numbers, the content digests of every input it
reads). Which config fields count is read from the fields' own roles (ooc_ray.config: result/input/grid/
resource), never from a list kept here; inputs are addressed by content: images by sha256, LoRAs by their tensor
digest, synthetic pools by their images' digests, trials by their exact training and test sets. So a result is
re-used only when everything it was computed from is byte-identical, and two processes (any PYTHONHASHSEED,
any machine) derive the same key: canonical JSON with sorted keys, no sets, no Python hash().
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ooc_ray.roles import RESOURCE, RESULT

KEY_LENGTH = 16  # hex digits: 64 bits, no accidental collision among the ~1e4 artifacts of a large grid


def canonical(value: Any) -> Any:
    """A JSON-able value that is equal for equal content: dataclasses -> dicts, tuples -> lists,
    numpy scalars -> Python numbers, paths -> strings. Sets are refused (their order is not stable)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        raise TypeError("keys: sets have no stable order; pass a sorted list")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # JSON has no NaN; pandas reads a missing weight as NaN
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"keys: cannot derive a key from a {type(value).__name__}")


def _hash_json(value: Any, length: int) -> str:
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def digest(*parts: Any, length: int = KEY_LENGTH) -> str:
    return _hash_json(canonical(list(parts)), length)


def config_slice(cfg: Any, artifact: str, prefix: str = "") -> dict:
    """{dotted field: value} of every `result` field of `cfg` (a config or a section) that feeds `artifact`,
    less the fields whose `only_if` condition does not hold."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("role") == "section":
            out.update(config_slice(value, artifact, f"{prefix}{f.name}."))
            continue
        if f.metadata.get("role") != RESULT or artifact not in f.metadata["feeds"]:
            continue
        only_if = f.metadata.get("only_if")
        if only_if and getattr(cfg, only_if[0]) != only_if[1]:
            continue
        if f.metadata.get("keyed_when_set") and value == f.default:
            continue
        out[prefix + f.name] = canonical(value)
    return out


def table_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """Content digest of a table's `columns`, independent of row order (rows sorted by all columns)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"keys: table lacks column(s) {missing}")
    # Column by column, canonical() only where a value is not a plain str, and the rows not passed through
    # canonical() a second time: the same JSON bytes as digest(columns, rows), 6x faster (a trial key hashes its
    # whole training set: the 65 keys at 100x the paper's data took 141 s, now 23 s; benchmarks/bench_scale.py).
    values = []
    for column in columns:
        cells = frame[column].tolist()  # Python scalars, as the row iteration gave them
        values.append(cells if all(type(v) is str for v in cells) else [canonical(v) for v in cells])
    rows = sorted(zip(*values)) if values else [()] * len(frame)  # tuples: JSON arrays, as canonical's lists
    return _hash_json([canonical(columns), rows], 64)


# ---------------------------------------------------------------------------------------------- artifacts
# Image identity in every key below: (id, sha256): a file replaced in place (same path, new bytes) changes it.
IMAGE_COLUMNS = ["id", "sha256"]
LABELLED_COLUMNS = ["id", "sha256", "label"]


def fold_columns(manifest: pd.DataFrame) -> list[str]:
    """The manifest's fold assignments, one column per repeat of the k-fold CV: `fold` (the first repeat, as before
    repeats existed), then `fold_r1`, `fold_r2`, ..."""
    repeats = sorted(int(c[len("fold_r"):]) for c in manifest.columns if c.startswith("fold_r"))
    return ["fold"] + [f"fold_r{r}" for r in repeats]


def data_digest(manifest: pd.DataFrame) -> str:
    """What a report describes: every image's id, bytes and label (what every trial reads, as training or
    held-out image; groups only act through the folds, which each trial's key holds)."""
    return table_digest(manifest, LABELLED_COLUMNS)


def lora_key(cfg: Any, base_id: str, prompt: str, images: pd.DataFrame, labelled: bool = False) -> str:
    """One LoRA: the generator's result fields, the base model's identity, its prompt and training images (with
    their labels when each image's caption is its class's prompt: generator.scope dataset)."""
    return digest("lora", config_slice(cfg, "lora"), base_id, prompt,
                  table_digest(images, LABELLED_COLUMNS if labelled else IMAGE_COLUMNS))


def pool_key(cfg: Any, base_id: str, lora_weights_sha256: str, init_images: pd.DataFrame | None) -> str:
    """A synthetic pool folder (one LoRA, every weight): sampling's result fields, the base, the LoRA's tensors,
    and for img2img the images it starts from. Image i of the pool is a pure function of this key, weight, i."""
    init = table_digest(init_images, IMAGE_COLUMNS) if init_images is not None else None
    return digest("pool", config_slice(cfg, "image"), base_id, lora_weights_sha256, init)


def features_key(cfg: Any, weights_id: str, views: int) -> str:
    """A backbone-feature cache: the backbone's result fields and weights; `views` is the number of views the
    cache really holds (1 without augmentation, whatever classify.feature_views says)."""
    fields = {k: v for k, v in config_slice(cfg, "features").items() if not k.endswith("feature_views")}
    return digest("features", fields, weights_id, views)


# Exact-mode loss_weighted trials on TensorFlow took their second and later epochs' synthetic order from a
# read-ahead that depended on CPU load until this version (ooc_ray.backend.tensorflow_ops._train_images): their
# keys carry it, so none computed before is re-used.
LOSS_WEIGHTED_EXACT_FEED = 2


def trial_key(cfg: Any, point: dict, classes: list[str], train: pd.DataFrame, test: pd.DataFrame,
              weights_id: str) -> str:
    """One classifier trial: its grid point, the classifier's result fields and weights, the class order, and
    its exact training set (ids, bytes, labels, real/synthetic) and held-out set."""
    train_digest = table_digest(train, LABELLED_COLUMNS + ["source"])
    cc = cfg.classify
    feed = (("feed", LOSS_WEIGHTED_EXACT_FEED),) if (cc.mode, cc.mixing, cc.backend) == (
        "exact", "loss_weighted", "tensorflow") else ()
    return digest("trial", point, config_slice(cfg, "trial"), weights_id, list(classes), train_digest,
                  table_digest(test, LABELLED_COLUMNS), *feed)


def quality_key(cfg: Any, features: str, manifest: pd.DataFrame, synthetic: pd.DataFrame, version: int) -> str:
    """The quality tables: their settings, the features they read (the cache's key or the statistics' version),
    the real images with their folds, the synthetic pools and the version of the table's measures."""
    real = table_digest(manifest, LABELLED_COLUMNS + fold_columns(manifest))
    pools = table_digest(synthetic, LABELLED_COLUMNS + ["fold", "weight"])
    return digest("quality", config_slice(cfg, "quality"), features, real, pools, version)


def search_trial_key(cfg: Any, point: dict, lora_keys: list[str], test: pd.DataFrame, features: str) -> str:
    """One LoRA-search trial: its point (LoRA settings, weight), its LoRAs (which hold their images), sampling
    and scoring settings, and the held-out images it is scored on."""
    # The LoRA weight it samples with: the point's, else the config's first (sample.weights is a grid field, in
    # no slice: a search without it in its space keyed weights 1.0 and 0.5 alike).
    weight = [] if "sample.weights" in point else ["weight", cfg.sample.weights[0]]
    return digest("search", point, list(lora_keys), config_slice(cfg, "image"), config_slice(cfg, "search"),
                  features, table_digest(test, LABELLED_COLUMNS), *weight)


def settings_digest(cfg: Any) -> str:
    """Every setting of a config but its resources (where and how fast work runs): what a report was made with,
    so that `ooc-ray status` can tell a report of the current settings from one of earlier settings."""
    def settings(section: Any) -> dict:
        out = {}
        for f in dataclasses.fields(section):
            value, role = getattr(section, f.name), f.metadata.get("role")
            if role == "section":
                out[f.name] = settings(value)
            elif role != RESOURCE:
                out[f.name] = canonical(value)
        return out
    return digest("settings", settings(cfg))


def sample_settings(cfg: Any) -> str:
    """What a synthetic table was sampled with: every generator and sampling setting but resources, the share of
    real images its LoRAs learn from, the group column. The sample stage writes it into each row, and classify,
    quality and report refuse a table of other settings (one sampled before a setting changed)."""
    return digest("sample-settings", settings_digest(cfg.generator), settings_digest(cfg.sample),
                  cfg.classify.real_fraction, cfg.data.group_column, length=16)


def search_run_key(cfg: Any, base_id: str, weights_id: str, manifest: pd.DataFrame) -> str:
    """One LoRA search (its Ray Tune experiment, which a re-run restores): everything but resources of the
    search section (the space, the objective, the budget), what its trials compute with, and the data."""
    definition = {f.name: canonical(getattr(cfg.search, f.name)) for f in dataclasses.fields(cfg.search)
                  if f.metadata.get("role") != RESOURCE}
    slices = [config_slice(cfg, artifact) for artifact in ("lora", "image", "features", "search")]
    # Below 1 the fraction picks each trial's LoRA images, and searches before 2026-12-06 took it twice (8 images
    # where search.images_per_class said 16 at 0.5): such a search, finished, must not be re-used. At 1 nothing
    # differed, so those keys stand.
    fraction = [] if cfg.classify.real_fraction == 1 else ["real_fraction taken once", cfg.classify.real_fraction]
    # The weight the trials sample with where the space does not vary it (search_trial_key).
    weight = [] if any(name == "sample.weights" for name, _, _ in cfg.search.space) else ["weight", cfg.sample.weights[0]]
    return digest("search-run", definition, slices, base_id, weights_id, data_digest(manifest), *fraction, *weight)
