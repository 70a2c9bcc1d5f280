"""The classifier's backbones by name, without Keras: which families exist, the pixels each one's ImageNet weights
expect, the augmentation layers and their strengths, and classify.weights resolved to a value and an identity.
ooc_ray.networks builds the Keras models from these; the report and the planners need only this module.

The frozen backbone runs in inference mode (its BatchNorm uses stored statistics, its stochastic-depth dropout is
off), as Keras's transfer-learning guide prescribes; that is what lets cached mode precompute its output exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.config import EFFICIENTNETS, RANDOM_WEIGHTS, ClassifyConfig
from ooc_ray.io import sha256_file

# Augmentation strengths: those of the Keras "fine-tuning EfficientNet" example the paper's model follows
# (rotation 0.15 of a turn, 10% translation/contrast); zoom and brightness at 10% as well. Microscopy has no
# canonical orientation, so flips are both horizontal and vertical.
AUGMENT_ARGS = {
    "flip": ("RandomFlip", {"mode": "horizontal_and_vertical"}),
    "rotation": ("RandomRotation", {"factor": 0.15}),
    "zoom": ("RandomZoom", {"height_factor": 0.1}),
    "contrast": ("RandomContrast", {"factor": 0.1}),
    "translation": ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
    "brightness": ("RandomBrightness", {"factor": 0.1, "value_range": (0.0, 255.0)}),
}


SMALL_CNN = "SmallCNN"
# Four stages of one 3x3 convolution (BatchNorm, ReLU) and a 2x2 max-pool, then global average pooling:
# ~97k weights, a receptive field of 46 px, 64 M multiply-adds per 128 px image (EfficientNetB0: ~130 M),
# so a trial trains from scratch in seconds on 2 CPU cores. BatchNorm momentum 0.9, not Keras's 0.99: a
# small set gives a few hundred steps, after which 0.99 would still keep 0.99^300 = 5 % of the initial
# statistics (measured on the demo: 0.97 training accuracy, 0.25 held-out at momentum 0.99, 150 steps).
SMALL_CNN_WIDTHS = (16, 32, 64, 128)
SMALL_CNN_BN_MOMENTUM = 0.9


# How each keras.applications backbone's ImageNet weights expect their pixels (its preprocess_input), as a
# per-channel scale and offset on 0..255 images: None where the model does it itself (EfficientNet always,
# EfficientNetV2 and ConvNeXt with include_preprocessing=True, their default). tests/test_classify_model.py
# checks every pair against keras.applications.<family>.preprocess_input.
_IMAGENET_MEAN, _IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
PREPROCESSING = {
    **{name: None for name in EFFICIENTNETS},
    **{f"EfficientNetV2{v}": None for v in ("B0", "B1", "B2", "B3", "S")},
    "ConvNeXtTiny": None, "ConvNeXtSmall": None,
    "ResNet50V2": (np.full(3, 1 / 127.5), np.full(3, -1.0)),  # "tf" mode: x / 127.5 - 1
    "DenseNet121": (1 / (255 * _IMAGENET_STD), -_IMAGENET_MEAN / _IMAGENET_STD),  # "torch": (x/255 - mean) / std
}


def top_block_prefixes(n_blocks: int) -> tuple[str, ...]:
    """Layer-name prefixes of EfficientNet's top `n_blocks` blocks (block7*, block6*, ...) and its top conv."""
    return tuple(f"block{b}" for b in range(8 - n_blocks, 8)) + ("top_conv",) if n_blocks else ()


# Why calibrated weights: a random-init EfficientNet's activations shrink through its blocks (measured, B0 at
# 32 px: std 0.1 after the stem, 1e-6 at top_conv), so pooled features are ~1e-7 and the head's BatchNorm
# (epsilon 1e-3) flattens them to zero: every model predicts from its bias alone (demo: majority class only).
# Re-estimating the last BatchNorm's statistics on real images gives features of unit scale that differ between
# images, without downloading anything. An offline stand-in for ImageNet weights, not a replacement.
CALIBRATED = "calibrated"
CALIBRATION_IMAGES = 32
CALIBRATION_VERSION = 2  # part of the weights' identity: bump when write_calibrated_weights changes


@dataclass(frozen=True)
class BackboneWeights:
    """classify.weights resolved for this run: the value Keras takes, and the identity that enters keys."""

    value: str | None  # "imagenet", None (random init, seeded by classify.seed) or an absolute file path
    identity: str


def backbone_weights(cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame) -> BackboneWeights:
    """Resolve classify.weights to what Keras loads and the identity keys hold, building nothing. "calibrated"
    names a weights file by what it is computed from: the first 32 images by id, from every fold (label-free
    input statistics, but a look at held-out images, which is why it is for offline demos, not for results);
    ooc_ray.networks.built_weights writes it."""
    if cc.weights == "imagenet":
        return BackboneWeights("imagenet", "imagenet")
    if cc.weights in ("none", RANDOM_WEIGHTS):  # random: the init of a frozen none (which ooc_ray.checks refuses)
        if cc.backbone == SMALL_CNN:
            # Its architecture is this module's code, not a Keras release: the identity carries it, so trials
            # of an earlier SmallCNN are never re-used for a changed one.
            return BackboneWeights(None, "none-" + keys.digest(SMALL_CNN, SMALL_CNN_WIDTHS, SMALL_CNN_BN_MOMENTUM))
        return BackboneWeights(None, "none")
    if cc.weights != CALIBRATED:
        path = Path(cc.weights).expanduser().resolve()
        return BackboneWeights(str(path), f"file-{sha256_file(path)}")
    images = calibration_images(manifest)
    # The calibration pass runs on classify.backend: its statistics differ by float rounding between frameworks.
    backend = () if cc.backend == "tensorflow" else (cc.backend,)
    identity = "calibrated-" + keys.digest(CALIBRATION_VERSION, cc.backbone, cc.input_size, cc.seed,
                                           keys.table_digest(images, keys.IMAGE_COLUMNS), *backend)
    return BackboneWeights(str(Path(models_dir) / f"{identity}.weights.h5"), identity)


def calibration_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """The images "calibrated" weights are set from: the first CALIBRATION_IMAGES by id."""
    return manifest.sort_values("id").head(CALIBRATION_IMAGES)
