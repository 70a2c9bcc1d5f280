"""Experiment configuration: YAML -> frozen dataclasses.

Every default lives here, in one place. An experiment file (experiments/*.yaml) holds only what differs.
Unknown or mistyped keys are errors that name the full dotted key, so a typo like `clasify.epochs`
never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class DemoDataConfig:
    """The microscopy-like image set the project generates itself (ooc_ray.demo_data)."""

    per_class: tuple[int, ...] = (30, 14, 8)  # good/acceptable/bad, roughly the paper's 500/212/110 shape
    size: int = 64
    groups: int = 3  # fake "cell lines", written to the CSV's group column
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # "demo" builds the generated set under results/<name>/demo_data; otherwise a folder-per-class
    # root or a CSV file with columns file,label[,group] (paths relative to the CSV's folder).
    source: str = "demo"
    classes: tuple[str, ...] = ()  # empty: every folder/label found; else the allowed labels, in this order
    group_column: str = ""  # CSV column holding cell line / well / patient; "" = no groups
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass(frozen=True)
class FoldsConfig:
    k: int = 5
    seed: int = 42
    # "auto": group-aware when the manifest has groups; "stratified" ignores groups; "group" requires them.
    strategy: str = "auto"


@dataclass(frozen=True)
class GeneratorConfig:
    """LoRA fine-tuning of Stable Diffusion (kohya-style parameters)."""

    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, local path, or "tiny"
    split: str = "fold"  # "fold": one LoRA per fold's training images (no leakage); "all": the paper's protocol
    per_group: bool = False  # one LoRA per (class, group), e.g. per cell line
    resolution: int = 512
    repeats: int = 2
    epochs: int = 10
    batch_size: int = 2
    unet_lr: float = 5e-4
    text_encoder_lr: float = 1e-4  # 0 disables the text-encoder LoRA
    rank: int = 8
    alpha: float = 8.0
    seed: int = 0
    prompt: str = "a microscopy image of {label} organ on chip cells"
    group_prompt: str = "a microscopy image of {label} {group} cells"
    mixed_precision: str = "fp32"  # "fp16"/"bf16" on GPU (not "no": YAML reads a bare no as false)
    gpus: float = 0.0  # GPUs per fine-tuning task (Ray remote); 0 on CPU


@dataclass(frozen=True)
class SampleConfig:
    weights: tuple[float, ...] = (1.0, 0.8)  # LoRA weights, one synthetic pool each
    sampler: str = "euler_a"
    steps: int = 20
    cfg: float = 7.0
    negative_prompt: str = ""  # recorded per image; "" = the unconditional prompt of classifier-free guidance
    mode: str = "txt2img"  # or "img2img" (starts from a real training image of the same class)
    strength: float = 0.6  # img2img only
    resolution: int = 512
    batch_size: int = 4
    actors: int = 0  # 0: one per GPU, or 1 on CPU
    gpus_per_actor: float = 0.0
    seed: int = 1234  # base seed; each image's seed is derived from it and recorded
    output_size: int = 0  # 0: keep the sampler's resolution; else resize saved PNGs to this


@dataclass(frozen=True)
class ClassifyConfig:
    backbone: str = "EfficientNetB7"
    # "imagenet"; "none" (random init: features ~1e-7, learns class frequencies only); "calibrated" (random init
    # with the top BatchNorm re-estimated on 32 images: offline demos); or a local .weights.h5 path
    weights: str = "imagenet"
    input_size: int = 600
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    dropout: float = 0.2
    augment: tuple[str, ...] = ("flip", "rotation", "zoom", "contrast")
    ratios: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    synthetic_only: bool = True
    mode: str = "exact"  # "exact" trains end to end per trial; "cached" trains the head on cached backbone features
    feature_views: int = 4  # cached mode: augmented views per training image (view 0 is un-augmented)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    max_concurrent: int = 0  # 0: as many as resources allow
    seed: int = 0


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    kid_subsets: int = 10
    kid_subset_size: int = 50
    filter_min_confidence: float = 0.0  # >0: drop synthetic images a real-trained classifier is less sure of


@dataclass(frozen=True)
class SearchConfig:
    """Ray Tune + Optuna search over LoRA hyperparameters (experiments/lora_search.yaml)."""

    num_samples: int = 20
    objective: str = "cas"  # "cas" (synthetic-only accuracy), "kid" (lower is better) or "accuracy" (downstream)
    fold: int = 0
    images_per_class: int = 16
    rank: tuple[int, ...] = (4, 8, 16, 32)
    alpha: tuple[float, ...] = (1.0, 4.0, 8.0, 16.0, 32.0)
    unet_lr: tuple[float, float] = (1e-5, 1e-3)  # log-uniform range
    text_encoder_lr: tuple[float, float] = (1e-6, 1e-4)
    epochs: tuple[int, int] = (2, 20)
    repeats: tuple[int, int] = (1, 4)
    weight: tuple[float, float] = (0.5, 1.0)
    seed: int = 0


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" starts a local Ray; "auto" joins a cluster
    num_cpus: int = 0  # 0: Ray decides (local only)
    storage_path: str = ""  # Ray Tune storage; "" -> results/<name>/ray


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    results_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.name


_CHOICES = {
    "folds.strategy": {"auto", "stratified", "group"},
    "generator.split": {"fold", "all"},
    "generator.mixed_precision": {"fp32", "fp16", "bf16"},
    "sample.sampler": {"euler_a"},
    "sample.mode": {"txt2img", "img2img"},
    "classify.mode": {"exact", "cached"},
    "classify.backbone": {f"EfficientNetB{i}" for i in range(8)},
    "search.objective": {"cas", "kid", "accuracy"},
}
_AUGMENTS = {"flip", "rotation", "zoom", "contrast", "translation", "brightness"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
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
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + u for u in unknown)} "
            f"(allowed under '{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _validate(cfg: ExperimentConfig) -> None:
    for dotted, allowed in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {sorted(allowed)}")
    bad = sorted(set(cfg.classify.augment) - _AUGMENTS)
    if bad:
        raise ConfigError(f"classify.augment: unknown augmentation(s) {bad}; known: {sorted(_AUGMENTS)}")
    if cfg.folds.k < 2:
        raise ConfigError("folds.k: need at least 2 folds")
    if any(r < 0 for r in cfg.classify.ratios):
        raise ConfigError("classify.ratios: ratios must be >= 0")
    if not cfg.sample.weights:
        raise ConfigError("sample.weights: need at least one LoRA weight")
    if not 0.0 < cfg.sample.strength <= 1.0:
        raise ConfigError("sample.strength: must be in (0, 1]")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: {cfg.name!r} must be a non-empty folder name")


def from_dict(raw: dict | None) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw or {})
    _validate(cfg)
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML; `overrides` are "dotted.key=yaml_value" strings from the CLI."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples -> lists) for YAML/JSON/Parquet."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_resolved(cfg: ExperimentConfig, path: Path) -> Path:
    from ooc_ray.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def slice_key(*parts: Any, length: int = 12) -> str:
    """Stable short hash of config slices (dataclasses, dicts, strings): the resume key of a stage output.

    Two runs whose slices are equal produce the same key, so finished work is found and skipped."""
    payload = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
