"""A search's points: its space as Ray Tune distributions, a point applied to a config, the config's own settings
as a point, and which folds the search scores on and which it leaves for the confirmation."""
from __future__ import annotations

import dataclasses

import pandas as pd
from ray import tune

from ooc_ray.config import ExperimentConfig, confirmation_folds
from ooc_ray.fields import value_of, with_values
from ooc_ray.folds import fold_ids

WEIGHT = "sample.weights"  # in a search, the one LoRA weight a point samples with


def tune_space(space: tuple) -> dict:
    """{dotted field: Tune distribution} of search.space."""
    made = {"choice": lambda v: tune.choice(list(v)), "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # randint's upper end is exclusive in Tune
    return {name: made[kind](values) for name, kind, values in space}


def point_of(space: tuple, params: dict) -> dict:
    """The trial's point, {dotted field: value} in space order, as plain Python values."""
    return {name: (params[name].item() if hasattr(params[name], "item") else params[name]) for name, _, _ in space}


def point_config(cfg: ExperimentConfig, point: dict) -> ExperimentConfig:
    """The config a search trial computes with: the point's values set, one LoRA per (fold, class) trained on
    the fold's training images (split fold), and one LoRA weight (the point's, else the first of sample.weights)."""
    cfg = with_values(cfg, {WEIGHT: cfg.sample.weights[0], **point})
    generator = dataclasses.replace(cfg.generator, split="fold", per_group=False, scope="class")
    return dataclasses.replace(cfg, generator=generator)


def default_point(cfg: ExperimentConfig) -> dict:
    """The config's own settings as a point of its space: what the best point has to beat."""
    return {name: (cfg.sample.weights[0] if name == WEIGHT else value_of(cfg, name)) for name, _, _ in cfg.search.space}


def outside(space: tuple, point: dict) -> list[str]:
    """The dimensions whose value in `point` the space cannot propose ("generator.rank = 8"), none if it can."""
    out = []
    for name, kind, values in space:
        value = point[name]
        inside = value in values if kind == "choice" else values[0] <= value <= values[1]
        if not inside:
            out.append(f"{name} = {value}")
    return out


def max_epochs(cfg: ExperimentConfig) -> int:
    """The most LoRA epochs a trial of this space trains (the schedulers' time axis ends there)."""
    for name, kind, values in cfg.search.space:
        if name == "generator.epochs":
            return int(max(values))
    return cfg.generator.epochs


def split_folds(cfg: ExperimentConfig, manifest: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(the folds every trial trains and scores on, the confirmation folds the search never scores on)."""
    ids = fold_ids(manifest)
    confirm = list(cfg.search.confirm_folds) or confirmation_folds(ids)
    return list(cfg.search.folds) or [f for f in ids if f not in confirm], confirm


def describe(point: dict) -> str:
    return " ".join(f"{name.split('.')[-1]}={value:.3g}" if isinstance(value, float) else f"{name.split('.')[-1]}={value}"
                    for name, value in point.items())
