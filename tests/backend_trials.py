"""One classify.backend's trials, in one process (Keras picks its framework once per process): tests/test_backends.py
calls check() in its own process for tensorflow and runs this file as a script for torch and jax:

    python tests/backend_trials.py BACKEND ROOT WEIGHTS_FILE OUT_JSON

ROOT gets a demo experiment (helpers.demo_experiment); WEIGHTS_FILE is an EfficientNetB0 .weights.h5, written by
TensorFlow (Keras weight files are the same on every framework), or by this framework where it is missing. Writes
OUT_JSON and ROOT/<backend>-features.npy (every image's view-0 features, for the comparison between frameworks);
the same-start head is trained where ROOT holds TensorFlow's run (tensorflow-features.npy).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ooc_ray.backend import keras_side  # noqa: E402

CLASSES = ("good", "acceptable", "bad")
# Every strategy and network kind a trial can train, each run as trial A, trial B, trial A again in one process
# (train.reuse_compiled keeps the compiled model): the second A must be the first to the bit.
REUSED = {
    "small_cnn_augmented": {"backbone": "SmallCNN", "weights": "none", "augment": ["flip", "rotation"]},
    "loss_weighted": {"mixing": "loss_weighted"},
    "replace": {"mixing": "replace"},
    "split_bn_small_cnn": {"backbone": "SmallCNN", "weights": "none", "mixing": "split_bn"},
    "split_bn_cached": {"mixing": "split_bn", "mode": "cached"},
}


def check(backend: str, root: Path, weights_file: str, trials: bool = True) -> dict:
    """What tests/test_backends.py compares; trials=False: only the features and the same-start head (what
    TensorFlow's own tests do not already check)."""
    train = keras_side("ooc_ray.classify.train", backend)
    features = keras_side("ooc_ray.features", backend)
    from helpers import classify_cfg, demo_experiment  # noqa: E402 (after the framework is chosen)

    from ooc_ray import keys
    from ooc_ray.backbones import PREPROCESSING, backbone_weights
    from ooc_ray.classify.model import build_head, compile_model
    from ooc_ray.classify.trials import TrialContext
    from ooc_ray.feature_cache import FeatureCache, cache_dir
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.trainsets import plan_trials

    def cfg_of(**classify):
        settings = {"epochs": 3, "augment": [], "mode": "exact", "weights": weights_file, "backend": backend,
                    **classify}
        return classify_cfg(root, name="tiny", per_class=(10, 6, 4), **settings)

    paths, manifest, synthetic = demo_experiment(cfg_of(weights="calibrated"))  # the data: weights play no part
    if not Path(weights_file).exists():  # a node without TensorFlow (the GPU suite): written on this framework
        keras_side("ooc_ray.networks").write_calibrated_weights(weights_file, "EfficientNetB0", 32,
                                                                manifest["path"].tolist())
    images = pd.concat([manifest, synthetic])[["path", "sha256"]]
    out: dict = {"backend": backend}

    def run(cfg, fold: int, ratio: float, where: str) -> tuple[list, np.ndarray]:
        cc = cfg.classify
        weights = backbone_weights(cc, paths.models, manifest)
        trial = next(t for t in plan_trials(cfg, manifest, synthetic, weights.identity)
                     if t.spec.fold == fold and t.spec.ratio == ratio)
        features_dir = None
        if cc.mode == "cached":
            features_dir = str(cache_dir(cc, weights, paths.features))
            features.extract_features(cc, weights, images, features_dir)
        ctx = TrialContext(CLASSES, weights, keys.data_digest(manifest), features_dir)
        at = ExperimentPaths(root / where)
        row = train.run_trial(cfg, at, trial, ctx)
        assert row["backend"] == backend
        return (pd.read_parquet(at.trial_history(trial.key))["loss"].tolist(),
                np.stack(pd.read_parquet(at.trial_predictions(trial.key))["probs"]))

    for mode in ("exact", "cached") if trials else ():
        loss, probs = run(cfg_of(mode=mode), 1, 0.5, f"{backend}-{mode}")
        out[mode] = {"loss": loss, "probs": probs.tolist()}
    for name, settings in REUSED.items() if trials else ():
        cfg = cfg_of(epochs=2, **settings)
        first, other, again = (run(cfg, fold, 0.5, f"{backend}-{name}-{i}") for i, fold in enumerate((1, 0, 1)))
        out[name] = {"bit_identical": first[0] == again[0] and bool(np.array_equal(first[1], again[1])),
                     "differs_from_other": first[0] != other[0]}
    if trials:  # a synthetic weight of 0 (and a swap probability of 0) is the real-only trial, step for step
        real_only = run(cfg_of(mode="cached", epochs=2), 1, 0.0, f"{backend}-real-only")
        for name, setting in (("loss_weighted", {"synthetic_loss_weight": 0.0}), ("replace", {"replace_probability": 0.0})):
            zero = run(cfg_of(mode="cached", epochs=2, mixing=name, **setting), 1, 0.5, f"{backend}-{name}-zero")
            out[f"{name}_zero_is_real_only"] = zero[0] == real_only[0] and bool(np.array_equal(zero[1], real_only[1]))
    cc = cfg_of(mode="cached").classify
    weights = backbone_weights(cc, paths.models, manifest)
    features.extract_features(cc, weights, images, cache_dir(cc, weights, paths.features))
    digests = sorted(images["sha256"].unique())
    cached = FeatureCache(cache_dir(cc, weights, paths.features)).load(digests)[:, 0]
    np.save(root / f"{backend}-features.npy", cached)
    # The same head from the same start on the same batches (dropout 0, no shuffle): the frameworks' arithmetic
    # alone, where a whole trial also differs by each framework's random streams (initialisers, feed draws).
    import keras

    # Every backbone builds and pools on this framework (random init, 32 px: two noise images); TensorFlow builds
    # each in tests/test_backbones.py.
    networks = keras_side("ooc_ray.networks")
    noise = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    out["backbones"] = {}
    for name in (*PREPROCESSING, "SmallCNN") if trials else ():
        model = networks.frozen(networks.build_backbone(name, None, 32))
        pooled = keras.ops.convert_to_numpy(networks.framework().compiled(lambda x: model(x))(noise))
        out["backbones"][name] = [list(pooled.shape), bool(np.isfinite(pooled).all())]
    out["device"] = str(getattr(keras.ops.convert_to_tensor(np.zeros(1)), "device", "cpu"))
    out["frameworks"] = sorted(m for m in ("tensorflow", "torch", "jax") if m in sys.modules)
    if not (root / "tensorflow-features.npy").exists():  # no TensorFlow run to compare with
        return out
    labelled = pd.concat([manifest, synthetic]).drop_duplicates("sha256").set_index("sha256")
    x = np.load(root / "tensorflow-features.npy")
    y = np.eye(len(CLASSES), dtype=np.float32)[labelled.loc[digests, "label"].map(CLASSES.index).to_numpy()]
    head = compile_model(build_head(x.shape[1], len(CLASSES), 0.0, seed=0), 1e-3)
    start = root / "head-start.weights.h5"
    if backend == "tensorflow":
        head.save_weights(start)
    head.load_weights(start)
    history = head.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0)
    out["same_start"] = {"loss": history.history["loss"], "probs": head.predict(x, verbose=0).tolist()}
    return out


if __name__ == "__main__":
    backend, root, weights_file, out_json = sys.argv[1:5]
    Path(out_json).write_text(json.dumps(check(backend, Path(root), weights_file)))
