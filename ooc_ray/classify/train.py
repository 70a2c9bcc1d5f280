"""One classifier trial: train (exact or cached) on its planned set, evaluate on the held-out fold, write Parquet.

Exact and cached modes share everything but the backbone call: the same seeded head, the same shuffled batch
order (ooc_ray.backend.feed's streams, seeded with the trial seed), the same optimizer. Without augmentation the
head therefore sees the same numbers in both modes, up to float error from batching the backbone differently.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict
from typing import Callable

import keras
import numpy as np
import pandas as pd

from ooc_ray.backbones import BackboneWeights
from ooc_ray.backend.feed import TrainFeed
from ooc_ray.networks import framework
from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.classify.trials import TrialContext
from ooc_ray.trial_files import trial_outputs
from ooc_ray.classify.model import LossWeighted, build_exact_model, build_head, build_split_head, compile_model
from ooc_ray.config import ClassifyConfig, ExperimentConfig
from ooc_ray.errors import StageError
from ooc_ray.feature_cache import FeatureCache, train_views
from ooc_ray.gpu import require_keras_gpu
from ooc_ray.io import write_parquet
from ooc_ray.paths import ExperimentPaths
from ooc_ray.protocol import PlannedTrial, trial_config
from ooc_ray.raycluster import where


def _one_hot(labels, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=int)]


def trial_mixing(cc: ClassifyConfig, trial: PlannedTrial) -> str:
    """The strategy a trial trains with: its config's (protocol.trial_config already made non-mixing trials
    concat), or concat where rounding left a mixing arm without synthetic images (nothing to weight or swap)."""
    if cc.mixing in ("loss_weighted", "replace") and not (trial.train["source"] == "synthetic").any():
        return "concat"
    return cc.mixing


def _feed(cc: ClassifyConfig, trial: PlannedTrial, n_classes: int, seed: int, **source) -> TrainFeed:
    """The trial's training rows as ooc_ray.backend.feed describes them; `source`: paths and input_size (exact)
    or features (cached)."""
    return TrainFeed(mixing=trial_mixing(cc, trial), seed=seed, batch_size=cc.batch_size,
                     labels=trial.train["label_index"].to_numpy().astype(np.int64),
                     y=_one_hot(trial.train["label_index"], n_classes),
                     synthetic=(trial.train["source"] == "synthetic").to_numpy(),
                     replace_probability=cc.replace_probability, **source)


def _fit(model, cc: ClassifyConfig, feed: TrainFeed, callbacks):
    """Fit `model` on the trial's batches; loss_weighted trains it through a model that pairs a real and a
    synthetic batch per step (LossWeighted, whose weights are `model`'s). Returns the keras History."""
    if feed.mixing == "loss_weighted":
        inner = model
        model = reuse_compiled(("loss_weighted", id(inner), cc.synthetic_loss_weight),
                               lambda: LossWeighted(inner, cc.synthetic_loss_weight), None, cc.lr,
                               inner.steps_per_execution)
    data, steps = framework().train_data(feed, cc.epochs)
    return model.fit(data, epochs=cc.epochs, steps_per_epoch=steps, verbose=0, shuffle=False,
                     callbacks=list(callbacks))


# Tracing Keras's train and predict functions is most of a small trial: ~1.5 s of a ~2.3 s cached-mode trial
# (cProfile, demo grid at 1280 features, 10 epochs, one core); in exact mode with EfficientNetB0 a trial's fixed
# cost is 10.5 s built afresh, 3.1 s reused (benchmarks/bench_classify.py --fixed-cost-only). A Tune worker runs
# trial after trial (reuse_actors), so it keeps one compiled model per architecture and hands each trial that
# model reset to the exact state of a fresh build for the trial's seed; tests/test_classify_model.py checks
# losses and probabilities are bit-identical to a fresh model's, in both modes.
_COMPILED: dict[tuple, tuple] = {}
# A fresh build's variable values per (architecture, seed). Building B0 is 2.8 s of a reused trial's 7.2 s
# (cProfile: the application's layers 1.8 s, its weights file 1.0 s), and the seed is classify.seed + fold, so a
# grid's trials share a handful of seeds (5 in the paper's 65 trials). At most FRESH_KEPT are kept, most recent
# first: B0's are 16 MB, B7's 260 MB.
_FRESH: OrderedDict[tuple, list] = OrderedDict()
FRESH_KEPT = 4


def forget_compiled() -> None:
    """Drop this process's compiled models and fresh states: the next trial builds and traces its own, as every
    trial did before they were reused (the tests' fresh reference; benchmarks/bench_classify.py's "before")."""
    _COMPILED.clear()
    _FRESH.clear()


def _fresh_values(key: tuple, seed: int, build: Callable, fresh=None) -> list:
    """The variable values of a model of architecture `key` just built with `seed` (`fresh`, or build()), kept
    once per (key, seed), the FRESH_KEPT most recently used."""
    if (key, seed) not in _FRESH:
        _FRESH[(key, seed)] = [v.numpy() for v in (fresh if fresh is not None else build()).variables]
        while len(_FRESH) > FRESH_KEPT:
            _FRESH.popitem(last=False)
    _FRESH.move_to_end((key, seed))
    return _FRESH[(key, seed)]


def reuse_compiled(key: tuple, build: Callable, seed: int | None, lr: float, steps_per_execution: int = 1):
    """build() (a model of architecture `key` built for this trial, seeded with `seed`) compiled; or, when this
    process compiled a model of the same architecture before, that model with every variable (weights, BatchNorm
    statistics, the random layers' seed states) set to a fresh build's for this seed and its optimizer back to
    its first values, so Keras's traced functions are kept and nothing else of the earlier trial is. seed None:
    a wrapper whose variables are another model's, already set for this trial (only its optimizer is reset)."""
    if key not in _COMPILED:
        fresh = build()
        if seed is not None:
            _fresh_values(key, seed, build, fresh)
        model = compile_model(fresh, lr, steps_per_execution=steps_per_execution)
        model.optimizer.build(model.trainable_variables)
        _COMPILED[key] = (model, [v.numpy() for v in model.optimizer.variables])
        return model
    model, optimizer_start = _COMPILED[key]
    if seed is not None:
        for mine, value in zip(model.variables, _fresh_values(key, seed, build), strict=True):
            mine.assign(value)
    for variable, start in zip(model.optimizer.variables, optimizer_start, strict=True):
        variable.assign(start)
    for metric in model.metrics:
        metric.reset_state()
    return model


def exact_model(cc: ClassifyConfig, weights: BackboneWeights, n_classes: int, seed: int):
    """The paper's whole model for this trial, compiled (reuse_compiled: the worker's compiled model of that
    architecture, set to a fresh build's numbers for this seed)."""
    key = ("exact", cc.backbone, weights.identity, cc.input_size, cc.train_backbone, cc.dropout, cc.augment,
           cc.mixing == "split_bn", cc.lr, n_classes)
    return reuse_compiled(key, lambda: build_exact_model(cc, weights, n_classes, seed), seed, cc.lr)


def fit_exact(cc: ClassifyConfig, trial: PlannedTrial, ctx: TrialContext, seed: int, callbacks=()):
    """Train the whole model on streamed images; returns (test probabilities, keras History)."""
    n_classes = len(ctx.classes)
    model = exact_model(cc, ctx.weights, n_classes, seed)
    feed = _feed(cc, trial, n_classes, seed, paths=trial.train["path"].tolist(), input_size=cc.input_size)
    history = _fit(model, cc, feed, callbacks)
    test = framework().test_images(trial.test["path"].tolist(), cc.input_size, cc.batch_size, feed.split)
    probs = model.predict(test, verbose=0)
    return probs, history


# A head step on 16 cached feature vectors is ~0.1 ms of arithmetic and ~1 ms of Python and graph-call
# overhead: 64 steps per graph call and the batch-wise gather above train a 300-image, 30-epoch head in 0.47 s
# instead of 1.10 s (2 cores), with bit-identical losses, weights and predictions (measured).
HEAD_STEPS_PER_EXECUTION = 64


def fresh_head(n_features: int, n_classes: int, cc: ClassifyConfig, seed: int):
    """A compiled head in the state `compile_model(build_head(..., seed))` has (reuse_compiled); with split_bn
    the head takes (features, synthetic flag)."""
    split = cc.mixing == "split_bn"
    build = build_split_head if split else build_head
    limit = framework().MAX_STEPS_PER_EXECUTION  # HEAD_STEPS_PER_EXECUTION was measured on TensorFlow
    steps = HEAD_STEPS_PER_EXECUTION if limit is None else min(limit, HEAD_STEPS_PER_EXECUTION)
    return reuse_compiled(("head", n_features, n_classes, cc.dropout, cc.lr, split),
                          lambda: build(n_features, n_classes, cc.dropout, seed), seed, cc.lr, steps)


def fit_cached(cc: ClassifyConfig, trial: PlannedTrial, ctx: TrialContext, seed: int, callbacks=()):
    """Train only the head on cached pooled features; returns (test probabilities, keras History)."""
    if ctx.features_dir is None:
        raise StageError("cached mode needs the feature cache (ooc_ray.feature_cache.ensure_features)")
    cache = FeatureCache(ctx.features_dir)
    views = train_views(cc)
    feats = cache.load(trial.train["sha256"])[:, views]  # (n, len(views), dim)
    test_feats = cache.load(trial.test["sha256"])[:, 0]  # view 0: un-augmented, as exact mode evaluates
    feed = _feed(cc, trial, len(ctx.classes), seed, features=feats)
    head = fresh_head(feats.shape[-1], len(ctx.classes), cc, seed)
    history = _fit(head, cc, feed, callbacks)
    test = [test_feats, np.zeros((len(test_feats), 1), np.float32)] if feed.split else test_feats
    probs = head.predict(test, batch_size=cc.batch_size, verbose=0)
    return probs, history


def library_versions(backend: str) -> str:
    """The libraries a trial's numbers come from, as its row records them: no key holds them (an upgrade would
    re-run everything), so the report says which ones its trials ran with, and when they differ."""
    return f"keras {keras.__version__}, {backend} {sys.modules[backend].__version__}, numpy {np.__version__}"


def _summary(cfg: ExperimentConfig, trial: PlannedTrial, ctx: TrialContext, metrics: dict, seconds: float) -> dict:
    cc, spec = cfg.classify, trial.spec
    counts = trial.train["source"].value_counts()
    return {
        "experiment": cfg.name, "trial_key": trial.key, "fold": spec.fold,
        "weight": float("nan") if spec.weight is None else float(spec.weight), "ratio": float(spec.ratio),
        "arm": spec.arm, "arm_id": spec.as_arm.id, "synthetic_only": bool(spec.synthetic_only), "control": spec.control,
        "mixing": trial_mixing(cc, trial),
        "n_train_real": int(counts.get("real", 0)), "n_train_synthetic": int(counts.get("synthetic", 0)),
        "n_train_augmented": int(counts.get("augmented", 0)), "n_test": int(len(trial.test)),
        **{k: metrics[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")},
        "classes": list(ctx.classes), "per_class_recall": metrics["per_class_recall"],
        "confusion": metrics["confusion"], "mode": cc.mode, "backbone": cc.backbone, "backend": cc.backend,
        "versions": library_versions(cc.backend),
        "weights": ctx.weights.identity, "input_size": cc.input_size, "epochs": cc.epochs,
        "generator_split": cfg.generator.split, "seed": cc.seed, "data_digest": ctx.data_digest,
        "duration_s": round(seconds, 3), **where(),
    }


def _write(paths: ExperimentPaths, trial: PlannedTrial, ctx: TrialContext, probs, history, row: dict) -> None:
    key, test = trial.key, trial.test
    epochs = len(history.history["loss"])
    hist = pd.DataFrame({"trial_key": key, "epoch": np.arange(1, epochs + 1),
                         "loss": history.history["loss"], "accuracy": history.history["accuracy"]})
    # The image as its data source names it, not its absolute path: still right when the images or the results
    # move (the manifest maps it to where the data stage found it).
    preds = pd.DataFrame({"trial_key": key, "id": test["id"].to_numpy(), "file": test["file"].to_numpy(),
                          "label_index": test["label_index"].to_numpy().astype(int),
                          "pred_index": probs.argmax(axis=1).astype(int),
                          "probs": [p.astype(float).tolist() for p in probs]})
    for c, name in enumerate(ctx.classes):
        preds[f"prob_{name}"] = probs[:, c].astype(float)
    history_file, predictions_file, summary_file = trial_outputs(paths, key)
    # Summary last: its existence marks the trial done (the resume check), so it must never precede the rest.
    write_parquet(hist, history_file)
    write_parquet(preds, predictions_file)
    write_parquet(pd.DataFrame([row]), summary_file)


def run_trial(cfg: ExperimentConfig, paths: ExperimentPaths, trial: PlannedTrial, ctx: TrialContext,
              report: Callable[[dict], None] | None = None) -> dict:
    """Run one trial of the grid and write its three Parquet files; returns the summary row."""
    start = time.perf_counter()
    cfg = trial_config(cfg, trial.spec)  # mixing acts only on trials that mix (real-only ones are shared)
    cc = cfg.classify
    ops_of = framework()
    ops_of.setup(cc.cpus_per_trial)  # before any framework op
    if cc.mode == "exact" and cc.gpus_per_trial > 0:  # cached-mode trials get no GPU (feature extraction has it)
        require_keras_gpu(cc.backend, f"classify trial fold {trial.spec.fold} {trial.spec.arm}: "
                                      f"classify.gpus_per_trial={cc.gpus_per_trial:g}")
    seed = cc.seed + trial.spec.fold
    ops_of.reseed(seed)  # as keras.utils.set_random_seed (on TensorFlow keeping a reused model's traced functions)
    callbacks = []
    if report is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: report(
            {"epoch": epoch + 1, "loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"])})))
    fit = fit_cached if cc.mode == "cached" else fit_exact
    probs, history = fit(cc, trial, ctx, seed, callbacks)
    losses = np.asarray(history.history["loss"], dtype=float)
    if not (np.isfinite(losses).all() and np.isfinite(probs).all()):
        # Keras trains on through a NaN loss, and argmax of NaN probabilities is class 0 for every image: the
        # trial would report the share of that class as its accuracy.
        bad = np.flatnonzero(~np.isfinite(losses))
        when = f"its loss became {losses[bad[0]]} at epoch {bad[0] + 1}" if len(bad) else "its predictions are NaN/inf"
        raise StageError(f"classify: trial {trial.key} (fold {trial.spec.fold}, {trial.spec.arm}): {when}; nothing "
                         f"written (lower classify.lr={cc.lr:g}?)")
    metrics = compute_metrics(trial.test["label_index"], probs.argmax(axis=1), len(ctx.classes))
    row = _summary(cfg, trial, ctx, metrics, time.perf_counter() - start)
    _write(paths, trial, ctx, probs, history, row)
    return row
