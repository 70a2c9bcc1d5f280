"""The paper's classifier (Keras 3, TF backend):

    images (input_size^2, 0..255) -> augmentation layers -> EfficientNetB? (frozen) -> GlobalAveragePooling2D
    -> BatchNormalization -> Dropout -> Dense(n_classes, softmax);  Adam(lr), categorical cross-entropy.

Beyond the paper, exact mode can also train the backbone: EfficientNet's top blocks (classify.train_backbone,
BatchNorm kept in inference mode) or the SmallCNN from scratch (all layers, BatchNorm in training mode as for
any network trained from scratch). The backbone pieces are in ooc_ray.backbones; here is the head that both
modes train, and the whole model that exact mode trains.
"""
from __future__ import annotations

from ooc_ray.backbones import (SMALL_CNN, SMALL_CNN_BN_MOMENTUM, BackboneWeights, build_augmentation, build_backbone, build_small_cnn,
                                fine_tuned, frozen)
from ooc_ray.config import ClassifyConfig


def build_head(n_features: int, n_classes: int, dropout: float, seed: int, bn_momentum: float = 0.99):
    """BatchNormalization -> Dropout -> Dense(softmax) on pooled features. Seeded initialiser and dropout,
    so the exact and cached models start from, and drop, the same numbers. bn_momentum: Keras's 0.99 for the
    paper's model; a backbone trained from scratch moves its features every step, so its head's statistics
    must follow faster (SMALL_CNN_BN_MOMENTUM)."""
    import keras

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


def build_exact_model(cc: ClassifyConfig, weights: BackboneWeights, n_classes: int, seed: int):
    """The whole paper model on images."""
    import keras

    momentum = 0.99
    if cc.backbone == SMALL_CNN:
        backbone = build_small_cnn(cc.input_size, weights.value)  # seeded by the caller's set_random_seed
        features, momentum = backbone, SMALL_CNN_BN_MOMENTUM
    else:
        backbone = build_backbone(cc.backbone, weights.value, cc.input_size)
        features = fine_tuned(backbone, cc.train_backbone) if cc.train_backbone else frozen(backbone)
    head = build_head(backbone.output_shape[-1], n_classes, cc.dropout, seed, momentum)
    inputs = keras.Input((cc.input_size, cc.input_size, 3), name="image")
    x = inputs
    augmentation = build_augmentation(cc.augment, seed)
    if augmentation is not None:
        x = augmentation(x)  # active only in training (Keras random layers are no-ops at inference)
    return keras.Model(inputs, head(features(x)), name="classifier")


def compile_model(model, lr: float, steps_per_execution: int = 1):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model
