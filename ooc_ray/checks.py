"""Checking config values: YAML values coerced to the schema's types (every key named), each field's declared
bounds, and the combinations that cannot run. Every check returns one line per problem naming its dotted key, so
a loader can name every bad key at once (ooc_ray.load)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ooc_ray.config import (EFFICIENTNET_BLOCKS, EFFICIENTNETS, RANDOM_WEIGHTS, SPECIAL_WEIGHTS, ClassifyConfig,
                            ExperimentConfig, GeneratorConfig, confirmation_folds)
from ooc_ray.errors import ConfigError
from ooc_ray.fields import type_hints

SINGULAR = {"controls": "a control", "weights": "a LoRA weight", "ratios": "a ratio", "classes": "a class",
            "augment": "an augmentation"}  # for "a ratio is listed twice"
INT64_LIMIT = 2**63  # integers are stored in Parquet and NumPy as int64
KERAS_MIN_INPUT = 32  # pixels per side a keras.applications backbone takes at least


# ---------------------------------------------------------------------------------------------- types


def _shown(value: Any) -> str:
    """A value as an error shows it: its repr, cut at 60 characters (10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + f"... ({len(text)} characters)"


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
            raise ConfigError(f"{key}: expected true/false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
        if abs(value) >= INT64_LIMIT:
            raise ConfigError(f"{key}: expected an integer of at most 19 digits (int64), got {_shown(value)}")
        return value
    if hint is float:
        # YAML reads "5e-4" (no dot) as a string: accept numeric strings for floats only.
        try:
            number = float(value) if not isinstance(value, bool) else None
        except OverflowError:  # an integer past a float's range (10**400)
            number = math.inf
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def build(cls: type, raw: dict, prefix: str = "", found: list[str] | None = None,
          defaulted: set[str] | None = None) -> Any:
    """`cls` from a mapping, every value coerced. With `found`, every unknown key and every value of the wrong type
    in it and its sections is added there, and the field keeps its default (so the others' bounds can still be
    checked); without, they raise together. `defaulted` collects the dotted keys whose given value was not used:
    each field (or section) of the wrong type, and the field an unknown key most likely meant (`samplr`:
    sample.sampler), so that a loader can leave out the checks that would read their defaults as the user's."""
    collect = [] if found is None else found
    unused = set() if defaulted is None else defaulted
    hints = type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    where = prefix.rstrip(".") or "top level"
    not_names = [k for k in raw if not isinstance(k, str)]
    if not_names:
        collect.append(f"{where}: keys are field names, got {', '.join(map(_shown, not_names))}")
    unknown = sorted(k for k in raw if isinstance(k, str) and k not in names)
    if unknown:
        meant = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        shown = [prefix + u + "".join(f" (did you mean {prefix}{m}?)" for m in meant[u]) for u in unknown]
        collect.append(f"unknown config key(s): {', '.join(shown)} (allowed under '{where}': "
                       f"{', '.join(sorted(names))})")
        unused.update(prefix + m for guess in meant.values() for m in guess if m not in raw)
    kwargs = {}
    for k, v in raw.items():
        if k not in names or not isinstance(k, str):
            continue
        try:
            section = dataclasses.is_dataclass(hints[k]) and isinstance(v, dict)
            kwargs[k] = (build(hints[k], v, f"{prefix}{k}.", collect, unused) if section
                         else coerce(v, hints[k], prefix + k))
        except ConfigError as exc:
            collect.append(str(exc))
            unused.add(prefix + k)
    if found is None:
        raise_problems(collect)
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
            noun = SINGULAR.get(f.name, "a value")
            problems.append(f"{key}: {noun} is listed twice ({', '.join(twice)} in {list(value)})")
    return problems


def _inside(v: float, bounds: dict) -> bool:
    return (v >= bounds.get("ge", -math.inf) and v > bounds.get("gt", -math.inf)
            and v <= bounds.get("le", math.inf) and v < bounds.get("lt", math.inf))


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(bounds: dict) -> str:
    """'in (0, 1]' for two bounds, '>= 1' for one."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"


PROMPT_FIELDS = ("label", "group")  # what a prompt template may name: protocol fills them with str.format


def _placeholders(template: str) -> list[str]:
    """The placeholders of a prompt template as written ("{label}"); ValueError for a brace left open."""
    return ["{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]


def _prompt_problem(key: str, template: str) -> list[str]:
    """A template whose placeholders are other than {label} and {group} as they are: str.format would raise, or
    write an attribute, an item or a formatted value of the label into every prompt ({label.upper})."""
    allowed = [f"{{{name}}}" for name in PROMPT_FIELDS]
    try:
        bad = [p for p in _placeholders(template) if p not in allowed]
    except ValueError as exc:
        return [f"{key}: {template!r} has a bad placeholder ({exc}); use {{label}} and {{group}}"]
    return [f"{key}: {template!r} has placeholder(s) {', '.join(bad)}; use {{label}} and {{group}} as they are"] \
        if bad else []


def _backbone_problems(cc: ClassifyConfig) -> list[str]:
    """A backbone that trains must run where it trains: only exact mode trains anything but the head."""
    if cc.backbone == "SmallCNN":
        return ([] if cc.mode == "exact" else
                ["classify.backbone: SmallCNN is trained from scratch in every trial; it needs classify.mode: exact "
                 "(cached mode trains the head only)"]) + (
                [f"classify.weights: {cc.weights!r} does not exist for SmallCNN; use none (trained from scratch) "
                 "or a .weights.h5 file"] if cc.weights in ("imagenet", "calibrated", RANDOM_WEIGHTS) else []) + (
                ["classify.train_backbone: SmallCNN trains all of its layers; leave it at 0"]
                if cc.train_backbone else [])
    problems = []
    if cc.weights == "none" and not cc.train_backbone:
        instead = ["imagenet", *(["calibrated (offline)"] * (not cc.backbone.startswith("ConvNeXt"))),
                   "a .weights.h5 file", *(["train_backbone blocks"] * (cc.backbone in EFFICIENTNETS)), "SmallCNN"]
        problems.append(f"classify.weights: none with classify.train_backbone 0 leaves the frozen "
                        f"classify.backbone {cc.backbone} at its random initialisation "
                        f"(features ~1e-7: the head learns class frequencies only); use {', '.join(instead[:-1])} or "
                        f"{instead[-1]}; "
                        "random says a plumbing test is meant")
    if cc.weights == RANDOM_WEIGHTS and cc.train_backbone:
        problems.append("classify.weights: random names a frozen backbone for plumbing tests; blocks that train "
                        "start from none")
    if cc.input_size < KERAS_MIN_INPUT:
        problems.append(f"classify.input_size: {cc.input_size} px is below the {KERAS_MIN_INPUT} px "
                        f"keras.applications backbones (classify.backbone {cc.backbone}) take (their docs: width and "
                        f"height no smaller than 32; EfficientNet fails to build below it); use {KERAS_MIN_INPUT} or "
                        "more, or SmallCNN")
    if cc.train_backbone and cc.backbone not in EFFICIENTNETS:
        problems.append(f"classify.train_backbone: training top blocks is built for EfficientNetB0-B7 (whose blocks "
                        f"it names), not {cc.backbone}; leave it at 0 (frozen backbone)")
    if cc.weights == "calibrated" and cc.backbone.startswith("ConvNeXt"):
        problems.append(f"classify.weights: 'calibrated' sets BatchNorm statistics and {cc.backbone} has no BatchNorm "
                        "(it uses LayerNorm); use imagenet or a .weights.h5 file")
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
        return [f"generator.pretrain.vae_steps: generator.base {gc.base!r} keeps its trained VAE; set vae_steps: 0"]
    return []


def _search_problems(cfg: ExperimentConfig) -> list[str]:
    """The search's folds: real fold ids, the scored and the confirmation folds apart, at least one scored."""
    s, n = cfg.search, cfg.folds.k * cfg.folds.repeats
    found = [f"search.{name}: fold {f} does not exist (folds.k x folds.repeats = {n}: folds 0..{n - 1})"
             for name in ("folds", "confirm_folds") for f in getattr(s, name) if f >= n]
    confirm = s.confirm_folds or (confirmation_folds(list(range(n))) if s.confirm else ())
    if set(s.folds) & set(confirm):
        named = ("search.confirm_folds" if s.confirm_folds else
                 f"the default confirmation folds (search.confirm: the last third of folds.k x folds.repeats = {n})")
        found.append(f"search.folds / {named}: {sorted(set(s.folds) & set(confirm))} in both; the confirmation "
                     "needs folds the search never scored on")
    if s.confirm_folds and not s.folds and len(s.confirm_folds) >= n:
        found.append(f"search.confirm_folds: every fold (folds.k x folds.repeats = {n}); none is left for the "
                     "search to score on")
    if s.scheduler != "none" and s.report_every == 0:
        found.append(f"search.scheduler: {s.scheduler} stops trials at their reports, and search.report_every is 0 "
                     "(one report, at the end); set report_every (LoRA epochs) or scheduler: none")
    return found


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except RuntimeError:  # ~user of no such user: Path cannot expand it
        return False


def random_features_problem(cfg: ExperimentConfig, when: str = "") -> list[str]:
    """Quality measures (and the search's probe) on the classifier's backbone where classify.weights none leaves
    it at its random initialisation, which cannot tell cells from noise. (random names that backbone for tests of
    the pipeline, and the report says so.) `when` names the setting that makes the check apply."""
    if cfg.quality.features == "backbone" and cfg.classify.weights == "none":
        return [f"quality.features: backbone{when} measures on classify.backbone {cfg.classify.backbone}'s "
                "features, and classify.weights none leaves them at its random initialisation (they cannot tell "
                "cells from noise); use quality.features: image_statistics, or backbone weights"]
    return []


def problems(cfg: ExperimentConfig) -> list[str]:
    """Everything wrong with a config that its types cannot express, one line per problem naming its key."""
    s, cc, gc = cfg.sample, cfg.classify, cfg.generator
    found = bound_problems(cfg)
    checks = [
        (bool(s.weights), "sample.weights: need at least one LoRA weight"),
        (len({f"{w:g}" for w in s.weights}) == len(s.weights),
         f"sample.weights: {list(s.weights)} has weights alike to 6 significant digits, which would share one arm "
         "name and table; make them differ there"),
        (bool(cc.ratios), "classify.ratios: need at least one ratio (0.0: real only, the baseline of every arm)"),
        (len({f"{r * 100:g}" for r in cc.ratios}) == len(cc.ratios),  # as protocol.Arm names them
         f"classify.ratios: {list(cc.ratios)} has ratios alike to 6 significant digits (in percent), which would "
         "share one arm name and row; make them differ there"),
        (s.mode != "img2img" or int(s.steps * s.strength) >= 1,
         f"sample.strength: img2img runs int(sample.steps x strength) = int({s.steps} x {s.strength:g}) = 0 "
         "denoising steps (nothing to sample); raise sample.steps or sample.strength"),
        (not cc.controls or any(r > 0 for r in cc.ratios),
         "classify.controls: each control matches an arm of ratio > 0, and classify.ratios has none"),
        (gc.resolution % 8 == 0 and s.resolution % 8 == 0,
         f"generator.resolution / sample.resolution: {gc.resolution} / {s.resolution}: each must be a multiple of "
         "8 (diffusers' Stable Diffusion pipelines refuse other sizes)"),
        (bool(cfg.data.group_column) or not gc.per_group,
         "generator.per_group: one LoRA per group needs data.group_column (the CSV column naming each image's group)"),
        (bool(cfg.data.group_column) or cfg.folds.strategy != "group",
         "folds.strategy: group needs data.group_column (the CSV column naming each image's group)"),
        (gc.scope == "class" or "{label}" in gc.prompt,
         f"generator.prompt: {gc.prompt!r} has no {{label}}; with generator.scope: dataset one LoRA learns every "
         "class, and only the label in its captions tells them apart"),
        (cfg.quality.filter_min_confidence == 0 or cfg.quality.enabled,
         "quality.filter_min_confidence: the filter reads the quality stage's scores, and quality.enabled is false"),
        (s.clip_sample == 0.0 or s.sampler == "ddim",
         f"sample.clip_sample: {s.sampler} cannot clip its predicted latent; use sample.sampler: ddim"),
        (cfg.name.strip() == cfg.name and cfg.name not in ("", ".", "..") and not {"/", "\0"} & set(cfg.name),
         f"name: {cfg.name!r} must be a folder name (not empty, '.' or '..'; no '/' and no spaces around it)"),
        (bool(cfg.results_dir.strip()), "results_dir: empty; name the folder every experiment's results go into"),
        (bool(cfg.data.source.strip()), "data.source: empty; use demo, a folder of class folders or a CSV"),
        (all(c.strip() for c in cfg.data.classes), f"data.classes: an empty class name in {list(cfg.data.classes)}"),
        (bool(gc.base.strip()), "generator.base: empty; use a hub id, a local folder or tiny"),
        (len(cfg.data.demo.per_class) == 3, "data.demo.per_class: need 3 counts (good, acceptable, bad)"),
        (cfg.data.source != "demo" or min(cfg.data.demo.per_class, default=cfg.folds.k) >= cfg.folds.k,
         f"data.demo.per_class (data.source demo): {list(cfg.data.demo.per_class)} has a class of fewer images "
         f"than folds.k="
         f"{cfg.folds.k} (every held-out fold needs each class)"),
        (gc.scope == "class" or not gc.per_group,
         "generator.scope: one LoRA per dataset has no group to train per; use per_group: false or scope: class"),
        (cc.mixing != "split_bn" or cc.backbone != "SmallCNN" or cc.weights == "none",
         "classify.mixing: split_bn builds SmallCNN with split BatchNorm layers, which a plain SmallCNN weights file "
         "cannot fill; use classify.weights: none (trained from scratch)"),
        (not (cfg.tracking.uri or cfg.tracking.experiment) or cfg.tracking.mlflow,
         "tracking.uri / tracking.experiment: set, but tracking.mlflow is false, so nothing would be tracked; set "
         "tracking.mlflow: true or remove them"),
        (not cfg.report.reference or _is_file(cfg.report.reference),
         f"report.reference: {cfg.report.reference!r} is not a file"),
        (cc.weights in SPECIAL_WEIGHTS or _is_file(cc.weights),
         f"classify.weights: {cc.weights!r} is neither one of {list(SPECIAL_WEIGHTS)} nor an existing weights file"),
    ]
    found += [message for ok, message in checks if not ok]
    found += _pretrain_problems(gc) + _prompt_problem("generator.prompt", gc.prompt)
    found += _prompt_problem("generator.group_prompt", gc.group_prompt)
    if cfg.quality.enabled:  # the search's own check: at its start
        found += random_features_problem(cfg, " with quality.enabled")
    return found + _search_problems(cfg) + _backbone_problems(cc)


def raise_problems(found: list[str], prefix: str = "") -> None:
    """One ConfigError naming every problem; its `problems` keep them apart for a caller that collects more."""
    if found:
        more = f" ({len(found)} problems)" if len(found) > 1 else ""
        error = ConfigError(prefix + "; ".join(found) + more)
        error.problems = [prefix + p for p in found]
        raise error


