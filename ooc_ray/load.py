"""Reading an experiment file: YAML -> ooc_ray.config's frozen dataclasses, every value checked when it loads.

An experiment file may start from another (`extends: other.yaml`, one level, merged before the file's own
differences); `--tiny` applies config.TINY and the file's own `tiny:` mapping; `-o key=value` overrides come last.
Unknown keys, wrong types, values outside a field's choices or bounds, and combinations that cannot run are
ConfigErrors naming every bad dotted key at once, so a typo like `clasify.epochs` never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ooc_ray.config import (EFFICIENTNET_BLOCKS, EFFICIENTNETS, INPUT, RESOURCE, RESULT, SPECIAL_WEIGHTS, TINY,
                            ClassifyConfig, DISTRIBUTIONS, ExperimentConfig, GeneratorConfig)
from ooc_ray.errors import ConfigError
from ooc_ray.fields import field_of, with_values
from ooc_ray.variants import variants

# Where an axis may vary a field: what makes or uses synthetic images. Data and folds stay fixed, so every
# variant is tested on the same held-out images and the variants' tables can be compared row by row.
AXIS_SECTIONS = ("generator.", "sample.", "classify.")
AXIS_GRID_FIELDS = ("generator.split", "generator.per_group", "generator.scope")
EXTENDS = "extends"
SINGULAR = {"controls": "control", "weights": "LoRA weight", "ratios": "ratio", "classes": "class",
            "augment": "augmentation"}  # for "a ratio is listed twice"


# ---------------------------------------------------------------------------------------------- types


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build(hint, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), key)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # YAML reads "5e-4" (no dot) as a string: accept numeric strings for floats only.
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + u for u in unknown)} "
            f"(allowed under '{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- checks


def bound_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every value of `cfg` outside the bounds its field declares (config: ge, gt, le, lt, unique), one line each
    naming the key, the value and the bound."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, key, meta = getattr(cfg, f.name), prefix + f.name, f.metadata
        if meta.get("role") == "section":
            problems += bound_problems(value, key + ".")
            continue
        bounds = meta.get("bounds", {})
        values = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        bad = [v for v in numbers if not _inside(v, bounds)]
        if bad:
            shown = bad[0] if not isinstance(value, tuple) else list(value)
            rule = (f"need at least {bounds['ge']:g}" if set(bounds) - {"unique"} == {"ge"}
                    else f"must be {_range_text(bounds)}")
            problems.append(f"{key}: {rule}, got {shown!r}")
        if bounds.get("unique") and len(set(values)) != len(values):
            twice = sorted({repr(v) for v in values if values.count(v) > 1})
            noun = SINGULAR.get(f.name, "value")
            problems.append(f"{key}: a {noun} is listed twice ({', '.join(twice)} in {list(value)})")
    return problems


def _inside(v: float, bounds: dict) -> bool:
    return (v >= bounds.get("ge", -math.inf) and v > bounds.get("gt", -math.inf)
            and v <= bounds.get("le", math.inf) and v < bounds.get("lt", math.inf))


def _range_text(bounds: dict) -> str:
    """'in (0, 1]' for two bounds, '>= 1' for one."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"


def _prompt_problem(key: str, template: str) -> list[str]:
    try:
        template.format(label="label", group="group")
    except (KeyError, IndexError, ValueError) as exc:
        return [f"{key}: {template!r} has a bad placeholder ({exc}); use {{label}} and {{group}}"]
    return []


def _backbone_problems(cc: ClassifyConfig) -> list[str]:
    """A backbone that trains must run where it trains: only exact mode trains anything but the head."""
    if cc.backbone == "SmallCNN":
        return ([] if cc.mode == "exact" else
                ["classify.backbone: SmallCNN is trained from scratch in every trial; it needs classify.mode: exact "
                 "(cached mode trains the head only)"]) + (
                [f"classify.weights: {cc.weights!r} does not exist for SmallCNN; use none (trained from scratch) "
                 "or a .weights.h5 file"] if cc.weights in ("imagenet", "calibrated") else []) + (
                ["classify.train_backbone: SmallCNN trains all of its layers; leave it at 0"]
                if cc.train_backbone else [])
    problems = []
    if cc.train_backbone and cc.backbone not in EFFICIENTNETS:
        problems.append(f"classify.train_backbone: training top blocks is built for EfficientNetB0-B7 (whose blocks "
                        f"it names), not {cc.backbone}; leave it at 0 (frozen backbone)")
    if cc.weights == "calibrated" and cc.backbone.startswith("ConvNeXt"):
        problems.append(f"classify.weights: 'calibrated' sets BatchNorm statistics and {cc.backbone} has no BatchNorm "
                        "(it uses LayerNorm); use imagenet, none or a .weights.h5 file")
    if cc.train_backbone > EFFICIENTNET_BLOCKS:
        problems.append(f"classify.train_backbone: {cc.train_backbone} is not a number of blocks in "
                        f"0..{EFFICIENTNET_BLOCKS}")
    if cc.train_backbone and cc.mode != "exact":
        problems.append("classify.train_backbone: training backbone blocks needs classify.mode: exact (cached mode "
                        "trains the head on frozen features)")
    return problems


def _pretrain_problems(gc: GeneratorConfig) -> list[str]:
    """The tiny base has a random VAE, which decodes any latent to noise: it must be trained; a real base's
    VAE already reconstructs and is kept (the UNet alone adapts to the domain)."""
    if not gc.pretrain.source:
        return []
    if gc.base == "tiny" and gc.pretrain.vae_steps == 0:
        return ["generator.pretrain.vae_steps: the tiny base's VAE has random weights; pretraining must train it "
                "first (vae_steps > 0; the demo uses 800)"]
    if gc.base != "tiny" and gc.pretrain.vae_steps:
        return [f"generator.pretrain.vae_steps: {gc.base!r} keeps its trained VAE; set vae_steps: 0"]
    return []


def _search_problems(cfg: ExperimentConfig) -> list[str]:
    """The search's folds: real fold ids, the scored and the confirmation folds apart, at least one scored."""
    s, n = cfg.search, cfg.folds.k * cfg.folds.repeats
    found = [f"search.{name}: fold {f} does not exist (folds.k x folds.repeats = {n}: folds 0..{n - 1})"
             for name in ("folds", "confirm_folds") for f in getattr(s, name) if f >= n]
    if set(s.folds) & set(s.confirm_folds):
        found.append(f"search.folds / search.confirm_folds: {sorted(set(s.folds) & set(s.confirm_folds))} in both; "
                     "the confirmation needs folds the search never scored on")
    if s.confirm_folds and not s.folds and len(s.confirm_folds) >= n:
        found.append("search.confirm_folds: every fold; none is left for the search to score on")
    if s.scheduler != "none" and s.report_every == 0:
        found.append(f"search.scheduler: {s.scheduler} stops trials at their reports, and search.report_every is 0 "
                     "(one report, at the end); set report_every (LoRA epochs) or scheduler: none")
    return found


def problems(cfg: ExperimentConfig) -> list[str]:
    """Everything wrong with a config that its types cannot express, one line per problem naming its key."""
    s, cc, gc = cfg.sample, cfg.classify, cfg.generator
    found = bound_problems(cfg)
    checks = [
        (bool(s.weights), "sample.weights: need at least one LoRA weight"),
        (s.clip_sample == 0.0 or s.sampler == "ddim",
         f"sample.clip_sample: {s.sampler} cannot clip its predicted latent; use sample.sampler: ddim"),
        (bool(cfg.name) and "/" not in cfg.name, f"name: {cfg.name!r} must be a non-empty folder name"),
        (len(cfg.data.demo.per_class) == 3, "data.demo.per_class: need 3 counts (good, acceptable, bad)"),
        (gc.scope == "class" or not gc.per_group,
         "generator.scope: one LoRA per dataset has no group to train per; use per_group: false or scope: class"),
        (cc.mixing != "split_bn" or cc.backbone != "SmallCNN" or cc.weights == "none",
         "classify.mixing: split_bn builds SmallCNN with split BatchNorm layers, which a plain SmallCNN weights file "
         "cannot fill; use classify.weights: none (trained from scratch)"),
        (not (cfg.tracking.uri or cfg.tracking.experiment) or cfg.tracking.mlflow,
         "tracking.uri / tracking.experiment: set, but tracking.mlflow is false, so nothing would be tracked; set "
         "tracking.mlflow: true or remove them"),
        (not cfg.report.reference or Path(cfg.report.reference).expanduser().is_file(),
         f"report.reference: {cfg.report.reference!r} is not a file"),
        (cc.weights in SPECIAL_WEIGHTS or Path(cc.weights).expanduser().is_file(),
         f"classify.weights: {cc.weights!r} is neither one of {list(SPECIAL_WEIGHTS)} nor an existing weights file"),
    ]
    found += [message for ok, message in checks if not ok]
    found += _pretrain_problems(gc) + _prompt_problem("generator.prompt", gc.prompt)
    found += _prompt_problem("generator.group_prompt", gc.group_prompt)
    return found + _search_problems(cfg) + _backbone_problems(cc)


def _raise(found: list[str], prefix: str = "") -> None:
    if found:
        more = f" ({len(found)} problems)" if len(found) > 1 else ""
        raise ConfigError(prefix + "; ".join(found) + more)


# ---------------------------------------------------------------------------------------------- axes


def _axis_field(dotted: str, where: str) -> tuple[dict, Any]:
    try:
        f, hint = field_of(dotted)
    except KeyError as exc:
        raise ConfigError(f"{where}.{dotted}: {exc.args[0]}") from None
    return dict(f.metadata), hint


def _varied_field(dotted: str, where: str) -> Any:
    """The type hint of a field an axis (or a search dimension) may vary; ConfigError naming `where`.`dotted`
    otherwise: a field that changes no result, shapes the grid, or is data or folds."""
    meta, hint = _axis_field(dotted, where)
    if not dotted.startswith(AXIS_SECTIONS):
        what = "an axis" if where == "axes" else "a search dimension"
        raise ConfigError(f"{where}.{dotted}: {what} varies generator, sample or classify fields; data and folds "
                          "stay fixed so that every variant is tested on the same held-out images")
    if meta["role"] not in (RESULT, INPUT) and dotted not in AXIS_GRID_FIELDS:
        why = ("changes no result, so every value would give the same numbers" if meta["role"] == RESOURCE
               else "is already a dimension of the grid (or shapes it); list its values there")
        raise ConfigError(f"{where}.{dotted}: {why}")
    return hint


def parse_axes(raw: Any) -> tuple:
    """The file's `axes:` mapping -> ((dotted field, (coerced values...)), ...), each checked to be a field that
    changes the synthetic images or the trials."""
    if not isinstance(raw, dict):
        raise ConfigError("axes: expected a mapping of config fields to lists of values, e.g. sample.cfg: [2, 7]")
    out = []
    for dotted, values in raw.items():
        hint = _varied_field(dotted, "axes")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{dotted}: expected a non-empty list of values, got {values!r}")
        coerced = tuple(coerce(v, hint, f"axes.{dotted}[{i}]") for i, v in enumerate(values))
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"axes.{dotted}: values repeat ({list(values)})")
        out.append((dotted, coerced))
    return tuple(out)


# The search trains its LoRAs on one base built before the trials, with split fold, and scores with a linear probe
# on quality.features: a dimension over these would change nothing its trials compute, or need its own base.
SEARCH_FIXED = ("classify.", "generator.pretrain.", "generator.base", "generator.split", "generator.per_group",
                "generator.scope", "sample.replicates")
SEARCH_ONE_WEIGHT = "sample.weights"  # a grid dimension elsewhere; in a search, the one weight a point samples


def _space_values(dotted: str, kind: str, values: Any, hint: Any) -> tuple:
    """The checked values of one search dimension (the choices, or the [low, high] of a range)."""
    where = f"search.space.{dotted}.{kind}"
    if typing.get_origin(hint) is tuple:  # sample.weights: each value is one weight
        hint = typing.get_args(hint)[0]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list, got {values!r}")
    coerced = tuple(coerce(v, hint, f"{where}[{i}]") for i, v in enumerate(values))
    if kind == "choice":
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"{where}: values repeat ({values})")
        return coerced
    if hint not in ((int,) if kind == "randint" else (float,)):
        use = "randint or choice" if hint is int else "choice" if kind == "randint" and hint is not float else \
            "uniform or loguniform" if hint is float else "choice"
        raise ConfigError(f"{where}: the field holds {getattr(hint, '__name__', hint)} values; use {use}")
    if len(coerced) != 2 or not coerced[0] < coerced[1] + (kind == "randint"):
        raise ConfigError(f"{where}: expected [low, high] with low below high, got {values}")
    if kind == "loguniform" and coerced[0] <= 0:
        raise ConfigError(f"{where}: a log-uniform range starts above 0, got {values}")
    return coerced


def _space_dimension(dotted: str, spec: Any, cfg: ExperimentConfig) -> tuple:
    hint = field_of(dotted)[1] if dotted == SEARCH_ONE_WEIGHT else _varied_field(dotted, "search.space")
    if dotted.startswith(SEARCH_FIXED):
        raise ConfigError(f"search.space.{dotted}: the search trains on one base (split fold, one LoRA per "
                          "class) and scores with a linear probe on quality.features; this field would change "
                          "nothing its trials compute, or need a base per trial")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search.space.{dotted}: expected one of {{{' | '.join(DISTRIBUTIONS)}: values}}, "
                          f"got {spec!r}")
    kind, values = next(iter(spec.items()))
    values = _space_values(dotted, kind, values, hint)
    found = [f"search.space.{dotted} = {value}: {p}" for value in values  # each choice and each end of a range
             for p in problems(with_values(cfg, {dotted: value})) if p not in problems(cfg)]
    _raise(found)
    return dotted, kind, values


def parse_space(raw: Any, cfg: ExperimentConfig) -> tuple:
    """The file's `search.space` mapping -> ((dotted field, distribution, values), ...): each field one an axis
    may vary and a search trial uses, one distribution each, and every choice and range end a value the field
    accepts in `cfg` (its bounds and combinations)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search.space: expected a mapping of fields to distributions, e.g. "
                          "generator.unet_lr: {loguniform: [1.0e-4, 3.0e-3]}")
    out, found = [], []
    for dotted, spec in raw.items():
        try:
            out.append(_space_dimension(dotted, spec, cfg))
        except ConfigError as exc:  # every bad dimension named at once
            found.append(str(exc))
    _raise(found)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- files


def from_dict(raw: dict | None) -> ExperimentConfig:
    """A validated config from a plain mapping (an experiment file's, after extends, tiny and overrides)."""
    raw = dict(raw or {})
    axes_raw = raw.pop("axes", None)
    space_raw = None
    if isinstance(raw.get("search"), dict) and "space" in raw["search"]:
        raw["search"] = dict(raw["search"])
        space_raw = raw["search"].pop("space")
    cfg = build(ExperimentConfig, raw)
    _raise(problems(cfg))
    if space_raw is not None:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, space=parse_space(space_raw, cfg)))
    if axes_raw is not None:
        cfg = dataclasses.replace(cfg, axes=parse_axes(axes_raw))
        for variant in variants(cfg):
            _raise(problems(variant.cfg), f"axes ({variant.label}): ")
    return cfg


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _merged(base: dict, own: dict) -> dict:
    """`own` over `base`: mappings merged key by key (so a file changes one field of a section and keeps the
    others), every other value (lists included) replaced whole."""
    out = dict(base)
    for key, value in own.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_experiment(path: str | Path) -> dict:
    """An experiment file as a mapping, `extends:` resolved: the named file (relative to this one's folder) first,
    this file's keys merged over it. One level: a base that extends another is refused. The base's name never
    carries over (a file is named after itself)."""
    path = Path(path)
    raw = _read_yaml(path)
    parent = raw.pop(EXTENDS, None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends: expected the file name of another experiment, got {parent!r}")
    base_path = (path.parent / parent).resolve()
    if base_path == path.resolve():
        raise ConfigError(f"{path}: extends: a file cannot extend itself")
    base = _read_yaml(base_path)
    if EXTENDS in base:
        raise ConfigError(f"{path}: extends {parent}, which extends {base[EXTENDS]}: one level only (copy what you "
                          "need into one base file)")
    base.pop("name", None)
    return _merged(base, raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), tiny: bool = False
                ) -> ExperimentConfig:
    """Load an experiment YAML; `overrides` are "dotted.key=yaml_value" strings from the CLI (applied last).

    tiny=True applies TINY and the file's own `tiny:` mapping first (seconds-scale settings for tests)."""
    path = Path(path)
    raw = read_experiment(path)
    tiny_overrides = raw.pop("tiny", None)
    raw.setdefault("name", path.stem)
    if tiny:
        if not isinstance(tiny_overrides, dict):
            raise ConfigError(f"{path}: no `tiny:` mapping (dotted overrides for tiny mode; {{}} for none)")
        for key, value in {**TINY, **tiny_overrides}.items():
            set_dotted(raw, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None



