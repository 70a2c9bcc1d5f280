"""Classifier stage: exact vs cached ("fast") mode.

    python benchmarks/bench_classify.py [--root DIR] [--skip-b7] [--epochs 10] [--folds 5] [--augment flip,rotation]
                                        [--scale 1] [--fixed-cost-only N]
        (~20 min on 2 cores; --folds 3 --epochs 30 --augment flip --skip-b7: ~14 min; the same with --scale 5
        (260 images): ~30 min)

1. The same grid through Ray Tune (run_classify), exact vs cached, with augmentation in both (flip and rotation
   by default): the paper's grid shape (5 folds x [real only, 2 LoRA weights x (5 ratios + synthetic only)] = 65
   trials) on the demo's labelled set (52 images x --scale, 3 classes, drawn at 128 px and read at 64 px as in the demo;
   the synthetic images are demo drawings of their class: learnable), frozen EfficientNetB0 with offline
   "calibrated" weights, the same seeds, 2 trials at a time (1 CPU each). Exact draws fresh augmented views
   every epoch; cached trains on classify.feature_views (4) views fixed once. Printed: accuracy per arm and
   mode (mean and std over folds), the largest per-arm gap beside the fold-to-fold spread, the wall-time ratio.
2. Unit costs, measured in-process after warm-up (steady state, TF graphs already traced):
     exact   s per training image per epoch (decode + resize + augment + frozen backbone + head step)
     eval    s per test image (decode + backbone + head)
     extract s per (image, view) of the feature cache
     head    s per training image per epoch on cached features
   plus each mode's per-trial fixed cost (model build, tracing, pipelines, files): the grid's median trial
   duration less its per-image work.
3. Extrapolation to the paper's grid shape: 65 trials (5 folds x [real, 2 weights x (5 ratios + synthetic
   only)]), 30 epochs, 822 images (n_train 658, n_test 164 per fold), synthetic pools as the trials draw them
   (generator split "all": 2 weights x 658; split "fold": 5 x 2 x 658), 4 feature views. Totals are sums of
   unit costs x counts; trials are assumed to run one at a time on one device, so the ratio is what matters.
   With --skip-b7 off, the forward cost of EfficientNetB7 at 600 px (and the decode of a 2048x1536 JPG) is
   measured too and used for the paper-scale estimate, with the head's costs measured at B7's feature width
   (2560; B0's is 1280).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from helpers import demo_experiment  # noqa: E402

from ooc_ray.backbones import BackboneWeights  # noqa: E402
from ooc_ray.networks import build_backbone, frozen  # noqa: E402
from ooc_ray.backend.tensorflow_ops import _shuffled_indices, image_batch_map, image_batches, setup as setup_tf  # noqa: E402,E501
from ooc_ray.classify import run_classify  # noqa: E402
from ooc_ray.classify.model import build_exact_model, build_head, compile_model  # noqa: E402
from ooc_ray.classify.train import HEAD_STEPS_PER_EXECUTION  # noqa: E402
from ooc_ray.load import from_dict  # noqa: E402
from ooc_ray.images import load_image  # noqa: E402
from ooc_ray.features import FeatureExtractor  # noqa: E402

SIZE = 64


PER_CLASS = (30, 14, 8)  # the demo's class balance (58 / 27 / 15 %)


def raw_config(root: Path, mode: str, epochs: int, folds: int, augment: list[str], scale: int = 1,
               split: str = "fold") -> dict:
    return {
        "name": "bench", "results_dir": str(root),
        "data": {"source": "demo", "classes": ["good", "acceptable", "bad"], "group_column": "cell_line",
                 "demo": {"per_class": [n * scale for n in PER_CLASS], "size": 128}},  # drawn as the demo draws them
        "folds": {"k": folds, "strategy": "stratified"},
        "generator": {"split": split},
        "sample": {"weights": [1.0, 0.8]},
        "ray": {"num_cpus": os.cpu_count() or 2},
        "classify": {"backbone": "EfficientNetB0", "weights": "calibrated", "input_size": SIZE, "epochs": epochs,
                     "batch_size": 16, "ratios": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0], "synthetic_only": True,
                     "augment": augment, "feature_views": 4, "mode": mode, "cpus_per_trial": 1},
    }


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def unit_costs(cfg, manifest: pd.DataFrame, synthetic: pd.DataFrame) -> dict:
    """Steady-state per-image costs at the bench config (B0, 64 px), in this process, with the threads of
    one trial (cpus_per_trial), as the trials had."""
    setup_tf(cfg.classify.cpus_per_trial)
    import keras
    import tensorflow as tf

    cc = cfg.classify
    weights = BackboneWeights(None, "none")
    paths = pd.concat([manifest["path"], synthetic["path"]]).tolist()[:64]
    labels = np.eye(3, dtype=np.float32)[np.arange(len(paths)) % 3]
    out = {}

    keras.utils.set_random_seed(0)
    model = compile_model(build_exact_model(cc, weights, 3, 0), cc.lr)
    load = image_batch_map(paths, cc.input_size)  # decoded a batch at a time, as trials are
    y = tf.constant(labels)
    ds = (_shuffled_indices(len(paths), 0).batch(cc.batch_size)
          .map(lambda i: (load(i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    _, first = timed(model.fit, ds, epochs=1, verbose=0, shuffle=False)
    _, steady = timed(model.fit, ds, epochs=3, verbose=0, shuffle=False)
    out["exact_s_per_img_epoch"] = steady / 3 / len(paths)
    out["exact_first_epoch_overhead_s"] = first - steady / 3
    batches = image_batches(paths, cc.input_size, cc.batch_size)
    _, first = timed(model.predict, batches, verbose=0)
    _, steady = timed(model.predict, batches, verbose=0)
    out["eval_s_per_img"] = steady / len(paths)
    out["exact_predict_overhead_s"] = first - steady

    extractor = FeatureExtractor(cc, weights)
    extractor(next(iter(batches)), list(range(cc.batch_size)))  # warm-up: build + trace
    feats, t = timed(lambda: np.concatenate([extractor(b, list(range(len(b)))) for b in batches]))
    out["extract_s_per_img_view"] = t / len(paths) / extractor.views  # one decode per image, shared by views
    out.update(head_costs(cc, feats[:, 1], labels))
    keras.backend.clear_session()
    return out


def head_costs(cc, feats: np.ndarray, labels: np.ndarray) -> dict:
    """The cached-mode head's steady cost per image per epoch, and its first epoch's extra (build, tracing)."""
    import tensorflow as tf

    head = compile_model(build_head(feats.shape[-1], 3, cc.dropout, 0), cc.lr, HEAD_STEPS_PER_EXECUTION)
    hds = tf.data.Dataset.from_tensor_slices((feats, labels)).shuffle(len(feats), seed=0).batch(cc.batch_size)
    _, first = timed(head.fit, hds, epochs=1, verbose=0, shuffle=False)
    _, steady = timed(head.fit, hds, epochs=5, verbose=0, shuffle=False)
    return {"head_s_per_img_epoch": steady / 5 / len(feats), "cached_first_epoch_overhead_s": first - steady / 5}


def b7_costs(tmp: Path) -> dict:
    """EfficientNetB7 forward at 600 px (random init: same FLOPs as ImageNet weights) and a 2048x1536 decode."""
    import keras
    from PIL import Image

    jpg = tmp / "frame.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1536, 2048), dtype=np.uint8), mode="L").save(jpg, quality=90)
    load_image(jpg, 600)
    _, t_decode = timed(lambda: [load_image(jpg, 600) for _ in range(5)])
    base = build_backbone("EfficientNetB7", None, 600)
    width, backbone = base.output_shape[-1], frozen(base)
    x = rng.uniform(0, 255, (2, 600, 600, 3)).astype(np.float32)
    backbone(x)  # warm-up
    _, t_fwd = timed(lambda: [backbone(x) for _ in range(2)])
    keras.backend.clear_session()
    return {"decode_2048x1536_to_600_s": t_decode / 5, "b7_600_forward_s_per_img": t_fwd / 4, "width": width}


def paper_counts(views: int = 4) -> dict:
    n_train, n_test, epochs, folds, weights = 658, 164, 30, 5, 2
    ratios = [0.1, 0.25, 0.5, 0.75, 1.0]
    per_fold = [n_train] + weights * ([n_train + round(r * n_train) for r in ratios] + [n_train])
    return {
        "trials": folds * len(per_fold),
        "train_image_epochs": folds * epochs * sum(per_fold),
        "test_images": folds * len(per_fold) * n_test,
        "extract_split_all": (822 + weights * n_train) * views,
        "extract_split_fold": (822 + folds * weights * n_train) * views,
    }


def estimate(c: dict, counts: dict, fwd: float | None = None, decode: float = 0.0) -> dict:
    """Seconds for the paper grid. `fwd`/`decode` replace the per-image backbone cost when given (B7 600 px);
    c's head costs are those of the backbone's feature width."""
    exact_img = c["exact_s_per_img_epoch"] if fwd is None else fwd + decode
    eval_img = c["eval_s_per_img"] if fwd is None else fwd + decode
    extract_img = c["extract_s_per_img_view"] if fwd is None else fwd + decode / 4  # decode once for 4 views
    exact = (counts["train_image_epochs"] * exact_img + counts["test_images"] * eval_img
             + counts["trials"] * c["exact_trial_fixed_s"])
    head = counts["train_image_epochs"] * c["head_s_per_img_epoch"] + counts["trials"] * c["cached_trial_fixed_s"]
    out = {"exact_s": exact}
    for split in ("all", "fold"):
        cached = counts[f"extract_split_{split}"] * extract_img + head
        out[f"cached_split_{split}_s"] = cached
        out[f"speedup_split_{split}"] = exact / cached
    return out


def trial_fixed_s(rows: pd.DataFrame, per_img_epoch: float, per_test_img: float) -> float:
    """A trial's fixed cost as the grid measured it: its median duration less its per-image work (model build,
    tracing, data pipelines, reading features, writing its Parquet files)."""
    n_train = rows["n_train_real"] + rows["n_train_synthetic"]
    return float((rows["duration_s"] - n_train * rows["epochs"] * per_img_epoch - rows["n_test"] * per_test_img)
                 .median())


def reuse_fixed_costs(cfg, paths, manifest: pd.DataFrame, n_trials: int) -> dict:
    """Exact mode's per-trial fixed cost before and after trials reused the worker's compiled model, in one run:
    the first `n_trials` exact trials of the grid, in this process one after another as a Tune worker runs them,
    once with a fresh build and trace per trial (train.forget_compiled before each: what every trial paid
    before) and once reusing the model (the first trial builds it). A trial's fixed cost is the intercept of its
    duration in epochs, d(1) - (d(E) - d(1)) / (E - 1), with E the config's epochs: no per-image cost model in it
    (the steady unit costs above under-count a trial's own epochs). Returns the median over the trials."""
    import dataclasses

    from ooc_ray import keys
    from ooc_ray.classify import grid as classify_grid
    from ooc_ray.classify import train
    from ooc_ray.data import class_names

    _, trials, weights = classify_grid.grid_trials(cfg, paths, manifest)
    chosen = list(trials.values())[:n_trials]
    ctx = train.TrialContext(tuple(class_names(manifest)), weights(cfg.classify), keys.data_digest(manifest))
    epochs = cfg.classify.epochs

    def duration(t, n_epochs: int, fresh: bool) -> float:
        if fresh:
            train.forget_compiled()
        at = dataclasses.replace(t.cfg, classify=dataclasses.replace(t.cfg.classify, epochs=n_epochs))
        return train.run_trial(at, paths, t.trial, ctx)["duration_s"]

    out = {}
    for label, fresh in (("fresh", True), ("reused", False)):
        train.forget_compiled()
        fixed = []
        for t in chosen:
            one, full = duration(t, 1, fresh), duration(t, epochs, fresh)
            fixed.append(one - (full - one) / (epochs - 1))
        out[label] = float(np.median(fixed))
    train.forget_compiled()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--skip-b7", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--augment", default="flip,rotation", help="comma-separated classify.augment")
    parser.add_argument("--scale", type=int, default=1, help="images per class x this (the paper has 822 images)")
    parser.add_argument("--split", choices=["fold", "all"], default="fold",
                        help="generator.split: per-fold pools, or one pool per weight (the paper's protocol)")
    parser.add_argument("--fixed-cost-only", type=int, default=0, metavar="N",
                        help="only exact mode's per-trial fixed cost, fresh build vs reused model, over N trials")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_classify_"))
    augment = args.augment.split(",")

    from ooc_ray.raycluster import init_ray

    grid = dict(epochs=args.epochs, folds=args.folds, augment=augment, scale=args.scale, split=args.split)
    cfg = from_dict(raw_config(root, "exact", **grid))
    paths, manifest, synthetic = demo_experiment(cfg)
    init_ray(cfg)
    print(f"grid: {len(manifest)} real images at {SIZE} px, {args.folds} folds, LoRA weights 1.0/0.8, ratios 0.1-1.0 "
          f"+ synthetic only, generator split {cfg.generator.split}, B0 calibrated, {args.epochs} epochs, augment "
          f"{'+'.join(augment)}, {os.cpu_count()} CPUs, 1 CPU per trial; {time.strftime('%Y-%m-%d %H:%M')}")
    if args.fixed_cost_only:
        fixed = reuse_fixed_costs(cfg, paths, manifest, args.fixed_cost_only)
        print(f"exact mode, per-trial fixed cost over {args.fixed_cost_only} trials in one process: fresh build "
              f"per trial (before) {fixed['fresh']:.2f} s, model reused (now) {fixed['reused']:.2f} s: "
              f"{fixed['fresh'] / fixed['reused']:.1f}x less")
        return
    walls, rows = {}, {}
    for mode in ("exact", "cached"):
        rows[mode], walls[mode] = timed(run_classify, from_dict(raw_config(root, mode, **grid)), paths)
        print(f"  {mode:6s}: {len(rows[mode])} trials, wall {walls[mode]:6.1f} s, sum of trial durations "
              f"{rows[mode]['duration_s'].sum():6.1f} s")
    both = pd.concat(rows.values())
    part = np.where(both["synthetic_only"], "synthetic only", both["ratio"].map(lambda r: f"real + {r:.0%}"))
    both["arm"] = np.where(both["weight"].isna(), "real only", "w" + both["weight"].map("{:g}".format) + " " + part)
    per_arm = both.groupby(["arm", "mode"])["accuracy"].agg(["mean", "std"]).unstack("mode")
    print(per_arm.round(3).to_string())
    gaps = (per_arm[("mean", "cached")] - per_arm[("mean", "exact")]).abs()
    spread = per_arm["std"].max(axis=1)
    print(f"  largest per-arm gap |cached - exact| {gaps.max():.3f} ({gaps.idxmax()}); fold-to-fold std there "
          f"{spread[gaps.idxmax()]:.3f}; arms whose gap exceeds their larger std: {int((gaps > spread).sum())} of "
          f"{len(gaps)}")
    print(f"  grid wall-time ratio exact/cached: {walls['exact'] / walls['cached']:.1f}x (cached includes its "
          "feature extraction)")

    import ray

    ray.shutdown()
    c = unit_costs(cfg, manifest, synthetic)
    c["exact_trial_fixed_s"] = trial_fixed_s(rows["exact"], c["exact_s_per_img_epoch"], c["eval_s_per_img"])
    c["cached_trial_fixed_s"] = trial_fixed_s(rows["cached"], c["head_s_per_img_epoch"], 0.0)
    print("unit costs (B0, 64 px, this machine):")
    for k, v in c.items():
        print(f"  {k:32s} {v * 1000:9.2f} ms" if "per_img" in k else f"  {k:32s} {v:9.2f} s")
    counts = paper_counts()
    print("paper grid shape:", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    est = estimate(c, counts)
    print(f"extrapolated at B0 64 px: exact {est['exact_s'] / 3600:.2f} h; cached {est['cached_split_all_s'] / 3600:.2f} h "
          f"(split all, {est['speedup_split_all']:.0f}x), {est['cached_split_fold_s'] / 3600:.2f} h "
          f"(split fold, {est['speedup_split_fold']:.0f}x)")
    if not args.skip_b7:
        b7 = b7_costs(root)
        for k in ("decode_2048x1536_to_600_s", "b7_600_forward_s_per_img"):
            print(f"  {k:32s} {b7[k] * 1000:9.1f} ms")
        rng = np.random.default_rng(0)
        wide = head_costs(cfg.classify, rng.normal(size=(64, b7["width"])).astype(np.float32),
                          np.eye(3, dtype=np.float32)[np.arange(64) % 3])
        print(f"  head at B7's width {b7['width']}: {wide['head_s_per_img_epoch'] * 1000:.2f} ms per image-epoch "
              f"(B0's {c['head_s_per_img_epoch'] * 1000:.2f})")
        est = estimate({**c, **wide}, counts, fwd=b7["b7_600_forward_s_per_img"],
                       decode=b7["decode_2048x1536_to_600_s"])
        print(f"extrapolated at B7 600 px (CPU): exact {est['exact_s'] / 86400:.1f} days; cached "
              f"{est['cached_split_all_s'] / 3600:.1f} h (split all, {est['speedup_split_all']:.0f}x), "
              f"{est['cached_split_fold_s'] / 3600:.1f} h (split fold, {est['speedup_split_fold']:.0f}x)")


if __name__ == "__main__":
    main()
