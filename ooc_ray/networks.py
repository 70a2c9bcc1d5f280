"""The classifier's Keras networks (on classify.backend's framework): the augmentation layers, the SmallCNN
trained from scratch, the keras.applications backbones (frozen, or with their top blocks trained), split BatchNorm, and the offline
"calibrated" weights. Keras is imported here, at the top: only the processes that run a network load this module,
through ooc_ray.backend.keras_side, which picks Keras's framework first (the report and the planners read
ooc_ray.backbones).
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras import layers, ops

from ooc_ray.backend import framework_ops
from ooc_ray.backbones import (AUGMENT_ARGS, CALIBRATED, CALIBRATION_IMAGES, PREPROCESSING, SMALL_CNN,
                               SMALL_CNN_BN_MOMENTUM, SMALL_CNN_WIDTHS, BackboneWeights, backbone_weights,
                               calibration_images, top_block_prefixes)
from ooc_ray.config import ClassifyConfig
from ooc_ray.images import load_image
from ooc_ray.errors import ConfigError, ModelError


def framework():
    """The module of what differs on the framework this process's Keras runs on (ooc_ray.backend)."""
    return framework_ops(keras.backend.backend())


def build_augmentation(names, seed: int):
    """keras.Sequential of random layers in config order, or None when `names` is empty."""

    if not names:
        return None
    layers = []
    for i, name in enumerate(names):
        cls, kwargs = AUGMENT_ARGS[name]
        layers.append(getattr(keras.layers, cls)(seed=seed + i, **kwargs))
    return keras.Sequential(layers, name="augmentation")


class SplitBatchNormalization(keras.layers.Layer):
    """classify.mixing: split_bn. BatchNormalization whose batch and moving statistics are kept apart for real
    (flag 0) and synthetic (flag 1) samples, with one shared scale and shift: each sample is normalised with the
    statistics of its own kind in training, and every sample with the real moving statistics at inference (the
    held-out images are real). The auxiliary-BatchNorm idea of AdvProp (Xie et al., CVPR 2020) and of
    domain-specific BatchNorm (Chang et al., CVPR 2019), here for synthetic images. On pooled features or on
    convolution maps (statistics per channel over samples and positions, as BatchNormalization). Moving statistics
    follow Keras's update, m <- momentum m + (1 - momentum) batch moment, with the biased batch variance; a kind
    absent from a batch leaves its statistics unchanged."""

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        dim = (input_shape[0][-1],)
        self.gamma = self.add_weight(shape=dim, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=dim, initializer="zeros", name="beta")
        stat = {"shape": dim, "trainable": False}
        self.real_mean = self.add_weight(initializer="zeros", name="real_mean", **stat)
        self.real_var = self.add_weight(initializer="ones", name="real_variance", **stat)
        self.synthetic_mean = self.add_weight(initializer="zeros", name="synthetic_mean", **stat)
        self.synthetic_var = self.add_weight(initializer="ones", name="synthetic_variance", **stat)

    def _normalise(self, x, mean, var):
        return (x - mean) * ops.rsqrt(var + self.epsilon) * self.gamma + self.beta

    def _moments(self, x, weight, moving_mean, moving_var):
        axes = tuple(range(len(x.shape) - 1))  # every axis but the channels, as BatchNormalization
        count = ops.sum(weight * ops.ones_like(x[..., :1]))  # samples x positions of this kind
        safe = ops.maximum(count, 1.0)
        mean = ops.sum(x * weight, axis=axes) / safe
        var = ops.sum(ops.square(x - mean) * weight, axis=axes) / safe
        present = count > 0
        m = self.momentum
        # Read as tensors: JAX's where refuses a Keras variable itself.
        old_mean, old_var = ops.convert_to_tensor(moving_mean), ops.convert_to_tensor(moving_var)
        moving_mean.assign(ops.where(present, old_mean * m + mean * (1 - m), old_mean))
        moving_var.assign(ops.where(present, old_var * m + var * (1 - m), old_var))
        return mean, var

    def call(self, inputs, training=False):
        x, flag = inputs
        if not training:
            return self._normalise(x, self.real_mean, self.real_var)
        synthetic = ops.reshape(ops.cast(flag, x.dtype), (-1,) + (1,) * (len(x.shape) - 1))
        real = 1.0 - synthetic
        real_mean, real_var = self._moments(x, real, self.real_mean, self.real_var)
        syn_mean, syn_var = self._moments(x, synthetic, self.synthetic_mean, self.synthetic_var)
        return (real * self._normalise(x, real_mean, real_var)
                + synthetic * self._normalise(x, syn_mean, syn_var))


def build_small_cnn(input_size: int, weights: str | None = None, split: bool = False):
    """The SmallCNN backbone (images 0..255 in, pooled features out), random init or a weights file. split: its
    BatchNorms keep synthetic statistics apart (classify.mixing split_bn): inputs (images, synthetic flag)."""

    def stage_layers(stage: int, width: int) -> tuple:
        norm = SplitBatchNormalization if split else layers.BatchNormalization
        return (layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"s{stage}_conv"),
                norm(momentum=SMALL_CNN_BN_MOMENTUM, name=f"s{stage}_bn"), layers.ReLU(), layers.MaxPooling2D(2))

    stages = [stage_layers(stage, width) for stage, width in enumerate(SMALL_CNN_WIDTHS)]
    image = keras.Input((input_size, input_size, 3))
    if not split:  # a Sequential, as SmallCNN has always been built: the same initial weights for a seed
        model = keras.Sequential([image, layers.Rescaling(1 / 127.5, offset=-1.0),
                                  *(layer for stage in stages for layer in stage), layers.GlobalAveragePooling2D()],
                                 name="small_cnn")
    else:
        flag = keras.Input((1,), name="synthetic")
        x = layers.Rescaling(1 / 127.5, offset=-1.0)(image)
        for conv, norm, relu, pool in stages:
            x = pool(relu(norm([conv(x), flag])))
        model = keras.Model([image, flag], layers.GlobalAveragePooling2D()(x), name="small_cnn")
    if weights is not None:
        try:
            model.load_weights(weights)
        except (OSError, ValueError) as exc:
            raise ModelError(f"classify.weights {weights}: not SmallCNN weights at {input_size} px ({exc})") from None
    return model


def _application(backbone: str, weights: str | None, input_size: int):
    """The keras.applications model without top, pooling="avg" (= the paper's GlobalAveragePooling2D), taking
    0..255 images: where the family does not rescale itself, a Rescaling layer in front (no weights, so weight
    files and Keras's ImageNet files load by the same layer order)."""

    app = getattr(keras.applications, backbone)
    shape = (input_size, input_size, 3)
    if PREPROCESSING[backbone] is None:
        return app(include_top=False, weights=weights, input_shape=shape, pooling="avg")
    scale, offset = PREPROCESSING[backbone]
    inputs = keras.Input(shape, name="image_0_255")
    x = keras.layers.Rescaling(scale.astype(np.float32), offset.astype(np.float32), name="preprocess")(inputs)
    model = app(include_top=False, weights=weights, input_tensor=x, pooling="avg")
    # The application's inputs are a one-element list when built on a tensor; one Input, as for the others.
    return keras.Model(inputs, model.output, name=model.name)


def build_backbone(backbone: str, weights: str | None, input_size: int):
    """A keras.applications backbone (_application), frozen; or the SmallCNN (build_small_cnn). `weights` is a
    resolved value: "imagenet", None (random init) or a weights file. Images go in as float 0..255."""
    if backbone == SMALL_CNN:
        model = build_small_cnn(input_size, weights)
    else:
        model = _application(backbone, weights, input_size)
    model.trainable = False
    return model


class FrozenBackbone(keras.layers.Layer):
    """Runs the wrapped backbone with training=False whatever the outer call says: Keras 3 functional models
    override an explicit `base(x, training=False)` with the outer call's flag (measured on keras 3.15: a Dropout
    called with training=False still drops inside fit), so the flag is pinned here."""

    def __init__(self, backbone, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.backbone = backbone
        self.backbone.trainable = False

    def call(self, images):
        return self.backbone(images, training=False)

    def compute_output_shape(self, input_shape):
        return self.backbone.compute_output_shape(input_shape)


def frozen(backbone):
    return FrozenBackbone(backbone, name="frozen_backbone")


def fine_tuned(backbone, n_blocks: int):
    """The backbone with its top `n_blocks` blocks trainable and everything else frozen. It still runs in
    inference mode (FrozenBackbone's call), and its BatchNorm layers stay frozen, as Keras's fine-tuning guide
    prescribes: on batches of 8-16 images new batch statistics would wreck the features learned before."""
    layer = FrozenBackbone(backbone, name="fine_tuned_backbone")
    layer.trainable = True  # the wrapper; which weights train is decided per layer below
    backbone.trainable = True
    prefixes = top_block_prefixes(n_blocks)
    for sub in backbone.layers:
        sub.trainable = sub.name.startswith(prefixes) and not isinstance(sub, keras.layers.BatchNormalization)
    return layer


def write_calibrated_weights(path: str | Path, backbone: str, input_size: int, image_paths=(), seed: int = 0) -> Path:
    """Random-init `backbone` with every BatchNorm's statistics set from `image_paths` (or noise); saves a
    .weights.h5 file usable as classify.weights.

    One forward pass in training mode with momentum 0 sets each BatchNorm's moving mean and variance to its
    input's batch statistics, layer after layer, each layer already seeing normalised inputs (data-dependent
    initialisation); stochastic depth is off for it. Calibrating only the top BatchNorm left the features nearly
    image-independent: a linear probe on B0's pooled features of the demo set (52 images, 64 px) scored 0.61 in
    5-fold CV (majority class 0.58), 0.75 with every BatchNorm calibrated."""

    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ConfigError(f"{path}: Keras weight files must end with .weights.h5")
    framework().reseed(seed)
    model = _application(backbone, None, input_size)
    if len(image_paths):
        x = np.stack([np.asarray(load_image(p, input_size), np.float32) for p in image_paths[:CALIBRATION_IMAGES]])
    else:
        x = np.random.default_rng(seed).uniform(0, 255, (16, input_size, input_size, 3)).astype(np.float32)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    drops = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    kept = [layer.momentum for layer in norms], [layer.rate for layer in drops]
    for layer in norms:
        layer.momentum = 0.0
    for layer in drops:
        layer.rate = 0.0
    model(x, training=True)
    for layer, momentum in zip(norms, kept[0]):
        layer.momentum = momentum
    for layer, rate in zip(drops, kept[1]):
        layer.rate = rate
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.weights.h5")  # Keras insists on the .weights.h5 suffix
    model.save_weights(partial)
    partial.replace(path)  # atomic: a killed run never leaves a half-written weights file under the real name
    return path


def built_weights(cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame) -> BackboneWeights:
    """backbone_weights, with the "calibrated" weights file written (once) where it is missing."""
    weights = backbone_weights(cc, models_dir, manifest)
    if cc.weights == CALIBRATED and not Path(weights.value).exists():
        write_calibrated_weights(weights.value, cc.backbone, cc.input_size,
                                 calibration_images(manifest)["path"].tolist(), seed=cc.seed)
    return weights
