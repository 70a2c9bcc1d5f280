"""One classifier trial: build its sets, train (exact or cached), evaluate on the held-out fold, write Parquet.

Exact and cached modes share everything but the backbone call: the same seeded head, the same shuffled batch
order (tf.data shuffle with the trial seed), the same optimizer. Without augmentation the head therefore sees
the same numbers in both modes, up to float error from batching the backbone differently.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd

from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.classify.trainsets import build_testset, build_trainset
from ooc_ray.config import ExperimentConfig
from ooc_ray.io import write_parquet
from ooc_ray.paths import ExperimentPaths



def summary_path(paths: ExperimentPaths, trial_key: str):
    return paths.trials / f"{trial_key}.parquet"


def _one_hot(labels, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=int)]


def _shuffled_indices(n: int, seed: int):
    import tensorflow as tf

    # Re-shuffled every epoch, deterministically from the seed; identical in both modes.
    return tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)


def fit_exact(cc, train: pd.DataFrame, test: pd.DataFrame, n_classes: int, seed: int, callbacks=()):
    """Train the whole model on streamed images; returns (test probabilities, keras History)."""
    import tensorflow as tf

    from ooc_ray.classify.features import image_batches, image_map
    from ooc_ray.classify.model import build_exact_model, compile_model

    model, _ = build_exact_model(cc, n_classes, seed)
    compile_model(model, cc.lr)
    y = tf.constant(_one_hot(train["label_index"], n_classes))
    load = image_map(train["path"].tolist(), cc.input_size)
    ds = (_shuffled_indices(len(train), seed)
          .map(lambda i: (load(i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(cc.batch_size).prefetch(tf.data.AUTOTUNE))
    history = model.fit(ds, epochs=cc.epochs, verbose=0, shuffle=False, callbacks=list(callbacks))
    probs = model.predict(image_batches(test["path"].tolist(), cc.input_size, cc.batch_size), verbose=0)
    return probs, history


def fit_cached(cc, train: pd.DataFrame, test: pd.DataFrame, n_classes: int, seed: int, features_dir,
               callbacks=()):
    """Train only the head on cached pooled features; returns (test probabilities, keras History)."""
    import tensorflow as tf

    from ooc_ray.classify.features import FeatureCache, train_views
    from ooc_ray.classify.model import build_head, compile_model

    cache = FeatureCache(features_dir)
    views = train_views(cc)
    feats = cache.load(train["path"])[:, views]  # (n, len(views), dim)
    test_feats = cache.load(test["path"])[:, 0]  # view 0: un-augmented, as exact mode evaluates
    head = build_head(feats.shape[-1], n_classes, cc.dropout, seed)
    compile_model(head, cc.lr)
    x = tf.constant(feats)
    y = tf.constant(_one_hot(train["label_index"], n_classes))
    n_v = len(views)
    # One view per image per epoch: a seeded stream of integers, re-drawn each epoch.
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = (tf.data.Dataset.zip(_shuffled_indices(len(train), seed), draws)
          .map(lambda i, r: (x[i, r % n_v], tf.gather(y, i)))
          .batch(cc.batch_size).prefetch(tf.data.AUTOTUNE))
    history = head.fit(ds, epochs=cc.epochs, verbose=0, shuffle=False, callbacks=list(callbacks))
    probs = head.predict(test_feats, batch_size=cc.batch_size, verbose=0)
    return probs, history


def arm_name(ratio: float, synthetic_only: bool) -> str:
    if synthetic_only:
        return "synthetic_only"
    return "real" if ratio == 0 else f"real+{ratio * 100:g}%"


def run_trial(cfg: ExperimentConfig, paths: ExperimentPaths, spec: dict, manifest: pd.DataFrame,
              synthetic: pd.DataFrame | None, report: Callable[[dict], None] | None = None,
              features_dir=None) -> dict:
    """Run one trial of the grid and write its three Parquet files; returns the summary row.

    spec: trial_key, fold, ratio, weight (None for real only), synthetic_only, config_key."""
    from ooc_ray.data import class_names

    start = time.perf_counter()
    cc = cfg.classify
    fold, weight = int(spec["fold"]), spec["weight"]
    classes = class_names(manifest)
    train = build_trainset(manifest, synthetic, fold, spec["ratio"], weight, spec["synthetic_only"],
                           seed=cc.seed, generator_split=cfg.generator.split, classes=classes)
    test = build_testset(manifest, fold)

    from ooc_ray.classify.model import setup_tf

    setup_tf(cc.cpus_per_trial)  # before any TF op
    import keras

    seed = cc.seed + fold
    keras.utils.set_random_seed(seed)
    callbacks = []
    if report is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: report(
            {"epoch": epoch + 1, "loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"])})))
    if cc.mode == "cached":
        if features_dir is None:
            raise ValueError("cached mode needs features_dir (ooc_ray.classify.features.ensure_features)")
        probs, history = fit_cached(cc, train, test, len(classes), seed, features_dir, callbacks)
    else:
        probs, history = fit_exact(cc, train, test, len(classes), seed, callbacks)
    keras.backend.clear_session()
    pred = probs.argmax(axis=1)
    metrics = compute_metrics(test["label_index"], pred, len(classes))

    key = spec["trial_key"]
    hist = pd.DataFrame({"trial_key": key, "epoch": np.arange(1, cc.epochs + 1),
                         "loss": history.history["loss"], "accuracy": history.history["accuracy"]})
    preds = pd.DataFrame({"trial_key": key, "id": test["id"].to_numpy(), "path": test["path"].to_numpy(),
                          "label_index": test["label_index"].to_numpy().astype(int), "pred_index": pred.astype(int),
                          "probs": [p.astype(float).tolist() for p in probs]})
    for c, name in enumerate(classes):
        preds[f"prob_{name}"] = probs[:, c].astype(float)
    n_real = int((train["source"] == "real").sum())
    row = {
        "experiment": cfg.name, "trial_key": key, "fold": fold,
        "weight": float("nan") if weight is None else float(weight), "ratio": float(spec["ratio"]),
        "arm": arm_name(spec["ratio"], spec["synthetic_only"]), "synthetic_only": bool(spec["synthetic_only"]),
        "n_train_real": n_real, "n_train_synthetic": int(len(train) - n_real), "n_test": int(len(test)),
        **{k: metrics[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")},
        "classes": classes, "per_class_recall": metrics["per_class_recall"], "confusion": metrics["confusion"],
        "mode": cc.mode, "backbone": cc.backbone, "input_size": cc.input_size, "epochs": cc.epochs,
        "generator_split": cfg.generator.split, "seed": cc.seed,
        "duration_s": round(time.perf_counter() - start, 3), "config_key": spec["config_key"],
    }
    # Summary last: its existence marks the trial done (the resume check), so it must never precede the rest.
    write_parquet(hist, paths.history / f"{key}.parquet")
    write_parquet(preds, paths.predictions / f"{key}.parquet")
    write_parquet(pd.DataFrame([row]), summary_path(paths, key))
    return row
