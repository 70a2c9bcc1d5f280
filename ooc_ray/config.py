"""Experiment configuration: YAML -> frozen dataclasses, with every default in this one file.

An experiment file (experiments/*.yaml) holds only what differs. Unknown or mistyped keys, values of the wrong
type and values outside a field's Literal choices are errors that name the full dotted key, so a typo like
`clasify.epochs` never silently runs the default.

Every field declares its role once, here, and ooc_ray.keys derives every artifact's key from these roles:
  result(feeds=...)  can change the numbers of the named artifacts: enters their keys
  input()            names data or weights; their content digest enters the keys, not the name
  grid()             decides which artifacts exist and what each reads (ratios, LoRA weights, folds, prompts);
                     each artifact's key carries its own grid point and input digests instead
  resource()         where and how fast work runs (GPUs, actors, concurrency, batch sizes that leave the
                     numbers unchanged): never enters a key, so moving to a bigger cluster re-runs nothing
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ooc_ray.errors import ConfigError

# Artifacts whose keys config fields can feed (ooc_ray.keys): a domain-pretrained generator base, a LoRA, a
# synthetic image, a backbone-feature cache, a classifier trial, the quality tables, a LoRA-search trial.
ARTIFACTS = ("base", "lora", "image", "features", "trial", "quality", "search")
RESULT, INPUT, GRID, RESOURCE, PRESENTATION = "result", "input", "grid", "resource", "presentation"


def result(default: Any, feeds: tuple[str, ...], only_if: tuple[str, Any] | None = None,
           keyed_when_set: bool = False) -> Any:
    """A field that can change the numbers of the `feeds` artifacts. `only_if=(sibling, value)`: it matters
    only when that sibling field has that value (img2img strength under txt2img changes nothing).
    `keyed_when_set`: it enters keys only at a value other than its default. For fields added after results
    exist whose default computes exactly what ran before, so an upgrade re-runs none of a user's trials."""
    assert set(feeds) <= set(ARTIFACTS), feeds
    return field(default=default, metadata={"role": RESULT, "feeds": feeds, "only_if": only_if,
                                            "keyed_when_set": keyed_when_set})


def input_(default: Any) -> Any:
    return field(default=default, metadata={"role": INPUT})


def grid(default: Any) -> Any:
    return field(default=default, metadata={"role": GRID})


def resource(default: Any) -> Any:
    return field(default=default, metadata={"role": RESOURCE})


def presentation(default: Any) -> Any:
    """How the report reads finished results (a test's margin): computes nothing, so it never enters a key."""
    return field(default=default, metadata={"role": PRESENTATION})


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"role": "section"})


# SmallCNN: a small Keras CNN the classifier trains from scratch (ooc_ray.backbones.build_small_cnn); the
# EfficientNets are the paper's family; EfficientNetV2, ResNet50V2, DenseNet121 and ConvNeXt are the other
# keras.applications families microscopy papers use. All but SmallCNN load ImageNet weights, each with its own
# input preprocessing (ooc_ray.backbones.PREPROCESSING).
EFFICIENTNETS = ("EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetB4",
                 "EfficientNetB5", "EfficientNetB6", "EfficientNetB7")
Backbone = Literal["SmallCNN", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetB4",
                   "EfficientNetB5", "EfficientNetB6", "EfficientNetB7",
                   "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S",
                   "ResNet50V2", "DenseNet121", "ConvNeXtTiny", "ConvNeXtSmall"]
Augmentation = Literal["flip", "rotation", "zoom", "contrast", "translation", "brightness"]
# How a trial's synthetic images enter training (ooc_ray.classify.train; README: Mixing strategies).
Mixing = Literal["concat", "loss_weighted", "replace", "split_bn"]
# Matched controls (ooc_ray.protocol): real only for as many steps as each ratio's arm, and real + classic
# augmentations of real images at each ratio's count.
Control = Literal["real_steps", "real_augmented"]


@dataclass(frozen=True)
class DemoDataConfig:
    """The microscopy-like image set the project generates itself (ooc_ray.demo_data)."""

    per_class: tuple[int, ...] = input_((30, 14, 8))  # good/acceptable/bad, roughly the paper's 500/212/110 shape
    size: int = input_(64)
    groups: int = input_(3)  # fake "cell lines", written to the CSV's group column
    seed: int = input_(0)


@dataclass(frozen=True)
class DataConfig:
    # "demo" builds the generated set under results/<name>/demo_data; otherwise a folder-per-class
    # root or a CSV file with columns file,label[,group] (paths relative to the CSV's folder).
    source: str = input_("demo")
    classes: tuple[str, ...] = grid(())  # empty: every folder/label found; else the allowed labels, in this order
    group_column: str = grid("")  # CSV column holding cell line / well / patient; "" = no groups
    demo: DemoDataConfig = section(DemoDataConfig)


@dataclass(frozen=True)
class FoldsConfig:
    k: int = grid(5)
    seed: int = grid(42)
    # Repeated k-fold CV: R independent partitions (repeat r shuffled with seed + 1000 r); every stage runs per
    # (repeat, fold), and the report's tests pair all R x k folds (ooc_ray.comparisons).
    repeats: int = grid(1)
    # "auto": group-aware when the manifest has groups; "stratified" ignores groups; "group" requires them.
    strategy: Literal["auto", "stratified", "group"] = grid("auto")


_LORA = ("lora",)
_BASE = ("base",)


@dataclass(frozen=True)
class PretrainConfig:
    """Domain pretraining of the generator base on unlabeled images (ooc_ray.pretrain), before any LoRA.

    Labs hold far more unlabeled images than labelled ones; a base that has learnt what their images look like
    leaves each class LoRA only the difference to learn. The tiny base is trained from scratch (its VAE first,
    then frozen, then its UNet); a real base keeps its VAE and fine-tunes its UNet. Leakage rule: never
    pretrain on images that any fold holds out (the stage refuses labelled images by content)."""

    # "" = no pretraining; "demo" = demo_images drawn like the demo set with demo_seed (never the labelled
    # images); else a folder (searched recursively) or a CSV with a `file` column of unlabeled images.
    source: str = input_("")
    demo_images: int = input_(300)
    demo_seed: int = input_(1)
    caption: str = result("a microscopy image of cells", _BASE)  # one class-agnostic caption for every image
    vae_steps: int = result(0, _BASE)  # the tiny base needs > 0 (its VAE is trained first, then frozen); a real base 0
    unet_steps: int = result(500, _BASE)
    batch_size: int = result(16, _BASE)  # the demo: 16 (~0.14 s per UNet step on 2 CPU cores at 16x16 latents)
    vae_lr: float = result(1e-3, _BASE)  # 2e-3 reconstructed the demo cells worse at every step count (measured)
    unet_lr: float = result(1e-3, _BASE)
    # Share of steps that see the empty caption, so the base also learns the unconditional prediction that
    # classifier-free guidance (sample.cfg) subtracts; SD v1 trained with 10 %.
    caption_dropout: float = result(0.1, _BASE)
    seed: int = result(0, _BASE)


@dataclass(frozen=True)
class GeneratorConfig:
    """LoRA fine-tuning of Stable Diffusion (kohya-style parameters)."""

    base: str = input_("stable-diffusion-v1-5/stable-diffusion-v1-5")  # hub id, local path, or "tiny"
    split: Literal["fold", "all"] = grid("fold")  # "fold": one LoRA per fold's training images; "all": the paper's
    per_group: bool = grid(False)  # one LoRA per (class, group), e.g. per cell line
    # "class": one LoRA per class (the paper's, DataDream's per-class variant); "dataset": one LoRA per fold on
    # every class's images, each captioned with its class's prompt, sampled with each class's prompt (DataDream's
    # per-dataset variant). Which LoRAs exist, so a grid field; it can be an axis.
    scope: Literal["class", "dataset"] = grid("class")
    resolution: int = result(512, _LORA)
    repeats: int = result(2, _LORA)
    epochs: int = result(10, _LORA)
    batch_size: int = result(2, _LORA)  # a training batch: changes the gradient steps, so it is a result
    unet_lr: float = result(5e-4, _LORA)
    text_encoder_lr: float = result(1e-4, _LORA)  # 0 disables the text-encoder LoRA
    rank: int = result(8, _LORA)
    alpha: float = result(8.0, _LORA)
    seed: int = result(0, _LORA)
    prompt: str = grid("a microscopy image of {label} organ on chip cells")  # each LoRA's key holds its prompt
    group_prompt: str = grid("a microscopy image of {label} {group} cells")
    # "fp16"/"bf16" on GPU (not "no": YAML reads a bare no as false); numbers differ, so a result.
    mixed_precision: Literal["fp32", "fp16", "bf16"] = result("fp32", _LORA)
    gpus: float = resource(0.0)  # GPUs per fine-tuning task (Ray remote); 0 on CPU
    # Encode each training image's VAE latent (and the prompt's embedding, when the text encoder is frozen)
    # once, not at every step (kohya's cache_latents): the same LoRA up to float rounding, so a resource.
    cache_latents: bool = resource(True)
    # Which UNet modules carry the LoRA: "attention" (q/k/v/out, the paper's and kohya's attention LoRA),
    # "transformer" (every linear layer of the transformer blocks, kohya's default LoRA-LierLa), or
    # "transformer+conv" (also the ResNet 3x3 convolutions, kohya's LoRA-C3Lier / LoCon): needed where the
    # base has attention only at its coarsest level, as the tiny base does.
    unet_modules: Literal["attention", "transformer", "transformer+conv"] = result("attention", _LORA,
                                                                                   keyed_when_set=True)
    # Which text-encoder modules carry its LoRA (when text_encoder_lr > 0): "attention" (q/k/v/out) or
    # "attention+mlp" (also fc1/fc2: kohya's default, which targets CLIPAttention and CLIPMLP).
    text_encoder_modules: Literal["attention", "attention+mlp"] = result("attention", _LORA, keyed_when_set=True)
    pretrain: PretrainConfig = section(PretrainConfig)


_IMAGE = ("image",)


@dataclass(frozen=True)
class SampleConfig:
    weights: tuple[float, ...] = grid((1.0, 0.8))  # LoRA weights, one synthetic pool each
    sampler: Literal["euler_a", "ddim"] = result("euler_a", _IMAGE)
    # > 0 (ddim only): clip the sampler's predicted clean latent to [-v, v] at every step (Imagen's static
    # thresholding), in the VAE's scaled latent space (unit variance for the demo's pretrained base, ~1 for SD's
    # 0.18215). An undertrained epsilon-prediction UNet can drift: the demo's pretrained base drew 41 % of its
    # images as dark blank frames (per-image latent means of -5 where real ones lie within +-1); with 2.0, none.
    # It pulls every image toward the average one, though (bad's KID rose 8x, the linear CAS fell from 0.62 to
    # 0.27). The tiny base now predicts v instead, which removed the drift without clipping (base.py).
    clip_sample: float = result(0.0, _IMAGE, keyed_when_set=True)
    steps: int = result(20, _IMAGE)
    cfg: float = result(7.0, _IMAGE)
    negative_prompt: str = result("", _IMAGE)  # "" = the unconditional prompt of classifier-free guidance
    mode: Literal["txt2img", "img2img"] = result("txt2img", _IMAGE)  # img2img starts from a real training image
    strength: float = result(0.6, _IMAGE, only_if=("mode", "img2img"))
    resolution: int = result(512, _IMAGE)
    # Images per pipeline call. Batched matmuls can move the last bits of an image (as moving to a GPU does),
    # never what it depicts: a resource, so a new batch size re-uses the images already sampled.
    batch_size: int = resource(4)
    actors: int = resource(0)  # 0: one per GPU, or 1 on CPU
    gpus_per_actor: float = resource(0.0)
    seed: int = result(1234, _IMAGE)  # base seed; each image's seed is derived from it and recorded
    # Independent pools for the same settings: replicate r samples with seed + REPLICATE_SEED_STEP x r (replicate
    # 0 is the pool of `seed`), and runs its own trials, so the report can tell generator randomness from the
    # classifier's.
    replicates: int = grid(1)
    output_size: int = result(0, _IMAGE)  # 0: keep the sampler's resolution; else resize saved PNGs to this


_FEATURES_TRIAL = ("features", "trial")
_TRIAL = ("trial",)


@dataclass(frozen=True)
class ClassifyConfig:
    backbone: Backbone = result("EfficientNetB7", _FEATURES_TRIAL)
    # "imagenet"; "none" (random init: features ~1e-7, learns class frequencies only); "calibrated" (random init
    # with every BatchNorm set from 32 images: offline demos); or a local .weights.h5 path
    weights: str = input_("imagenet")
    input_size: int = result(600, _FEATURES_TRIAL)
    # EfficientNet's top N blocks (of 7, plus its top conv) trained with the head, their BatchNorms kept in
    # inference mode (Keras's fine-tuning guide); 0 = the paper's frozen backbone. Needs mode: exact, and
    # usually a lower lr (the guide uses 1e-5) so ImageNet features are adjusted rather than overwritten.
    train_backbone: int = result(0, _TRIAL, keyed_when_set=True)
    epochs: int = result(30, _TRIAL)
    batch_size: int = result(16, _TRIAL)  # the training batch; feature extraction batches are not results
    lr: float = result(1e-3, _TRIAL)
    dropout: float = result(0.2, _TRIAL)
    # The Keras "fine-tuning EfficientNet" example's layers, which the paper's head follows, in its order:
    # RandomRotation 0.15, RandomTranslation 0.1, RandomFlip, RandomContrast 0.1 (ooc_ray.backbones.AUGMENT_ARGS).
    augment: tuple[Augmentation, ...] = result(("rotation", "translation", "flip", "contrast"), _FEATURES_TRIAL)
    ratios: tuple[float, ...] = grid((0.0, 0.1, 0.25, 0.5, 0.75, 1.0))
    synthetic_only: bool = grid(True)
    # "exact" trains end to end per trial; "cached" trains the head on cached backbone features
    mode: Literal["exact", "cached"] = result("exact", _TRIAL)
    # cached mode: augmented views per training image (view 0 is un-augmented)
    feature_views: int = result(4, _FEATURES_TRIAL, only_if=("mode", "cached"))
    cpus_per_trial: float = resource(1.0)
    gpus_per_trial: float = resource(0.0)
    max_failures: int = resource(2)
    max_concurrent: int = resource(0)  # 0: as many as resources allow
    seed: int = result(0, _FEATURES_TRIAL)
    # How synthetic images enter a real + synthetic arm: "concat" (one shuffled set, the paper's), "loss_weighted"
    # (a real and a synthetic batch per step, loss (1 - w) real + w synthetic, w = synthetic_loss_weight;
    # DataDream: 0.2), "replace" (real-only epochs, each sample swapped for a synthetic image of its class with
    # probability replace_probability; DA-Fusion: 0.5), "split_bn" (the head's BatchNorm, and a SmallCNN's own,
    # keep separate statistics for synthetic images; evaluated with the real ones). Real-only and synthetic-only
    # trials do not mix, so they are shared by every strategy.
    mixing: Mixing = result("concat", _TRIAL, keyed_when_set=True)
    synthetic_loss_weight: float = result(0.2, _TRIAL, only_if=("mixing", "loss_weighted"))
    replace_probability: float = result(0.5, _TRIAL, only_if=("mixing", "replace"))
    # Matched controls per ratio r > 0 (once per fold, no LoRA weight): "real_steps" trains on real images only
    # for as many steps as the real + r arm (the real set drawn round(r x n_train) times more, per class), so
    # "synthetic helps" is never "more steps help"; "real_augmented" adds round(r x n_train) classic augmentations
    # of real training images (flips, 90-degree turns, small rotation, crop, brightness/contrast) instead of
    # synthetic ones.
    controls: tuple[Control, ...] = grid(())


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = grid(True)
    # What KID, CAS, memorisation and the filter are computed on: "backbone", the classifier's frozen backbone
    # (ImageNet EfficientNet with real weights: the usual choice), or "image_statistics", weight-free grey-level,
    # edge and spectrum statistics (ooc_ray.image_statistics): offline, where a random backbone cannot tell
    # cells from noise.
    features: Literal["backbone", "image_statistics"] = result("backbone", ("quality", "search"))
    kid_subsets: int = result(10, ("quality", "search"))
    kid_subset_size: int = result(50, ("quality", "search"))
    # > 0: leave synthetic images a real-trained linear classifier is less sure of out of the pools; the
    # trials' keys then hold the smaller training sets they draw.
    filter_min_confidence: float = grid(0.0)


_SEARCH = ("search",)


@dataclass(frozen=True)
class SearchConfig:
    """Ray Tune + Optuna search over LoRA hyperparameters (experiments/lora_search.yaml)."""

    num_samples: int = grid(20)
    # "cas" (synthetic-only accuracy), "kid" (lower is better) or "accuracy" (downstream); every trial
    # computes all three, the objective only picks which one Optuna follows.
    objective: Literal["cas", "kid", "accuracy"] = grid("cas")
    fold: int = result(0, _SEARCH)
    images_per_class: int = result(16, _SEARCH)
    rank: tuple[int, ...] = grid((4, 8, 16, 32))
    alpha: tuple[float, ...] = grid((1.0, 4.0, 8.0, 16.0, 32.0))
    unet_lr: tuple[float, float] = grid((1e-5, 1e-3))  # log-uniform range
    text_encoder_lr: tuple[float, float] = grid((1e-6, 1e-4))
    epochs: tuple[int, int] = grid((2, 20))
    repeats: tuple[int, int] = grid((1, 4))
    weight: tuple[float, float] = grid((0.5, 1.0))
    seed: int = result(0, _SEARCH)
    # After the search, score the best point and the config's own settings (generator.*, the first of
    # sample.weights) on every fold the search did not choose on: 2 x (k - 1) more trials.
    confirm: bool = grid(True)
    cpus_per_trial: float = resource(1.0)
    gpus_per_trial: float = resource(0.0)
    max_concurrent: int = resource(0)  # 0: as many as resources allow


@dataclass(frozen=True)
class RayConfig:
    address: str = resource("")  # "" starts a local Ray; "auto" joins a cluster
    num_cpus: int = resource(0)  # 0: Ray decides (local only)
    storage_path: str = resource("")  # Ray Tune storage; "" -> results/<name>/ray
    # True where the Ray autoscaler adds nodes on demand: a request no node can meet then waits for one,
    # instead of failing at once.
    autoscaling: bool = resource(False)


@dataclass(frozen=True)
class TrackingConfig:
    # Optional MLflow tracking of every classifier trial and LoRA-search trial, through Ray Tune's own
    # MLflowLoggerCallback (ooc_ray.tracking): params = the grid point and the settings, metrics per epoch, the
    # trial's Parquet files as artifacts. Needs mlflow (`pip install -e ".[tracking]"`). Changes no result.
    mlflow: bool = resource(False)
    # "": a SQLite store under results/<name>/mlflow/ (artifacts beside it); or any MLflow tracking URI
    # (http://host:5000, databricks, sqlite:///path).
    uri: str = resource("")
    experiment: str = resource("")  # the MLflow experiment; "": the experiment's name


@dataclass(frozen=True)
class ReportConfig:
    # Equivalence margin on the tested metric: an arm is "equivalent" to real only when the corrected t's 90 % CI
    # of the difference lies inside +-margin (two one-sided tests at 5 %), so "no benefit" can be a result; also
    # the Bayesian correlated t-test's region of practical equivalence.
    equivalence_margin: float = presentation(0.02)
    # The metric every arm is tested on: accuracy (the paper's headline), balanced_accuracy (macro recall) or
    # f1_macro; with imbalanced classes (the paper's 500/212/110) accuracy rewards the majority class.
    metric: Literal["accuracy", "balanced_accuracy", "f1_macro"] = presentation("accuracy")
    # A CSV of published values shown beside each table (columns weight, ratio, synthetic_only and any of
    # accuracy, precision, recall, f1; weight empty for real only): experiments/paper_reference.csv holds the
    # paper's. "" = none.
    reference: str = presentation("")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = resource("experiment")
    results_dir: str = resource("results")
    data: DataConfig = section(DataConfig)
    folds: FoldsConfig = section(FoldsConfig)
    generator: GeneratorConfig = section(GeneratorConfig)
    sample: SampleConfig = section(SampleConfig)
    classify: ClassifyConfig = section(ClassifyConfig)
    quality: QualityConfig = section(QualityConfig)
    search: SearchConfig = section(SearchConfig)
    ray: RayConfig = section(RayConfig)
    tracking: TrackingConfig = section(TrackingConfig)
    report: ReportConfig = section(ReportConfig)
    # Grid axes beyond ratio x weight: ((dotted field, (values...)), ...), from the file's `axes:` mapping. Every
    # combination is a variant (config.variants) with its own LoRAs, pools and trials, each keyed by content.
    axes: tuple = grid(())

    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.name


# Settings shared by every experiment's tiny mode (`--tiny`): seconds-scale models and data, on CPU. Each
# experiment file adds its own `tiny:` overrides (possibly none) for what it needs beyond these.
TINY = {
    "data.source": "demo", "data.demo.size": 32, "folds.k": 2,
    "generator.base": "tiny", "generator.resolution": 32, "generator.epochs": 1, "generator.repeats": 1,
    "generator.batch_size": 4, "generator.gpus": 0, "generator.mixed_precision": "fp32",
    "sample.resolution": 32, "sample.steps": 2, "sample.gpus_per_actor": 0,
    "classify.backbone": "EfficientNetB0", "classify.weights": "none", "classify.input_size": 32,
    "classify.epochs": 1, "classify.gpus_per_trial": 0, "classify.cpus_per_trial": 1,
    "quality.kid_subsets": 2, "quality.kid_subset_size": 4, "search.gpus_per_trial": 0, "ray.num_cpus": 2,
}
SPECIAL_WEIGHTS = ("imagenet", "none", "calibrated")
EFFICIENTNET_BLOCKS = 7  # Keras names them block1a .. block7x


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
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


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


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


def _check_prompt(key: str, template: str) -> None:
    try:
        template.format(label="label", group="group")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{key}: {template!r} has a bad placeholder ({exc}); use {{label}} and {{group}}") from None


def _check_ranges(cfg: ExperimentConfig) -> None:
    s = cfg.search
    for name in ("unet_lr", "text_encoder_lr", "epochs", "repeats", "weight"):
        low, high = getattr(s, name)
        if low > high:
            raise ConfigError(f"search.{name}: lower bound {low} is above upper bound {high}")
    if not s.rank or not s.alpha:
        raise ConfigError("search.rank / search.alpha: need at least one choice each")


def _check_backbone(cc: ClassifyConfig) -> None:
    """A backbone that trains must run where it trains: only exact mode trains anything but the head."""
    if cc.backbone == "SmallCNN":
        if cc.mode != "exact":
            raise ConfigError("classify.backbone: SmallCNN is trained from scratch in every trial; "
                              "it needs classify.mode: exact (cached mode trains the head only)")
        if cc.weights in ("imagenet", "calibrated"):
            raise ConfigError(f"classify.weights: {cc.weights!r} does not exist for SmallCNN; use none "
                              "(trained from scratch) or a .weights.h5 file")
        if cc.train_backbone:
            raise ConfigError("classify.train_backbone: SmallCNN trains all of its layers; leave it at 0")
        return
    if cc.train_backbone and cc.backbone not in EFFICIENTNETS:
        raise ConfigError(f"classify.train_backbone: training top blocks is built for EfficientNetB0-B7 (whose "
                          f"blocks it names), not {cc.backbone}; leave it at 0 (frozen backbone)")
    if cc.weights == "calibrated" and cc.backbone.startswith("ConvNeXt"):
        raise ConfigError(f"classify.weights: 'calibrated' sets BatchNorm statistics and {cc.backbone} has no "
                          "BatchNorm (it uses LayerNorm); use imagenet, none or a .weights.h5 file")
    if not 0 <= cc.train_backbone <= EFFICIENTNET_BLOCKS:
        raise ConfigError(f"classify.train_backbone: {cc.train_backbone} is not a number of blocks "
                          f"in 0..{EFFICIENTNET_BLOCKS}")
    if cc.train_backbone and cc.mode != "exact":
        raise ConfigError("classify.train_backbone: training backbone blocks needs classify.mode: exact "
                          "(cached mode trains the head on frozen features)")


def _check_pretrain(gc: GeneratorConfig) -> None:
    """The tiny base has a random VAE, which decodes any latent to noise: it must be trained; a real base's
    VAE already reconstructs and is kept (the UNet alone adapts to the domain)."""
    if not gc.pretrain.source:
        return
    if gc.base == "tiny" and gc.pretrain.vae_steps == 0:
        raise ConfigError("generator.pretrain.vae_steps: the tiny base's VAE has random weights; "
                          "pretraining must train it first (vae_steps > 0; the demo uses 800)")
    if gc.base != "tiny" and gc.pretrain.vae_steps:
        raise ConfigError(f"generator.pretrain.vae_steps: {gc.base!r} keeps its trained VAE; set vae_steps: 0")


def _validate(cfg: ExperimentConfig) -> None:
    """Checks that no single field's type can express; each error names its key."""
    checks = [
        (cfg.folds.k >= 2, "folds.k: need at least 2 folds"),
        (cfg.folds.repeats >= 1, "folds.repeats: need at least 1 (1 = plain k-fold CV)"),
        (all(r >= 0 for r in cfg.classify.ratios), "classify.ratios: ratios must be >= 0"),
        (bool(cfg.sample.weights), "sample.weights: need at least one LoRA weight"),
        (0.0 < cfg.sample.strength <= 1.0, "sample.strength: must be in (0, 1]"),
        (cfg.sample.clip_sample >= 0.0, "sample.clip_sample: must be >= 0 (0 = off)"),
        (cfg.sample.clip_sample == 0.0 or cfg.sample.sampler == "ddim",
         f"sample.clip_sample: {cfg.sample.sampler} cannot clip its predicted latent; use sample.sampler: ddim"),
        (bool(cfg.name) and "/" not in cfg.name, f"name: {cfg.name!r} must be a non-empty folder name"),
        (len(cfg.data.demo.per_class) == 3 and min(cfg.data.demo.per_class) >= 1,
         "data.demo.per_class: need 3 positive counts (good, acceptable, bad)"),
        (cfg.data.demo.size >= 16 and cfg.data.demo.groups >= 1, "data.demo: size >= 16 and groups >= 1"),
        (cfg.classify.feature_views >= 1, "classify.feature_views: need at least 1 view"),
        (cfg.search.images_per_class >= 2, "search.images_per_class: need at least 2 images per class"),
        (cfg.generator.pretrain.unet_steps >= 1 and cfg.generator.pretrain.vae_steps >= 0
         and cfg.generator.pretrain.batch_size >= 1,
         "generator.pretrain: unet_steps and batch_size must be >= 1, vae_steps >= 0"),
        (0.0 <= cfg.generator.pretrain.caption_dropout < 1.0, "generator.pretrain.caption_dropout: must be in [0, 1)"),
        (cfg.generator.pretrain.demo_images >= 1, "generator.pretrain.demo_images: must be >= 1"),
        (0.0 <= cfg.classify.synthetic_loss_weight <= 1.0, "classify.synthetic_loss_weight: must be in [0, 1]"),
        (0.0 <= cfg.classify.replace_probability <= 1.0, "classify.replace_probability: must be in [0, 1]"),
        (len(set(cfg.classify.controls)) == len(cfg.classify.controls), "classify.controls: a control is listed twice"),
        (cfg.generator.scope == "class" or not cfg.generator.per_group,
         "generator.scope: one LoRA per dataset has no group to train per; use per_group: false or scope: class"),
        (cfg.classify.mixing != "split_bn" or cfg.classify.backbone != "SmallCNN" or cfg.classify.weights == "none",
         "classify.mixing: split_bn builds SmallCNN with split BatchNorm layers, which a plain SmallCNN weights file "
         "cannot fill; use classify.weights: none (trained from scratch)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_pretrain(cfg.generator)
    _check_prompt("generator.prompt", cfg.generator.prompt)
    _check_prompt("generator.group_prompt", cfg.generator.group_prompt)
    _check_ranges(cfg)
    _check_backbone(cfg.classify)
    if (cfg.tracking.uri or cfg.tracking.experiment) and not cfg.tracking.mlflow:
        raise ConfigError("tracking.uri / tracking.experiment: set, but tracking.mlflow is false, so nothing "
                          "would be tracked; set tracking.mlflow: true or remove them")
    if cfg.report.reference and not Path(cfg.report.reference).expanduser().is_file():
        raise ConfigError(f"report.reference: {cfg.report.reference!r} is not a file")
    weights = cfg.classify.weights
    if weights not in SPECIAL_WEIGHTS and not Path(weights).expanduser().is_file():
        raise ConfigError(f"classify.weights: {weights!r} is neither one of {list(SPECIAL_WEIGHTS)} "
                          "nor an existing weights file")


# Where an axis may vary a field: what makes or uses synthetic images. Data and folds stay fixed, so every
# variant is tested on the same held-out images and the variants' tables can be compared row by row.
AXIS_SECTIONS = ("generator.", "sample.", "classify.")
AXIS_GRID_FIELDS = ("generator.split", "generator.per_group", "generator.scope")
REPLICATE_SEED_STEP = 1000  # replicate r samples with sample.seed + 1000 r (image seeds are hashed from it)


def _field(dotted: str) -> tuple[dict, Any]:
    """(role metadata, type hint) of a leaf field, or ConfigError naming it."""
    cls, parts = ExperimentConfig, dotted.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or fields[part].metadata.get("role") != "section":
            raise ConfigError(f"axes.{dotted}: no such config section '{part}'")
        cls = fields[part].default_factory
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if parts[-1] not in fields or fields[parts[-1]].metadata.get("role") == "section":
        raise ConfigError(f"axes.{dotted}: no such config field")
    return dict(fields[parts[-1]].metadata), typing.get_type_hints(cls)[parts[-1]]


def _parse_axes(raw: Any) -> tuple:
    """The file's `axes:` mapping -> ((dotted field, (coerced values...)), ...), each checked to be a field that
    changes the synthetic images or the trials."""
    if not isinstance(raw, dict):
        raise ConfigError("axes: expected a mapping of config fields to lists of values, e.g. sample.cfg: [2, 7]")
    out = []
    for dotted, values in raw.items():
        meta, hint = _field(dotted)
        if not dotted.startswith(AXIS_SECTIONS):
            raise ConfigError(f"axes.{dotted}: an axis varies generator, sample or classify fields; data and folds "
                              "stay fixed so that every variant is tested on the same held-out images")
        if meta["role"] not in (RESULT, INPUT) and dotted not in AXIS_GRID_FIELDS:
            why = ("changes no result, so every value would give the same numbers" if meta["role"] == RESOURCE
                   else "is already a dimension of the grid (or shapes it); list its values there")
            raise ConfigError(f"axes.{dotted}: {why}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{dotted}: expected a non-empty list of values, got {values!r}")
        coerced = tuple(_coerce(v, hint, f"axes.{dotted}[{i}]") for i, v in enumerate(values))
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"axes.{dotted}: values repeat ({list(values)})")
        out.append((dotted, coerced))
    return tuple(out)


def _with_value(cfg: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _with_value(getattr(cfg, head), rest, value)})


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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(map(format_value, value)) or "none"
    return str(value)


def variants(cfg: ExperimentConfig) -> list[Variant]:
    """Every combination of cfg.axes values x sample.replicates, in file order (the last axis varies fastest),
    each a validated config with those values set and no axes of its own. Without axes or replicates: one
    variant, the config itself."""
    points: list[tuple] = [()]
    for dotted, values in cfg.axes:
        points = [p + ((dotted, v),) for p in points for v in values]
    if cfg.sample.replicates > 1:
        points = [p + (("replicate", r),) for p in points for r in range(cfg.sample.replicates)]
    out = []
    for point in points:
        vcfg = dataclasses.replace(cfg, axes=())
        for name, value in point:
            if name == "replicate":
                vcfg = _with_value(vcfg, "sample.seed", vcfg.sample.seed + REPLICATE_SEED_STEP * value)
            else:
                vcfg = _with_value(vcfg, name, value)
        out.append(Variant(point, vcfg))
    return out


def from_dict(raw: dict | None) -> ExperimentConfig:
    raw = dict(raw or {})
    axes_raw = raw.pop("axes", None)
    cfg = _build(ExperimentConfig, raw)
    _validate(cfg)
    if cfg.sample.replicates < 1:
        raise ConfigError("sample.replicates: need at least 1 (1 = one pool per setting)")
    if axes_raw is not None:
        cfg = dataclasses.replace(cfg, axes=_parse_axes(axes_raw))
        for variant in variants(cfg):
            try:
                _validate(variant.cfg)
            except ConfigError as exc:
                raise ConfigError(f"axes ({variant.label}): {exc}") from None
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), tiny: bool = False
                ) -> ExperimentConfig:
    """Load an experiment YAML; `overrides` are "dotted.key=yaml_value" strings from the CLI (applied last).

    tiny=True applies TINY and the file's own `tiny:` mapping first (seconds-scale settings for tests)."""
    path = Path(path)
    raw = _read_yaml(path)
    tiny_overrides = raw.pop("tiny", None)
    raw.setdefault("name", path.stem)
    if tiny:
        if not isinstance(tiny_overrides, dict):
            raise ConfigError(f"{path}: no `tiny:` mapping (dotted overrides for tiny mode; {{}} for none)")
        for key, value in {**TINY, **tiny_overrides}.items():
            _set_dotted(raw, key, value)
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
    """Plain dict (tuples -> lists) for YAML/JSON/Parquet; axes as the mapping an experiment file writes."""
    out = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if isinstance(cfg, ExperimentConfig):
        out["axes"] = {name: values for name, values in out["axes"]}
    return out


def field_roles(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, dict]:
    """dotted field name -> its metadata (role, feeds, only_if), for every leaf field."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("role") == "section":
            out.update(field_roles(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = dict(f.metadata)
    return out
