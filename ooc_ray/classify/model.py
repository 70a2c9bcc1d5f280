"""The paper's classifier (Keras 3, TF backend):

    images (input_size^2, 0..255) -> augmentation layers -> EfficientNetB? (frozen) -> GlobalAveragePooling2D
    -> BatchNormalization -> Dropout -> Dense(n_classes, softmax);  Adam(lr), categorical cross-entropy.

The backbone pieces (and why it is pinned to inference mode) are in ooc_ray.backbones; here is the head that
both modes train, and the whole model that exact mode trains.
"""
from __future__ import annotations

from ooc_ray.backbones import BackboneWeights, build_augmentation, build_backbone, frozen
from ooc_ray.config import ClassifyConfig


def build_head(n_features: int, n_classes: int, dropout: float, seed: int):
    """BatchNormalization -> Dropout -> Dense(softmax) on pooled features. Seeded initialiser and dropout,
    so the exact and cached models start from, and drop, the same numbers."""
    import keras

    return keras.Sequential(
        [
            keras.Input((n_features,)),
            keras.layers.BatchNormalization(name="head_bn"),
            keras.layers.Dropout(dropout, seed=seed, name="head_dropout"),
            keras.layers.Dense(n_classes, activation="softmax", name="head_dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
        ],
        name="head",
    )


def build_exact_model(cc: ClassifyConfig, weights: BackboneWeights, n_classes: int, seed: int):
    """The whole paper model on images."""
    import keras

    backbone = build_backbone(cc.backbone, weights.value, cc.input_size)
    head = build_head(backbone.output_shape[-1], n_classes, cc.dropout, seed)
    inputs = keras.Input((cc.input_size, cc.input_size, 3), name="image")
    x = inputs
    augmentation = build_augmentation(cc.augment, seed)
    if augmentation is not None:
        x = augmentation(x)  # active only in training (Keras random layers are no-ops at inference)
    return keras.Model(inputs, head(frozen(backbone)(x)), name="classifier")


def compile_model(model, lr: float):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model
