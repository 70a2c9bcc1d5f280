"""classify.backend: the classifier on TensorFlow, torch and JAX. Keras picks its framework once per process, so
each framework's trials run in a process of their own (tests/backend_trials.py); JAX's only where it is installed
(it is not in the test install: ~75 s of jit compiling here). ~80 s on 2 cores without JAX."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from backend_trials import REUSED, check
from helpers import CLASSIFY_TESTS, REPO, calibrated_experiment, classify_cfg, demo_experiment, tiny_experiment

from ooc_ray import keys
from ooc_ray.classify import run_classify
from ooc_ray.config import ClassifyConfig
from ooc_ray.errors import ModelError
from ooc_ray.backend import array_feed, use_backend
from ooc_ray.backend.feed import TrainFeed

pytestmark = pytest.mark.xdist_group("backends")  # one worker runs the frameworks' processes one at a time
OTHERS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(b) is None, reason=f"{b} not installed"))
          for b in ("torch", "jax")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each installed framework's check(): TensorFlow's in this process (its features and the head's starting
    weights, which the others load), the others' in processes of their own."""
    root = tmp_path_factory.mktemp("backends")
    weights = calibrated_experiment(root, classify_cfg(root, name="tiny", per_class=(10, 6, 4)))[-1]
    found = {"tensorflow": check("tensorflow", root, weights, trials=False)}
    for backend in ("torch", "jax"):
        if importlib.util.find_spec(backend) is None:
            continue
        out = root / f"{backend}.json"
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "backend_trials.py"), backend, str(root), weights,
                               str(out)], capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": ""})
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[backend] = json.loads(out.read_text())
    return root, found


@pytest.mark.parametrize("backend", OTHERS)
def test_every_strategy_trains_and_a_reused_model_is_a_fresh_one_to_the_bit(runs, backend):
    _, found = runs
    for name in REUSED:  # SmallCNN augmented, loss_weighted, replace, split_bn (SmallCNN exact, head cached)
        assert found[backend][name] == {"bit_identical": True, "differs_from_other": True}, name
    # As tests/test_mixing.py checks on TensorFlow: weight 0 and swap probability 0 train the real-only trial.
    assert found[backend]["loss_weighted_zero_is_real_only"] and found[backend]["replace_zero_is_real_only"]


# Pooled feature sizes, as TensorFlow's builds give them (measured, Keras 3.15).
FEATURES = {"EfficientNetB0": 1280, "EfficientNetB1": 1280, "EfficientNetB2": 1408, "EfficientNetB3": 1536,
            "EfficientNetB4": 1792, "EfficientNetB5": 2048, "EfficientNetB6": 2304, "EfficientNetB7": 2560,
            "EfficientNetV2B0": 1280, "EfficientNetV2B1": 1280, "EfficientNetV2B2": 1408, "EfficientNetV2B3": 1536,
            "EfficientNetV2S": 1280, "ConvNeXtTiny": 768, "ConvNeXtSmall": 768, "ResNet50V2": 2048,
            "DenseNet121": 1024, "SmallCNN": 128}


@pytest.mark.parametrize("backend", OTHERS)
def test_every_backbone_builds_and_pools_on_each_framework(runs, backend):
    assert runs[1][backend]["backbones"] == {name: [[2, size], True] for name, size in FEATURES.items()}


@pytest.mark.parametrize("backend", OTHERS)
def test_exact_and_cached_agree_on_each_framework(runs, backend):
    """As tests/test_classify_model.py checks on TensorFlow: float error only (measured: torch 6e-6, JAX 3e-5)."""
    exact, cached = (runs[1][backend][mode] for mode in ("exact", "cached"))
    np.testing.assert_allclose(exact["loss"], cached["loss"], rtol=1e-3)
    np.testing.assert_allclose(exact["probs"], cached["probs"], atol=1e-3)
    assert exact["loss"][-1] < exact["loss"][0]


@pytest.mark.parametrize("backend", OTHERS)
def test_frameworks_compute_the_same_features_and_head_steps(runs, backend):
    """One weights file on two frameworks: the same pooled features within 1e-3 of their scale (measured: 2.8e-4,
    EfficientNetB0 at 32 px), and the same head from the same start on the same batches within 1e-5 (measured:
    losses 3e-7 relative, probabilities 7e-7). Whole trials differ beyond that by each framework's random streams
    (initialisers, shuffles), as two seeds of one framework do."""
    root, found = runs
    mine, tf_features = (np.load(root / f"{b}-features.npy") for b in (backend, "tensorflow"))
    assert np.abs(mine - tf_features).max() <= 1e-3 * np.abs(tf_features).max()
    same, reference = found[backend]["same_start"], found["tensorflow"]["same_start"]
    np.testing.assert_allclose(same["loss"], reference["loss"], rtol=1e-5)
    np.testing.assert_allclose(same["probs"], reference["probs"], atol=1e-5)
    assert reference["loss"][-1] < reference["loss"][0] / 2  # the head learned: not two untrained models agreeing


@pytest.mark.parametrize("backend", OTHERS)
def test_a_process_on_another_framework_never_imports_tensorflow(runs, backend):
    """A GPU node with torch (or JAX) alone: the trials, feature extraction and weights files need no TensorFlow."""
    assert "tensorflow" not in runs[1][backend]["frameworks"]


def test_numpy_streams_swap_a_share_p_within_each_class_and_cycle_the_synthetic_rows():
    """torch's and JAX's feed (ooc_ray.backend.array_feed), as tests/test_mixing.py checks tf.data's."""
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2 + [0, 0, 1, 1, 1, 2])  # real rows first, then synthetic
    synthetic = np.arange(len(labels)) >= 12
    feed = TrainFeed(mixing="replace", seed=5, batch_size=4, labels=labels, y=np.eye(3)[labels],
                     synthetic=synthetic, replace_probability=0.3)
    epochs = [array_feed._primary(feed, e) for e in range(300)]
    assert all(len(e) == 12 and (np.bincount(labels[e], minlength=3) == [6, 4, 2]).all() for e in epochs)
    share = np.mean([synthetic[e].mean() for e in epochs])
    assert abs(share - 0.3) < 0.02  # 300 x 12 draws: sd of the mean ~0.008
    assert {int(i) for e in epochs for i in e if synthetic[i]} == set(range(12, 18))
    assert not np.array_equal(epochs[0], epochs[1])  # re-drawn each epoch
    weighted = dataclasses.replace(feed, mixing="loss_weighted")
    cycled = array_feed._synthetic(weighted, epochs=4, steps=3)  # 2 synthetic rows per step, 6 per cycle
    assert cycled.shape == (12, 2) and all(sorted(c) == list(range(12, 18)) for c in cycled.reshape(4, 6))


def test_keras_on_one_framework_refuses_another_by_name(tmp_path):
    code = ("import keras; from ooc_ray.backend import keras_side; keras_side('ooc_ray.networks', 'tensorflow')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "torch"})
    assert proc.returncode != 0
    assert "classify.backend=tensorflow: this process" in proc.stderr and "already runs Keras on torch" in proc.stderr
    if importlib.util.find_spec("jax") is None:
        with pytest.raises(ModelError, match=r"classify.backend=jax: jax is not installed on node \S+"):
            use_backend("jax")


def test_the_backend_enters_feature_and_trial_keys_only_when_set():
    """TensorFlow, the default, is not in the slices keys are made of (every key computed before classify.backend
    stands: tests/test_config.py's golden keys); another framework is."""
    for role in ("features", "trial"):
        assert "backend" not in keys.config_slice(ClassifyConfig(), role)
        assert keys.config_slice(ClassifyConfig(backend="torch"), role)["backend"] == "torch"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_a_grid_over_frameworks_runs_each_in_workers_of_its_own(tmp_path):
    """axes: {classify.backend: [tensorflow, torch]} through Ray: each framework's feature task in workers of its
    own (runtime_env), one Tune experiment per framework (its trial actors keep one Keras), rows saying which."""
    cfg = tiny_experiment(tmp_path, name="grid", **{**CLASSIFY_TESTS, "data.demo.per_class": [8, 6, 4],
                                                    "classify.ratios": [0.0], "classify.synthetic_only": False,
                                                    "classify.augment": [], "classify.weights": "calibrated",
                                                    "axes": {"classify.backend": ["tensorflow", "torch"]}})
    paths, _, _ = demo_experiment(cfg)
    rows = run_classify(cfg, paths)
    assert rows.groupby("backend").size().to_dict() == {"tensorflow": 2, "torch": 2}  # 2 folds each
    assert rows["trial_key"].nunique() == 4
    tf_rows, torch_rows = (rows[rows["backend"] == b].sort_values("fold") for b in ("tensorflow", "torch"))
    assert tf_rows["n_test"].tolist() == torch_rows["n_test"].tolist()  # one plan, two frameworks
    # "calibrated" weights are computed on each framework (a Ray task of each), so they are two identities
    assert tf_rows["weights"].nunique() == torch_rows["weights"].nunique() == 1
    assert tf_rows["weights"].iloc[0] != torch_rows["weights"].iloc[0]
    assert len(list(paths.models.glob("calibrated-*.weights.h5"))) == 2
    assert len([d for d in paths.features.iterdir() if d.is_dir()]) == 2  # a feature cache each
    experiments = sorted(p.name.rsplit("-", 1)[-1] for p in paths.ray_storage.glob("classify-*"))
    assert len(experiments) == 2 and "torch" in experiments
