"""Experiment configuration: frozen dataclasses, with every default, role and bound of every field in this one
file (the roles themselves: ooc_ray.roles).

An experiment file (experiments/*.yaml) holds only what differs; ooc_ray.load reads it into these classes and
refuses, naming the dotted key, unknown keys, wrong types, values outside a field's Literal choices or bounds.
Every field declares its role once, here, and ooc_ray.keys derives every artifact's key from these roles:
result (enters the keys of the artifacts it feeds), input (its content digest does), grid (which artifacts exist),
resource (never enters a key), presentation (how the report reads results).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ooc_ray.roles import grid, input_, presentation, resource, result, section

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
# How a trial's synthetic images enter training (ooc_ray.classify.train; docs/grid.md: mixing strategies).
Mixing = Literal["concat", "loss_weighted", "replace", "split_bn"]
# Strategies whose synthetic arm takes as many steps per epoch as real only: loss_weighted pairs each real batch
# with a synthetic one, replace swaps images within the real set. Their real_steps control would be real only:
# it is not run under them (protocol.controls_of).
SAME_STEPS_AS_REAL = ("loss_weighted", "replace")
KerasBackend = Literal["tensorflow", "torch", "jax"]
# Matched controls (ooc_ray.protocol): real only for as many steps as each ratio's arm, and real + classic
# augmentations of real images at each ratio's count.
Control = Literal["real_steps", "real_augmented"]
# Every seed: numpy's legacy generator and scikit-learn take 0 <= seed < 2**32, and the stages add small offsets
# (repeat r: + 1000 r, a trial: + its fold, the feeds' streams: + 1 to 7), so seeds stay below 2**31.
SEED = {"ge": 0, "lt": 2**31}


@dataclass(frozen=True)
class DemoDataConfig:
    """The microscopy-like image set the project generates itself (ooc_ray.demo_data)."""

    per_class: tuple[int, ...] = input_((30, 14, 8), ge=1)  # good/acceptable/bad, roughly the paper's 500/212/110 shape
    size: int = input_(64, ge=16)  # pixels per side the demo images are drawn at
    groups: int = input_(3, ge=1)  # fake "cell lines", written to the CSV's group column
    seed: int = input_(0, **SEED)  # the demo set's random seed


@dataclass(frozen=True)
class DataConfig:
    # "demo" builds the generated set under results/<name>/demo_data; otherwise a folder-per-class
    # root or a CSV file with columns file,label[,group] (paths relative to the CSV's folder).
    source: str = input_("demo")
    classes: tuple[str, ...] = grid((), unique=True)  # empty: every folder/label found; else the allowed labels, in this order
    group_column: str = grid("")  # CSV column holding cell line / well / patient; "" = no groups
    # Near copies (one picture re-encoded or resized: ooc_ray.near_copies) under two labels or in two folds, or
    # among the pretraining images: "refuse" stops the data (or pretrain) stage naming every pair; "allow" names
    # them in a warning and goes on, for distinct images the check mistakes for copies. Changes no number.
    near_copies: Literal["refuse", "allow"] = resource("refuse")
    demo: DemoDataConfig = section(DemoDataConfig)


@dataclass(frozen=True)
class FoldsConfig:
    k: int = grid(5, ge=2)  # folds of the k-fold cross-validation (the paper: 5)
    seed: int = grid(42, **SEED)  # the shuffle seed of the fold assignment
    # Repeated k-fold CV: R independent partitions (repeat r shuffled with seed + 1000 r); every stage runs per
    # (repeat, fold), and the report's tests pair all R x k folds (ooc_ray.comparisons).
    repeats: int = grid(1, ge=1)
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
    demo_images: int = input_(300, ge=1)  # how many unlabeled demo images source: demo draws
    demo_seed: int = input_(1, **SEED)  # the seed those images are drawn with (not the labelled set's)
    caption: str = result("a microscopy image of cells", _BASE)  # one class-agnostic caption for every image
    vae_steps: int = result(0, _BASE, ge=0)  # the tiny base needs > 0 (its VAE is trained first, then frozen); a real base 0
    unet_steps: int = result(500, _BASE, ge=1)  # UNet training steps (the base's noise prediction)
    batch_size: int = result(16, _BASE, ge=1)  # the demo: 16 (~0.14 s per UNet step on 2 CPU cores at 16x16 latents)
    vae_lr: float = result(1e-3, _BASE, gt=0)  # 2e-3 reconstructed the demo cells worse at every step count (measured)
    unet_lr: float = result(1e-3, _BASE, gt=0)  # the UNet's learning rate (AdamW)
    # Share of steps that see the empty caption, so the base also learns the unconditional prediction that
    # classifier-free guidance (sample.cfg) subtracts; SD v1 trained with 10 %.
    caption_dropout: float = result(0.1, _BASE, ge=0, lt=1)
    seed: int = result(0, _BASE, **SEED)  # seeds the tiny base's initial weights, the noise and the timesteps
    # The pretraining runs as one Ray task with these (never on a head node that offers no CPU for work).
    cpus: float = resource(1.0, gt=0)  # its torch threads too
    gpus: float = resource(0.0, ge=0)  # GPUs of the pretraining task (0 on CPU)


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
    resolution: int = result(512, _LORA, ge=8)  # pixels per side the LoRA trains at (SD v1.5: 512)
    repeats: int = result(2, _LORA, ge=1)  # times each training image is seen per epoch (kohya's repeats)
    epochs: int = result(10, _LORA, ge=1)  # passes over the repeated training images
    batch_size: int = result(2, _LORA, ge=1)  # a training batch: changes the gradient steps, so it is a result
    unet_lr: float = result(5e-4, _LORA, gt=0)  # the UNet LoRA's learning rate (AdamW, constant)
    text_encoder_lr: float = result(1e-4, _LORA, ge=0)  # 0 disables the text-encoder LoRA
    rank: int = result(8, _LORA, ge=1)  # the LoRA's rank (the paper: 8)
    alpha: float = result(8.0, _LORA, gt=0)  # the LoRA's alpha: its update is scaled by alpha / rank
    seed: int = result(0, _LORA, **SEED)  # seeds the LoRA's initial weights, the noise and the timesteps of training
    prompt: str = grid("a microscopy image of {label} organ on chip cells")  # each LoRA's key holds its prompt
    # The prompt of a per-group LoRA (generator.per_group).
    group_prompt: str = grid("a microscopy image of {label} {group} cells")
    # "fp16"/"bf16" on GPU (not "no": YAML reads a bare no as false); numbers differ, so a result.
    mixed_precision: Literal["fp32", "fp16", "bf16"] = result("fp32", _LORA)
    gpus: float = resource(0.0, ge=0)  # GPUs per fine-tuning task (a Ray task); 0 on CPU
    cpus: float = resource(1.0, gt=0)  # CPUs per fine-tuning task: its torch threads, and where it may run
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
    weights: tuple[float, ...] = grid((1.0, 0.8), unique=True)  # LoRA weights, one synthetic pool each
    # The diffusers scheduler: euler_a (EulerAncestral) or ddim.
    sampler: Literal["euler_a", "ddim"] = result("euler_a", _IMAGE)
    # > 0 (ddim only): clip the sampler's predicted clean latent to [-v, v] at every step (Imagen's static
    # thresholding), in the VAE's scaled latent space (unit variance for the demo's pretrained base, ~1 for SD's
    # 0.18215). An undertrained epsilon-prediction UNet can drift: the demo's pretrained base drew 41 % of its
    # images as dark blank frames (per-image latent means of -5 where real ones lie within +-1); with 2.0, none.
    # It pulls every image toward the average one, though (bad's KID rose 8x, the linear CAS fell from 0.62 to
    # 0.27). The tiny base now predicts v instead, which removed the drift without clipping (base.py).
    clip_sample: float = result(0.0, _IMAGE, keyed_when_set=True, ge=0)
    steps: int = result(20, _IMAGE, ge=1)  # denoising steps per image
    # Classifier-free guidance scale. 1.0: no guidance pass; diffusers guides only above 1, so every value in
    # [0, 1] would sample exactly as 1 does (measured: bit-identical images at 0, 0.5 and 1).
    cfg: float = result(7.0, _IMAGE, ge=1)
    # "" = the unconditional prompt of classifier-free guidance; used only where sample.cfg > 1.
    negative_prompt: str = result("", _IMAGE)
    mode: Literal["txt2img", "img2img"] = result("txt2img", _IMAGE)  # img2img starts from a real training image
    # Img2img: how far from the real start image (1.0 = all noise).
    strength: float = result(0.6, _IMAGE, only_if=("mode", "img2img"), gt=0, le=1)
    resolution: int = result(512, _IMAGE, ge=8)  # pixels per side the images are sampled at
    # Images per pipeline call. Batched matmuls can move the last bits of an image (as moving to a GPU does),
    # never what it depicts: a resource, so a new batch size re-uses the images already sampled.
    batch_size: int = resource(4, ge=1)
    actors: int = resource(0, ge=0)  # 0: one per GPU, or 1 on CPU
    gpus_per_actor: float = resource(0.0, ge=0)  # GPUs per sampling actor (each holds one loaded pipeline)
    seed: int = result(1234, _IMAGE, **SEED)  # base seed; each image's seed is derived from it and recorded
    # Independent pools for the same settings: replicate r samples with seed + REPLICATE_SEED_STEP x r (replicate
    # 0 is the pool of `seed`), and runs its own trials, so the report can tell generator randomness from the
    # classifier's.
    replicates: int = grid(1, ge=1)
    output_size: int = result(0, _IMAGE, ge=0)  # 0: keep the sampler's resolution; else resize saved PNGs to this


_FEATURES_TRIAL = ("features", "trial")
_TRIAL = ("trial",)


@dataclass(frozen=True)
class ClassifyConfig:
    # A keras.applications backbone (EfficientNetB0-B7, V2, ResNet50V2, DenseNet121, ConvNeXt) or SmallCNN.
    backbone: Backbone = result("EfficientNetB7", _FEATURES_TRIAL)
    # "imagenet"; "none" (random init, for what trains from it: SmallCNN, or train_backbone's blocks);
    # "calibrated" (random init with every BatchNorm set from 32 images: offline demos); "random" (a frozen
    # keras.applications backbone left at its random init: features ~1e-7, the head learns class frequencies
    # only; for tests of the plumbing, and the report says so); or a local .weights.h5 path
    weights: str = input_("imagenet")
    input_size: int = result(600, _FEATURES_TRIAL, ge=16)  # pixels per side the classifier sees (EfficientNetB7: 600)
    # EfficientNet's top N blocks (of 7, plus its top conv) trained with the head, their BatchNorms kept in
    # inference mode (Keras's fine-tuning guide); 0 = the paper's frozen backbone. Needs mode: exact, and
    # usually a lower lr (the guide uses 1e-5) so ImageNet features are adjusted rather than overwritten.
    train_backbone: int = result(0, _TRIAL, keyed_when_set=True, ge=0, le=7)
    # The framework Keras runs the classifier on (ooc_ray.backend): "tensorflow", the paper's; "torch", so a GPU
    # node needs one CUDA framework (the generator's) and no TensorFlow; or "jax". Weights files are the same on
    # each; features and trials differ by float rounding and by each framework's random streams, so it is a result.
    backend: KerasBackend = result("tensorflow", _FEATURES_TRIAL, keyed_when_set=True)
    epochs: int = result(30, _TRIAL, ge=1)  # training epochs per trial
    batch_size: int = result(16, _TRIAL, ge=1)  # the training batch; feature extraction batches are not results
    lr: float = result(1e-3, _TRIAL, gt=0)  # the classifier's learning rate (Adam)
    dropout: float = result(0.2, _TRIAL, ge=0, lt=1)  # dropout before the head's dense layer
    # The Keras "fine-tuning EfficientNet" example's layers, which the paper's head follows, in its order:
    # RandomRotation 0.15, RandomTranslation 0.1, RandomFlip, RandomContrast 0.1 (ooc_ray.backbones.AUGMENT_ARGS).
    augment: tuple[Augmentation, ...] = result(("rotation", "translation", "flip", "contrast"), _FEATURES_TRIAL,
                                                unique=True)
    # Synthetic images per real training image of each arm (0.0 = real only). At most 100: the paper's ~658
    # training images per fold (4/5 of 822) would then draw ~65,800 per fold and LoRA weight, ~2.8 h of sampling on
    # an H200 at 6.57 images/s (docs/gpu.md).
    ratios: tuple[float, ...] = grid((0.0, 0.1, 0.25, 0.5, 0.75, 1.0), ge=0, le=100, unique=True)
    synthetic_only: bool = grid(True)  # also train on synthetic images alone (the classification accuracy score)
    # The share of each training fold, per class, that the LoRAs, pools and classifiers learn from (ooc_ray.folds:
    # nested, so 0.25's images are inside 0.5's; held-out folds stay whole). An axis over it gives the real-set-size
    # curve and what a synthetic image is worth in real ones: axes: {classify.real_fraction: [0.25, 0.5, 1.0]}.
    # LoRA, pool and trial keys hold the images themselves; the quality tables' key holds the fraction, as their
    # real reference images are the fraction's.
    real_fraction: float = result(1.0, ("quality",), keyed_when_set=True, gt=0, le=1)
    # "exact" trains end to end per trial; "cached" trains the head on cached backbone features
    mode: Literal["exact", "cached"] = result("exact", _TRIAL)
    # cached mode: augmented views per training image (view 0 is un-augmented)
    feature_views: int = result(4, _FEATURES_TRIAL, only_if=("mode", "cached"), ge=1)
    cpus_per_trial: float = resource(1.0, gt=0)  # CPUs per trial and per feature-extraction task (TensorFlow's threads)
    gpus_per_trial: float = resource(0.0, ge=0)  # GPUs per exact-mode trial and per feature-extraction task
    max_failures: int = resource(2, ge=0)  # times Tune restarts a trial that failed or lost its node
    max_concurrent: int = resource(0, ge=0)  # 0: as many as resources allow
    seed: int = result(0, _FEATURES_TRIAL, **SEED)  # seeds the classifier's weights, shuffling and augmentation
    # How synthetic images enter a real + synthetic arm: "concat" (one shuffled set, the paper's), "loss_weighted"
    # (a real and a synthetic batch per step, loss (1 - w) real + w synthetic, w = synthetic_loss_weight;
    # DataDream: 0.2), "replace" (real-only epochs, each sample swapped for a synthetic image of its class with
    # probability replace_probability; DA-Fusion: 0.5), "split_bn" (the head's BatchNorm, and a SmallCNN's own,
    # keep separate statistics for synthetic images; evaluated with the real ones). Real-only and synthetic-only
    # trials do not mix, so they are shared by every strategy.
    mixing: Mixing = result("concat", _TRIAL, keyed_when_set=True)
    # Mixing: loss_weighted: the synthetic stream's share w of the loss.
    synthetic_loss_weight: float = result(0.2, _TRIAL, only_if=("mixing", "loss_weighted"), ge=0, le=1)
    # Mixing: replace: the chance a real sample is swapped for a synthetic one.
    replace_probability: float = result(0.5, _TRIAL, only_if=("mixing", "replace"), ge=0, le=1)
    # Matched controls per ratio r > 0 (once per fold, no LoRA weight): "real_steps" trains on real images only
    # for as many steps as the real + r arm (the real set drawn round(r x n_train) times more, per class), so
    # "synthetic helps" is never "more steps help" (under mixing concat and split_bn; loss_weighted and replace
    # take real only's steps and run no real_steps); "real_augmented" adds round(r x n_train) classic augmentations
    # of real training images (flips, 90-degree turns, small rotation, crop, brightness/contrast) instead of
    # synthetic ones.
    controls: tuple[Control, ...] = grid((), unique=True)


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = grid(True)  # whether `run` runs the quality stage (KID, MMD, nearest real, linear probe)
    # What KID, CAS, memorisation and the filter are computed on: "backbone", the classifier's frozen backbone
    # (ImageNet EfficientNet with real weights: the usual choice), or "image_statistics", weight-free grey-level,
    # edge and spectrum statistics (ooc_ray.image_statistics): offline, where a random backbone cannot tell
    # cells from noise.
    features: Literal["backbone", "image_statistics"] = result("backbone", ("quality", "search"))
    kid_subsets: int = result(10, ("quality", "search"), ge=1)  # KID: random subsets averaged
    kid_subset_size: int = result(50, ("quality", "search"), ge=2)  # KID: images per subset (at most the pool's size)
    # Precision/recall and density/coverage: the k of their k-nearest-neighbour balls (Naeem et al. 2020 use 5); a
    # class with no more than k real (or, for recall, synthetic) images of a fold gets NaN.
    nn_k: int = result(5, ("quality", "search"), keyed_when_set=True, ge=1)
    # > 0: leave synthetic images whose quality.filter_measure is below it out of the pools; the trials' keys then
    # hold the smaller training sets they draw.
    filter_min_confidence: float = grid(0.0, ge=0, le=1)
    # The per-image score the filter thresholds: "real_confidence" (a linear classifier trained on the fold's real
    # images: its probability of the image's class), "precision" (1 inside the class's real k-NN balls, else 0)
    # or "density" (real balls holding the image, over quality.nn_k). The report's measure validity says which
    # pool-level measure predicted the accuracy change on a run's data.
    filter_measure: Literal["real_confidence", "precision", "density"] = grid("real_confidence")


_SEARCH = ("search",)


# The search's default space: the LoRA settings kohya users tune first, and the sampling weight. Each entry is
# (dotted field, distribution, values): choice lists the values; uniform and loguniform give [low, high];
# randint gives [low, high], both ends included. sample.weights in a space is the one LoRA weight a point samples.
SEARCH_SPACE = (
    ("generator.rank", "choice", (4, 8, 16, 32)),
    ("generator.alpha", "choice", (1.0, 4.0, 8.0, 16.0, 32.0)),
    ("generator.unet_lr", "loguniform", (1e-5, 1e-3)),
    ("generator.text_encoder_lr", "loguniform", (1e-6, 1e-4)),
    ("generator.epochs", "randint", (2, 20)),
    ("generator.repeats", "randint", (1, 4)),
    ("sample.weights", "uniform", (0.5, 1.0)),
)
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def confirmation_folds(fold_ids: list[int]) -> list[int]:
    """search.confirm_folds' default: the last ceil(n / 3) of the n folds (one at k = 3, two at k = 4 to 6)."""
    return fold_ids[-math.ceil(len(fold_ids) / 3):]


@dataclass(frozen=True)
class SearchConfig:
    """Ray Tune + Optuna search over LoRA and sampling settings (experiments/lora_search.yaml)."""

    num_samples: int = grid(20, ge=1)  # search trials (points Optuna proposes)
    # "cas" (synthetic-only accuracy), "kid" (lower is better), "accuracy" (downstream) or a distribution measure
    # of the quality stage ("fd": lower is better; "precision", "recall", "density", "coverage", "vendi"); every
    # trial computes them all, the objective only picks which one Optuna follows.
    objective: Literal["cas", "kid", "accuracy", "fd", "precision", "recall", "density", "coverage", "vendi"] = grid(
        "cas")
    # The space Optuna proposes points in, from the file's `search.space` mapping of fields to one distribution
    # each, e.g. {generator.unet_lr: {loguniform: [1.0e-4, 3.0e-3]}, generator.rank: {choice: [2, 4, 8, 16]},
    # sample.cfg: {uniform: [1, 7]}}: any generator or sample field an axis may vary (ooc_ray.load checks each, and
    # each end or choice against the field's own bounds). Stored as ((field, distribution, values), ...).
    space: tuple = grid(SEARCH_SPACE)
    # The folds each trial trains and scores on; the objective is their mean (its standard error and every
    # fold's value are recorded). (): every fold but the confirmation folds.
    folds: tuple[int, ...] = grid((), ge=0, unique=True)
    # Folds the search never scores on: the best point and the config's own settings are compared there, with
    # the corrected paired t-test. (): the last ceil(k / 3) folds (one at k = 3, two at k = 4 to 6).
    confirm_folds: tuple[int, ...] = grid((), ge=0, unique=True)
    images_per_class: int = result(16, _SEARCH, ge=2)  # LoRA training images (at most) and synthetic images per class
    # Early stopping (Ray Tune's schedulers): a trial reports its objective every `report_every` LoRA epochs (a
    # small pool sampled and scored at each), and "asha" (asynchronous successive halving) or "median" (the
    # median stopping rule) ends trials that trail the others at the same epoch; "none" runs every trial to its end.
    scheduler: Literal["asha", "median", "none"] = grid("asha")
    report_every: int = grid(5, ge=0)  # LoRA epochs between a trial's reports; 0: one report, at its end
    reduction_factor: int = grid(3, ge=2)  # ASHA: about 1 in this many trials goes on at each rung
    time_budget_s: float = grid(0.0, ge=0)  # stop proposing trials after this many seconds (0: num_samples decides)
    seed: int = result(0, _SEARCH, **SEED)  # Optuna's sampler seed
    # After the search, compare the best point with the config's own settings (generator.*, the first of
    # sample.weights) on the confirmation folds: 2 trials per confirmation fold.
    confirm: bool = grid(True)
    cpus_per_trial: float = resource(1.0, gt=0)  # CPUs per search trial: its torch threads too
    gpus_per_trial: float = resource(0.0, ge=0)  # GPUs per search trial (LoRA training, sampling, then the classifier)
    max_concurrent: int = resource(0, ge=0)  # 0: as many as resources allow


@dataclass(frozen=True)
class RayConfig:
    address: str = resource("")  # "" starts a local Ray; "auto" joins a cluster
    num_cpus: int = resource(0, ge=0)  # 0: Ray decides (local only)
    storage_path: str = resource("")  # Ray Tune storage; "" -> results/<name>/ray
    # True where the Ray autoscaler adds nodes on demand: a request no node can meet then waits for one,
    # instead of failing at once.
    autoscaling: bool = resource(False)
    # A node lost mid-run (a spot instance reclaimed, an OOM-killed raylet) costs only the work in flight on it:
    # its tasks run again elsewhere (pretraining, LoRAs, features: Ray's max_retries), its sampling batches go to
    # another actor, each at most this many times (classifier trials: classify.max_failures).
    max_retries: int = resource(3, ge=0)
    # How long a stage waits, without progress, while no alive node can serve its request (every node that could
    # is gone) before it fails naming the request; a re-run after a node returns resumes.
    node_wait_s: float = resource(300.0, gt=0)
    # Idle worker processes a local Ray keeps (Ray's num_workers_soft_limit; its own default is the CPU count): a
    # kept worker has torch (or TensorFlow) imported and the base loaded, so the next stage's tasks start at once
    # (the tiny demo's finetune stage: 6.7 s cold, 1.6 s with warm workers). Each holds ~1 GB.
    keep_workers: int = resource(6, ge=0)


@dataclass(frozen=True)
class TrackingConfig:
    # Optional MLflow tracking (ooc_ray.experiment_tracking): a parent run per experiment config (config.yaml and
    # report.html as artifacts) with a child run per pretrained base and per LoRA (settings, loss curves, key) and
    # per classifier or LoRA-search trial (grid point and settings, metrics per epoch, the trial's Parquet files).
    # Needs mlflow (`pip install -e ".[tracking]"`). Changes no result.
    mlflow: bool = resource(False)
    # "": a SQLite store under results/<name>/mlflow/ (artifacts beside it); or any MLflow tracking URI
    # (http://host:5000, databricks, sqlite:///path).
    uri: str = resource("")
    experiment: str = resource("")  # the MLflow experiment; "": the experiment's name


@dataclass(frozen=True)
class ReportConfig:
    # Equivalence margin on the tested metric: an arm is "equivalent" to real only when the corrected t's 90 % CI
    # of the difference lies inside +-margin (two one-sided tests at 5 %), so "no benefit" can be a result; also
    # the Bayesian correlated t-test's region of practical equivalence. Below 1, as every metric lies in [0, 1].
    equivalence_margin: float = presentation(0.02, gt=0, lt=1)
    # The metric every arm is tested on: accuracy (the paper's headline), balanced_accuracy (macro recall) or
    # f1_macro; with imbalanced classes (the paper's 500/212/110) accuracy rewards the majority class.
    metric: Literal["accuracy", "balanced_accuracy", "f1_macro"] = presentation("accuracy")
    # A CSV of published values shown beside each table (columns weight, ratio, synthetic_only and any of
    # accuracy, precision, recall, f1; weight empty for real only): experiments/paper_reference.csv holds the
    # paper's. "" = none.
    reference: str = presentation("")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = resource("experiment")  # the experiment's name: its results go to results_dir/name
    # Where every experiment's folder is made (absolute, on shared storage, for a cluster).
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
    "classify.backbone": "EfficientNetB0", "classify.weights": "random", "classify.input_size": 32,
    "classify.epochs": 1, "classify.gpus_per_trial": 0, "classify.cpus_per_trial": 1,
    # One trial actor: each imports TensorFlow (~7 s of CPU, measured), more than a tiny trial's whole work (~1 s).
    "classify.max_concurrent": 1,
    "quality.kid_subsets": 2, "quality.kid_subset_size": 4, "quality.nn_k": 2, "search.gpus_per_trial": 0,
    "ray.num_cpus": 2,
}
RANDOM_WEIGHTS = "random"  # a frozen backbone at its random init: a test of the plumbing, never a result
SPECIAL_WEIGHTS = ("imagenet", "none", "calibrated", RANDOM_WEIGHTS)
EFFICIENTNET_BLOCKS = 7  # Keras names them block1a .. block7x


REPLICATE_SEED_STEP = 1000  # replicate r samples with sample.seed + 1000 r (image seeds are hashed from it)
