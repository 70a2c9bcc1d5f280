"""Frozen Keras backbones (TF backend) and their weights: what both the features cache and the classifier build on.

The frozen backbone runs in inference mode (its BatchNorm uses stored statistics, its stochastic-depth
dropout is off), as Keras's transfer-learning guide prescribes. Keras 3 functional models override an explicit
`base(x, training=False)` with the outer call's training flag (measured on keras 3.15: a Dropout called with
training=False still drops inside fit), so FrozenBackbone pins it in its own call(). This makes the backbone a
pure function of the (augmented) image, which is what lets "cached" mode precompute its output exactly.

TensorFlow and Keras are imported inside the functions: importing them costs ~5 s and ~1 GB, which the data,
finetune and sample stages (and `ooc-ray --help`) must not pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.config import EFFICIENTNETS, ClassifyConfig
from ooc_ray.data import load_image
from ooc_ray.errors import ConfigError, ModelError
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


def setup_tf(cpus: float | None = None) -> None:
    """Call before any TF op: GPU memory growth (else TF grabs the whole GPU, and fractional GPUs per
    trial do not limit memory), and intra-op threads = the trial's CPUs so concurrent trials share cores."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # TF already initialised in this process (tests, reused workers): keep it
            pass
    if cpus:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))
            tf.config.threading.set_inter_op_parallelism_threads(2)
        except RuntimeError:
            pass


def build_augmentation(names, seed: int):
    """keras.Sequential of random layers in config order, or None when `names` is empty."""
    import keras

    if not names:
        return None
    layers = []
    for i, name in enumerate(names):
        cls, kwargs = AUGMENT_ARGS[name]
        layers.append(getattr(keras.layers, cls)(seed=seed + i, **kwargs))
    return keras.Sequential(layers, name="augmentation")


SMALL_CNN = "SmallCNN"
# Four stages of one 3x3 convolution (BatchNorm, ReLU) and a 2x2 max-pool, then global average pooling:
# ~97k weights, a receptive field of 46 px, 64 M multiply-adds per 128 px image (EfficientNetB0: ~130 M),
# so a trial trains from scratch in seconds on 2 CPU cores. BatchNorm momentum 0.9, not Keras's 0.99: a
# small set gives a few hundred steps, after which 0.99 would still keep 0.99^300 = 5 % of the initial
# statistics (measured on the demo: 0.97 training accuracy, 0.25 held-out at momentum 0.99, 150 steps).
SMALL_CNN_WIDTHS = (16, 32, 64, 128)
SMALL_CNN_BN_MOMENTUM = 0.9


def build_small_cnn(input_size: int, weights: str | None = None, split: bool = False):
    """The SmallCNN backbone (images 0..255 in, pooled features out), random init or a weights file. split: its
    BatchNorms keep synthetic statistics apart (classify.mixing split_bn): inputs (images, synthetic flag)."""
    import keras
    from keras import layers

    def stage_layers(stage: int, width: int) -> tuple:
        norm = split_batch_norm_class() if split else layers.BatchNormalization
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


def split_batch_norm_class():
    """SplitBatchNormalization (built on first use: keras is imported lazily).

    classify.mixing: split_bn. BatchNormalization whose batch and moving statistics are kept apart for real
    (flag 0) and synthetic (flag 1) samples, with one shared scale and shift: each sample is normalised with the
    statistics of its own kind in training, and every sample with the real moving statistics at inference (the
    held-out images are real). The auxiliary-BatchNorm idea of AdvProp (Xie et al., CVPR 2020) and of
    domain-specific BatchNorm (Chang et al., CVPR 2019), here for synthetic images. On pooled features or on
    convolution maps (statistics per channel over samples and positions, as BatchNormalization). Moving statistics follow
    Keras's update, m <- momentum m + (1 - momentum) batch moment, with the biased batch variance; a kind absent
    from a batch leaves its statistics unchanged."""
    global _SPLIT_BN
    if _SPLIT_BN is not None:
        return _SPLIT_BN
    import keras
    from keras import ops

    class SplitBatchNormalization(keras.layers.Layer):
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
            moving_mean.assign(ops.where(present, moving_mean * m + mean * (1 - m), moving_mean))
            moving_var.assign(ops.where(present, moving_var * m + var * (1 - m), moving_var))
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

    _SPLIT_BN = SplitBatchNormalization
    return _SPLIT_BN


_SPLIT_BN = None


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


def _application(backbone: str, weights: str | None, input_size: int):
    """The keras.applications model without top, pooling="avg" (= the paper's GlobalAveragePooling2D), taking
    0..255 images: where the family does not rescale itself, a Rescaling layer in front (no weights, so weight
    files and Keras's ImageNet files load by the same layer order)."""
    import keras

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


def _frozen_backbone_class():
    import keras

    class FrozenBackbone(keras.layers.Layer):
        """Runs the wrapped backbone with training=False whatever the outer call says (see module doc)."""

        def __init__(self, backbone, **kwargs):
            super().__init__(trainable=False, **kwargs)
            self.backbone = backbone
            self.backbone.trainable = False

        def call(self, images):
            return self.backbone(images, training=False)

        def compute_output_shape(self, input_shape):
            return self.backbone.compute_output_shape(input_shape)

    return FrozenBackbone


def frozen(backbone):
    return _frozen_backbone_class()(backbone, name="frozen_backbone")


def top_block_prefixes(n_blocks: int) -> tuple[str, ...]:
    """Layer-name prefixes of EfficientNet's top `n_blocks` blocks (block7*, block6*, ...) and its top conv."""
    return tuple(f"block{b}" for b in range(8 - n_blocks, 8)) + ("top_conv",) if n_blocks else ()


def fine_tuned(backbone, n_blocks: int):
    """The backbone with its top `n_blocks` blocks trainable and everything else frozen. It still runs in
    inference mode (FrozenBackbone's call), and its BatchNorm layers stay frozen, as Keras's fine-tuning guide
    prescribes: on batches of 8-16 images new batch statistics would wreck the features learned before."""
    import keras

    layer = _frozen_backbone_class()(backbone, name="fine_tuned_backbone")
    layer.trainable = True  # the wrapper; which weights train is decided per layer below
    backbone.trainable = True
    prefixes = top_block_prefixes(n_blocks)
    for sub in backbone.layers:
        sub.trainable = sub.name.startswith(prefixes) and not isinstance(sub, keras.layers.BatchNormalization)
    return layer


# ---------------------------------------------------------------------------------------------- weights
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


def write_calibrated_weights(path: str | Path, backbone: str, input_size: int, image_paths=(), seed: int = 0) -> Path:
    """Random-init `backbone` with every BatchNorm's statistics set from `image_paths` (or noise); saves a
    .weights.h5 file usable as classify.weights.

    One forward pass in training mode with momentum 0 sets each BatchNorm's moving mean and variance to its
    input's batch statistics, layer after layer, each layer already seeing normalised inputs (data-dependent
    initialisation); stochastic depth is off for it. Calibrating only the top BatchNorm left the features nearly
    image-independent: a linear probe on B0's pooled features of the demo set (52 images, 64 px) scored 0.61 in
    5-fold CV (majority class 0.58), 0.75 with every BatchNorm calibrated."""
    import keras

    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ConfigError(f"{path}: Keras weight files must end with .weights.h5")
    keras.utils.set_random_seed(seed)
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


def backbone_weights(cc: ClassifyConfig, models_dir: Path, manifest: pd.DataFrame, build: bool = True
                     ) -> BackboneWeights:
    """Resolve classify.weights. "calibrated" builds (once, when `build`) a weights file named by what it is
    computed from: the first 32 images by id, from every fold (label-free input statistics, but a look at
    held-out images, which is why it is for offline demos, not for results)."""
    if cc.weights == "imagenet":
        return BackboneWeights("imagenet", "imagenet")
    if cc.weights == "none":
        if cc.backbone == SMALL_CNN:
            # Its architecture is this module's code, not a Keras release: the identity carries it, so trials
            # of an earlier SmallCNN are never re-used for a changed one.
            return BackboneWeights(None, "none-" + keys.digest(SMALL_CNN, SMALL_CNN_WIDTHS, SMALL_CNN_BN_MOMENTUM))
        return BackboneWeights(None, "none")
    if cc.weights != CALIBRATED:
        path = Path(cc.weights).expanduser().resolve()
        return BackboneWeights(str(path), f"file-{sha256_file(path)}")
    images = manifest.sort_values("id").head(CALIBRATION_IMAGES)
    identity = "calibrated-" + keys.digest(CALIBRATION_VERSION, cc.backbone, cc.input_size, cc.seed,
                                           keys.table_digest(images, keys.IMAGE_COLUMNS))
    path = Path(models_dir) / f"{identity}.weights.h5"
    if build and not path.exists():
        write_calibrated_weights(path, cc.backbone, cc.input_size, images["path"].tolist(), seed=cc.seed)
    return BackboneWeights(str(path), identity)
