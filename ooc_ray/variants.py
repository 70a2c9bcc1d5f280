"""Variants: every combination of an experiment's axis values (and generation replicates), each a whole config.

The one owner of variants. A stage that makes a variant's own tables (pretrain, finetune, sample, quality)
iterates them through `each_variant`, which gives each its config and its folder (variants/<tag>/, the
experiment's own folder without axes); a stage that cannot run variants refuses a config with axes by name
(`refuse_axes`). What variants share (a base, a LoRA, a pool, a trial) is keyed by content and made once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ooc_ray.config import REPLICATE_SEED_STEP, ExperimentConfig
from ooc_ray.fields import format_value, with_value
from ooc_ray.errors import ConfigError
from ooc_ray.paths import ExperimentPaths


@dataclass(frozen=True)
class Variant:
    """One combination of axis values (and generation replicate): its point and its whole config."""

    point: tuple[tuple[str, Any], ...]  # ((dotted field or "replicate", value), ...); () without axes
    cfg: ExperimentConfig

    @property
    def tag(self) -> str:
        """A folder-safe name: "" without axes (the experiment's own files), else e.g. sample.cfg=2__replicate=1."""
        parts = [f"{name}={format_value(value)}" for name, value in self.point]
        return "__".join("".join(c if c.isalnum() or c in "._=+-" else "-" for c in part) for part in parts)

    @property
    def label(self) -> str:
        return ", ".join(f"{name} = {format_value(value)}" for name, value in self.point)


def variants(cfg: ExperimentConfig) -> list[Variant]:
    """Every combination of cfg.axes values x sample.replicates, in file order (the last axis varies fastest),
    each a config with those values set and no axes of its own. Without axes or replicates: one variant, the
    config itself."""
    points: list[tuple] = [()]
    for dotted, values in cfg.axes:
        points = [p + ((dotted, v),) for p in points for v in values]
    if cfg.sample.replicates > 1:
        points = [p + (("replicate", r),) for p in points for r in range(cfg.sample.replicates)]
    out = []
    for point in points:
        vcfg = with_value(cfg, "axes", ())
        for name, value in point:
            if name == "replicate":
                vcfg = with_value(vcfg, "sample.seed", vcfg.sample.seed + REPLICATE_SEED_STEP * value)
            else:
                vcfg = with_value(vcfg, name, value)
        out.append(Variant(point, vcfg))
    return out


def each_variant(cfg: ExperimentConfig, paths: ExperimentPaths) -> Iterator[tuple[Variant, ExperimentPaths]]:
    """(variant, the paths of its tables) for every variant of `cfg`; the experiment's own paths without axes."""
    for variant in variants(cfg):
        yield variant, paths.for_variant(variant.tag)


def per_variant(cfg: ExperimentConfig, results: list) -> Any:
    """A stage's return value: the one result of a config without axes (its files are the experiment's own), the
    list of every variant's results (in variant order) with them."""
    return results if cfg.axes or cfg.sample.replicates > 1 else results[0]


def refuse_axes(cfg: ExperimentConfig, what: str) -> None:
    """A stage that runs one config refuses a config with axes or replicates, naming them: given the base
    config alone it would silently make the base config's artifacts only."""
    if cfg.axes or cfg.sample.replicates > 1:
        named = ", ".join([name for name, _ in cfg.axes] + (["sample.replicates"] if cfg.sample.replicates > 1 else []))
        raise ConfigError(f"{what} runs one config, and this one has axes ({named}); pass one variant's config "
                          "(variants.variants) or run the stage through `ooc-ray`")
