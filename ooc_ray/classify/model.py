"""The paper's classifier (Keras 3, on classify.backend's framework):

    images (input_size^2, 0..255) -> augmentation layers -> EfficientNetB? (frozen) -> GlobalAveragePooling2D
    -> BatchNormalization -> Dropout -> Dense(n_classes, softmax);  Adam(lr), categorical cross-entropy.

Beyond the paper, exact mode can also train the backbone: EfficientNet's top blocks (classify.train_backbone,
BatchNorm kept in inference mode) or the SmallCNN from scratch (all layers, BatchNorm in training mode as for
any network trained from scratch). The backbone pieces are in ooc_ray.networks; here is the head that both
modes train, and the whole model that exact mode trains.
"""
from __future__ import annotations

import keras
from keras import ops

from ooc_ray.backbones import SMALL_CNN, SMALL_CNN_BN_MOMENTUM, BackboneWeights
from ooc_ray.config import ClassifyConfig
from ooc_ray.networks import (SplitBatchNormalization, build_augmentation, build_backbone, build_small_cnn, fine_tuned,
                              framework, frozen)


def build_head(n_features: int, n_classes: int, dropout: float, seed: int, bn_momentum: float = 0.99):
    """BatchNormalization -> Dropout -> Dense(softmax) on pooled features. Seeded initialiser and dropout,
    so the exact and cached models start from, and drop, the same numbers. bn_momentum: Keras's 0.99 for the
    paper's model; a backbone trained from scratch moves its features every step, so its head's statistics
    must follow faster (SMALL_CNN_BN_MOMENTUM)."""
    return keras.Sequential(
        [
            keras.Input((n_features,)),
            keras.layers.BatchNormalization(momentum=bn_momentum, name="head_bn"),
            keras.layers.Dropout(dropout, seed=seed, name="head_dropout"),
            keras.layers.Dense(n_classes, activation="softmax", name="head_dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
        ],
        name="head",
    )


def build_split_head(n_features: int, n_classes: int, dropout: float, seed: int, bn_momentum: float = 0.99):
    """build_head with SplitBatchNormalization: inputs (features, synthetic flag)."""
    features = keras.Input((n_features,), name="features")
    flag = keras.Input((1,), name="synthetic")
    x = SplitBatchNormalization(momentum=bn_momentum, name="head_bn")([features, flag])
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="head_dense",
                             kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    return keras.Model([features, flag], out, name="head")


class LossWeighted(keras.Model):
    """classify.mixing: loss_weighted. Trains `net` on pairs of a real and a synthetic batch with loss
    (1 - w) CE(real) + w CE(synthetic), w = classify.synthetic_loss_weight (DataDream, Kim et al., ECCV 2024:
    0.8 real / 0.2 synthetic); the reported loss is that sum, accuracy is on the real batch.
    At w = 0 the synthetic batch is never passed through the network (BatchNorm statistics and dropout draws
    included), so training is step for step Keras's own on the real batches: the real-only trial, exactly.
    On torch and JAX the pairs come as ((real x, synthetic x), (real y, synthetic y)) and Keras's own train step
    does the rest (call, compute_loss, compute_metrics below): the real batch goes through `net` first, then the
    synthetic one, and the loss tracker counts the real batch's samples. On TensorFlow they come as ((real x,
    real y), (synthetic x, synthetic y)) to ooc_ray.backend.tensorflow_ops.loss_weighted_step."""

    def __init__(self, net, synthetic_weight: float):
        super().__init__(name="loss_weighted")
        self.net, self.synthetic_weight = net, synthetic_weight

    def call(self, x, training=False):
        if not isinstance(x, (tuple, list)):  # held-out images
            return self.net(x, training=training)
        x_real, x_synthetic = x
        y_real = self.net(x_real, training=training)
        if self.synthetic_weight > 0:
            return y_real, self.net(x_synthetic, training=training)
        return y_real, ops.zeros_like(y_real)

    def train_step(self, *args):
        """The framework's own step where ooc_ray.backend has one for this model (TensorFlow), else Keras's."""
        step = getattr(framework(), "loss_weighted_step", None)
        return step(self, *args) if step is not None else super().train_step(*args)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        real = super().compute_loss(x=x[0], y=y[0], y_pred=y_pred[0], training=training)
        w = self.synthetic_weight
        if w == 0:
            return real
        synthetic = super().compute_loss(x=x[1], y=y[1], y_pred=y_pred[1], training=training)
        return (1 - w) * real + w * synthetic

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x[0], y[0], y_pred[0], sample_weight)


def build_exact_model(cc: ClassifyConfig, weights: BackboneWeights, n_classes: int, seed: int):
    """The whole paper model on images; with classify.mixing: split_bn its inputs are (image, synthetic flag)."""
    momentum = 0.99
    split = cc.mixing == "split_bn"
    if cc.backbone == SMALL_CNN:  # trained from scratch: under split_bn every BatchNorm of it is split
        backbone = build_small_cnn(cc.input_size, weights.value, split=split)  # seeded by set_random_seed
        features, momentum = backbone, SMALL_CNN_BN_MOMENTUM
    else:  # frozen (or top blocks with frozen BatchNorms): the head's BatchNorm is the one that learns statistics
        backbone = build_backbone(cc.backbone, weights.value, cc.input_size)
        features = fine_tuned(backbone, cc.train_backbone) if cc.train_backbone else frozen(backbone)
    head = (build_split_head if split else build_head)(backbone.output_shape[-1], n_classes, cc.dropout, seed,
                                                        momentum)
    inputs = keras.Input((cc.input_size, cc.input_size, 3), name="image")
    x = inputs
    augmentation = build_augmentation(cc.augment, seed)
    if augmentation is not None:
        x = augmentation(x)  # active only in training (Keras random layers are no-ops at inference)
    if split:
        flag = keras.Input((1,), name="synthetic")
        pooled = features([x, flag]) if cc.backbone == SMALL_CNN else features(x)
        return keras.Model([inputs, flag], head([pooled, flag]), name="classifier")
    return keras.Model(inputs, head(features(x)), name="classifier")


def compile_model(model, lr: float, steps_per_execution: int = 1):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model
