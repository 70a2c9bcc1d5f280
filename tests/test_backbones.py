"""Every configured keras.applications backbone builds, is frozen, has its family's feature width, and is fed
pixels the way its family's preprocess_input would feed them. Random weights, 32 px: ~50 s on 2 cores (52 s measured,
67 s when each check built its own), each backbone built once for both checks (B7 alone takes ~7 s)."""
import functools
import typing

import numpy as np
import pytest

from ooc_ray.backbones import PREPROCESSING
from ooc_ray.networks import build_backbone, write_calibrated_weights
from ooc_ray.config import Backbone
from ooc_ray.load import from_dict
from ooc_ray.errors import ConfigError

# Pooled feature widths as the Keras and paper documentation give them (last conv's channels).
WIDTHS = {"EfficientNetB0": 1280, "EfficientNetB1": 1280, "EfficientNetB2": 1408, "EfficientNetB3": 1536,
          "EfficientNetB4": 1792, "EfficientNetB5": 2048, "EfficientNetB6": 2304, "EfficientNetB7": 2560,
          "EfficientNetV2B0": 1280, "EfficientNetV2B1": 1280, "EfficientNetV2B2": 1408, "EfficientNetV2B3": 1536,
          "EfficientNetV2S": 1280, "ResNet50V2": 2048, "DenseNet121": 1024, "ConvNeXtTiny": 768,
          "ConvNeXtSmall": 768}
FAMILY = {"EfficientNetV2": "efficientnet_v2", "EfficientNet": "efficientnet", "ResNet50V2": "resnet_v2",
          "DenseNet121": "densenet", "ConvNeXt": "convnext"}
pytestmark = pytest.mark.xdist_group("backbones")  # one worker: each backbone built once for the module

NEW = ["EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S",
       "ResNet50V2", "DenseNet121", "ConvNeXtTiny", "ConvNeXtSmall"]


def family_module(name: str):
    import keras

    return getattr(keras.applications, next(FAMILY[k] for k in FAMILY if name.startswith(k)))


@functools.cache
def built(name: str):
    """build_backbone(name) at 32 px with random weights, seeded; shared by the module's tests."""
    import keras

    keras.utils.set_random_seed(0)
    return build_backbone(name, None, 32)


def images(n=2, size=32):
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_the_config_allows_exactly_the_backbones_the_builder_knows():
    assert set(typing.get_args(Backbone)) == set(PREPROCESSING) | {"SmallCNN"} == set(WIDTHS) | {"SmallCNN"}


@pytest.mark.parametrize("name", NEW + ["EfficientNetB0"])
def test_each_backbone_builds_frozen_with_its_width(name):
    model = built(name)
    features = np.asarray(model(images()))
    assert model.output_shape == (None, WIDTHS[name])
    assert not model.trainable_weights
    assert np.isfinite(features).all()
    assert not np.allclose(features[0], features[1], rtol=0, atol=1e-9)  # the two images give different features


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_pixels_reach_each_backbone_as_its_preprocess_input_gives_them(name):
    """Where the family's preprocess_input is the identity, the model rescales itself (a Rescaling or
    Normalization layer right after the input); elsewhere our 'preprocess' layer equals preprocess_input."""
    import keras

    x = images()
    reference = np.asarray(family_module(name).preprocess_input(x.copy()))
    if PREPROCESSING[name] is None:
        np.testing.assert_array_equal(reference, x)
        first = built(name).layers[1]  # the keras.applications model itself: the first layer after its input
        assert isinstance(first, (keras.layers.Rescaling, keras.layers.Normalization))
    else:
        ours = np.asarray(built(name).get_layer("preprocess")(x))
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
        assert np.abs(reference).max() < 3  # really rescaled (0..255 would fail this)


def test_calibrated_weights_of_a_wrapped_backbone_reload_into_it(tmp_path):
    """ResNet50V2 has a Rescaling layer in front: the weights file written from one build loads into another
    (the BatchNorm statistics arrive; a random init has moving mean 0)."""
    import keras

    path = write_calibrated_weights(tmp_path / "r.weights.h5", "ResNet50V2", 32)
    loaded, fresh = build_backbone("ResNet50V2", str(path), 32), build_backbone("ResNet50V2", None, 32)
    name = next(layer.name for layer in fresh.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert not np.asarray(fresh.get_layer(name).moving_mean).any()
    assert np.abs(np.asarray(loaded.get_layer(name).moving_mean)).max() > 1e-3
    keras.backend.clear_session()


@pytest.mark.parametrize("classify, message", [
    ({"backbone": "ResNet50V2", "train_backbone": 2, "mode": "exact"}, "built for EfficientNetB0-B7"),
    ({"backbone": "ConvNeXtTiny", "weights": "calibrated"}, "ConvNeXtTiny has no BatchNorm"),
    ({"backbone": "VGG16"}, "classify.backbone"),
])
def test_backbone_settings_that_cannot_mean_anything_fail_naming_the_key(tmp_path, classify, message):
    raw = {"name": "b", "results_dir": str(tmp_path), "data": {"source": "demo"}, "classify": classify}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)
