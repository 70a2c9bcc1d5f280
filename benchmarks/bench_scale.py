"""Cost curves of the pipeline's cheap stages (no model runs) at 1x, 10x and 100x the paper's size.

    python benchmarks/bench_scale.py [--scales 1,10,100] [--parts data,plan-data,plan-grid,report,queries]
                                     [--steps PREFIXES] [--root DIR] [--keep]
    (~10 min on 2 shared CPU cores, ~1 GB of temp files, deleted at the end; --scales 1,10: ~2 min)

The paper's size: 822 images (good/acceptable/bad = 500/212/110, 5 cell lines), 5 folds, 65 classifier trials
(5 folds x [real only, 2 LoRA weights x (5 ratios + synthetic only)]), per-fold synthetic pools (generator.split
"fold": 2 weights x ~658 training images' worth per fold = 6,580 rows). Inputs are generated cheaply: tiny
greyscale PNGs, fake tables in the real schemas (tests/helpers.py), fake trial files in the classify stage's
schema. Each part runs in a fresh subprocess per scale; each step's peak RSS is read from /proc/self/status
(VmHWM, reset before the step through /proc/self/clear_refs), so steps and parts do not pollute each other.

  data       ooc_ray.data.run_data over a CSV (file,label,cell_line) of 822 x s PNGs of 24 px: the first run
             (read + sha256 + full decode + folds + manifest), a re-run (sha256 only; decode skipped for known
             bytes), load_manifest. Files are fresh in the page cache: this is CPU cost, not disk.
  plan-data  planning at s x the images (5 folds, 65 trials; pools s x 6,580 rows): protocol.pool_sizes,
             protocol.plan_loras (LoRA keys), the sample plan (sample.plan_images, as sample.plan_pools calls
             it, with a fake base and LoRA table instead of loading models), then plan_trials in its two halves:
             every trial's training and test set (build_trainset, build_testset), and every trial's key.
  plan-grid  the same at the paper's 822 images with s x the LoRA weights (2, 20, 200: 65, 605, 6,005 trials;
             pools s x 6,580 rows): a wider grid, not more data.
  report     the report's tables from 65 x s trial files (5 x s folds of 164 held-out images, 820 x s images):
             the trial files, summary_tables (with the paired tests), the table files (CSV/Markdown/LaTeX),
             naive_baseline, and the two plots. run_report itself is not run: it first re-plans every trial
             (plan_trials, measured above) to find the current ones, and with 500 folds of 82,000 images that
             is 6,500 training sets of ~82,000 rows each.
  queries    docs/results.md's DuckDB queries and its pandas snippet over trials/,
             predictions/ (164 test predictions per trial: 10,660 / 106,600 / 1,066,000 rows) and a history/
             query of this benchmark's own (30 epochs per trial; docs/results.md has none).

Prints one row per step: wall and CPU seconds (of the run with the least CPU time of up to 5 runs while they take
< 1 s in all), peak RSS of the process during the step in MiB and, in brackets, its growth over the RSS before
the step, and growth exponents log(x_max / x_min) / log(s_max / s_min) (1 = linear). The time exponent is taken
from CPU time, which other work on a shared machine disturbs far less than wall time (DuckDB's CPU time sums
its threads); the memory exponent from the growth in brackets. '!' marks a time exponent > 1.1 on a step that
takes >= 0.5 s of CPU at the largest scale (below that, fixed costs dominate and the exponent means little).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CLASSES = ("good", "acceptable", "bad")
PAPER_COUNTS = (500, 212, 110)  # docs/design.md: the paper's 822 images
CELL_LINES = ("HUVEC", "HSAEC", "A549", "CACO", "HPMEC")
RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
WEIGHTS = (1.0, 0.8)
K = 5
N_TEST = 164  # held-out images per fold (822 / 5)
EPOCHS = 30
PNG_SIZE = 24
PARTS = ("data", "plan-data", "plan-grid", "report", "queries")
RESULT_TAG = "BENCH_SCALE_RESULT "
STEPS: list[str] = []  # --steps: run only the steps whose names start with one of these (e.g. "c4", "b-grid 4")


# ---------------------------------------------------------------------------------------------- measuring


def _status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _release_free_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap pages; without this, a step's growth hides in an earlier step's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def selected(name: str) -> bool:
    return not STEPS or any(name.startswith(prefix) for prefix in STEPS)


def measure(name: str, fn, repeat: bool = True) -> dict:
    """Wall and CPU time (the run with the least CPU time of runs while they total < 1 s, at most 5) and
    peak RSS of the step."""
    if not selected(name):
        return {"step": name, "skipped": True}
    _release_free_memory()
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    runs = []
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
        if not repeat or sum(w for _, w in runs) >= 1.0 or len(runs) >= 5:
            break
    peak = _status_mib("VmHWM")
    cpu, wall = min(runs)
    return {"step": name, "s": wall, "cpu": cpu, "runs": len(runs), "peak_mib": peak, "grow_mib": peak - before}


# ---------------------------------------------------------------------------------------------- inputs


def _counts(scale: int) -> list[int]:
    return [c * scale for c in PAPER_COUNTS]


def write_images(root: Path, scale: int) -> Path:
    """822 x scale tiny greyscale PNGs (class = brightness + noise) and images.csv (file,label,cell_line)."""
    from PIL import Image

    rng = np.random.default_rng(scale)
    rows = []
    for li, (label, n) in enumerate(zip(CLASSES, _counts(scale))):
        for j in range(n):
            rel = f"{label}/{j // 1000:03d}/{j:06d}.png"
            out = root / rel
            if j % 1000 == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
            arr = np.clip(60 + 60 * li + rng.normal(0, 20, (PNG_SIZE, PNG_SIZE)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(out, compress_level=1)
            rows.append((rel, label, CELL_LINES[j % len(CELL_LINES)]))
    csv = root / "images.csv"
    pd.DataFrame(rows, columns=["file", "label", "cell_line"]).to_csv(csv, index=False)
    return csv


def trial_grid(n_folds: int) -> list[tuple[int, float, float, bool]]:
    """(fold, weight, ratio, synthetic_only) of the paper's grid over n_folds folds (weight NaN = real only)."""
    points = []
    for fold in range(n_folds):
        points.append((fold, float("nan"), 0.0, False))
        for w in WEIGHTS:
            points += [(fold, w, r, False) for r in RATIOS if r > 0] + [(fold, w, 1.0, True)]
    return points


def write_trials(root: Path, scale: int) -> None:
    """trials/, predictions/, history/ as the classify stage writes them, for 65 x scale trials (5 x scale folds
    of N_TEST held-out images each), and world.parquet: the matching manifest (id, label, label_index, fold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(scale)
    n_folds = K * scale
    n_images = n_folds * N_TEST
    labels = rng.choice(len(CLASSES), n_images, p=np.array(PAPER_COUNTS) / sum(PAPER_COUNTS))
    ids = np.array([f"img-{i:06d}" for i in range(n_images)])
    paths = np.array([f"/data/{CLASSES[c]}/{i:06d}.png" for i, c in enumerate(labels)])
    world = pd.DataFrame({"id": ids, "path": paths, "label": [CLASSES[c] for c in labels], "label_index": labels,
                          "group": [CELL_LINES[i % 5] for i in range(n_images)],
                          "fold": np.arange(n_images) // N_TEST})
    for sub in ("trials", "predictions", "history"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    schemas: dict = {}
    for fold, weight, ratio, syn in trial_grid(n_folds):
        arm = "synthetic_only" if syn else ("real" if ratio == 0 else f"real+{ratio * 100:g}%")
        key = f"fold{fold}-{arm}-w{weight:g}-{rng.integers(2**63):016x}"[:64]
        sl = slice(fold * N_TEST, (fold + 1) * N_TEST)
        y = labels[sl]
        pred = np.where(rng.random(N_TEST) < 0.7, y, rng.integers(0, 3, N_TEST))
        probs = rng.dirichlet(np.ones(3), N_TEST)
        confusion = np.zeros((3, 3), dtype=int)
        np.add.at(confusion, (y, pred), 1)
        recall = (np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)).tolist()
        acc = float((y == pred).mean())
        n_real = 0 if syn else 658
        summary = {
            "experiment": "scale", "trial_key": key, "fold": fold, "weight": weight, "ratio": ratio, "arm": arm,
            "synthetic_only": syn, "n_train_real": n_real, "n_train_synthetic": round(ratio * 658),
            "n_test": N_TEST, "accuracy": acc, "precision_macro": acc - 0.01, "recall_macro": acc - 0.02,
            "f1_macro": acc - 0.015, "classes": [list(CLASSES)], "per_class_recall": [recall],
            "confusion": [confusion.tolist()], "mode": "cached", "backbone": "EfficientNetB7",
            "weights": "imagenet-0123456789abcdef", "input_size": 600, "epochs": EPOCHS, "generator_split": "fold",
            "seed": 0, "data_digest": "0123456789abcdef" * 4, "duration_s": 12.5,
        }
        summary = {k: v if isinstance(v, list) else [v] for k, v in summary.items()}
        preds = {"trial_key": [key] * N_TEST, "id": ids[sl], "path": paths[sl], "label_index": y.astype(int),
                 "pred_index": pred.astype(int), "probs": list(probs)}
        preds.update({f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)})
        hist = {"trial_key": [key] * EPOCHS, "epoch": np.arange(1, EPOCHS + 1),
                "loss": np.linspace(1.1, 0.4, EPOCHS), "accuracy": np.linspace(0.5, 0.8, EPOCHS)}
        for sub, columns in (("trials", summary), ("predictions", preds), ("history", hist)):
            if sub not in schemas:  # as io.write_parquet writes a DataFrame (pandas metadata included)
                schemas[sub] = pa.Table.from_pandas(pd.DataFrame(columns), preserve_index=False).schema
            pq.write_table(pa.Table.from_pydict(columns, schema=schemas[sub]), root / sub / f"{key}.parquet")
    world.to_parquet(root / "world.parquet")  # last: its presence marks the inputs whole


def fake_tables(n_images_scale: int, weights: tuple[float, ...]):
    """A manifest (paper's classes x scale, 5 cell lines, 5 folds) and a per-fold synthetic table in the real
    schemas (tests/helpers.py), and the config that plans over them."""
    from helpers import fake_synthetic, make_manifest

    from ooc_ray.load import from_dict

    manifest = make_manifest(tuple(_counts(n_images_scale)), k=K, labels=CLASSES, groups=CELL_LINES, fold_seed=0)
    manifest = manifest.sample(frac=1.0, random_state=0).reset_index(drop=True)  # scan order is not id order
    synthetic = fake_synthetic(manifest, weights=weights, split="fold", extra=1)
    cfg = from_dict({"name": "scale", "results_dir": "/nonexistent/results",
                     "data": {"source": "images.csv", "classes": list(CLASSES), "group_column": "cell_line"},
                     "folds": {"k": K, "strategy": "stratified"}, "generator": {"split": "fold"},
                     "sample": {"weights": list(weights)},
                     "classify": {"ratios": list(RATIOS), "synthetic_only": True}})
    return cfg, manifest, synthetic


# ---------------------------------------------------------------------------------------------- parts


def part_data(work: Path, scale: int) -> tuple[str, list[dict]]:
    from ooc_ray.load import from_dict
    from ooc_ray.data import load_manifest, run_data
    from ooc_ray.paths import ExperimentPaths

    csv = work / f"images_x{scale}" / "images.csv"
    out = work / f"data_results_x{scale}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict({"name": "scale", "results_dir": str(out),
                     "data": {"source": str(csv), "classes": list(CLASSES), "group_column": "cell_line"},
                     "folds": {"k": K, "strategy": "stratified"}})
    paths = ExperimentPaths.of(cfg)
    steps = [measure("a1 run_data, first run (sha256 + decode + folds)", lambda: run_data(cfg, paths), repeat=False),
             measure("a2 run_data, re-run (sha256, decode skipped)", lambda: run_data(cfg, paths)),
             measure("a3 load_manifest", lambda: load_manifest(paths))]
    return f"{sum(_counts(scale)):,} PNGs of {PNG_SIZE} px", steps


def _sample_plan(cfg, manifest):
    """sample.plan_pools without loading the base or reading trained LoRAs: a fake base and LoRA table."""
    from ooc_ray.diffusion.base import BaseModel
    from ooc_ray.diffusion.lora_files import TABLE_COLUMNS
    from ooc_ray.protocol import plan_loras, pool_sizes
    from ooc_ray.sample import plan_images, start_images

    base = BaseModel("/nonexistent/base", "base-0123456789abcdef")
    jobs = plan_loras(cfg, manifest, base.identity)
    loras = pd.DataFrame([{"lora_key": j.key, "fold": j.fold, "label": j.label, "group": j.group,
                           "prompt": j.prompt, "dir": f"/lora/{j.key}", "file": "lora.safetensors",
                           "sha256": "0" * 64, "weights_sha256": f"{i:064x}"} for i, j in enumerate(jobs)],
                         columns=TABLE_COLUMNS)
    n_pool = pool_sizes(manifest, cfg).set_index(["fold", "label"])["n_pool"]
    sizes = {(j.key, j.label): int(n_pool.loc[(j.fold, j.label)]) for j in jobs}
    return plan_images(cfg, base, loras, sizes, start_images(jobs, manifest), Path("/nonexistent/synthetic"))


def _planning(tag: str, cfg, manifest, synthetic) -> list[dict]:
    """plan_trials in two timed halves (its sets, then its keys), after the pool and LoRA planning."""
    from ooc_ray import keys
    from ooc_ray.data import class_names
    from ooc_ray.folds import fold_ids
    from ooc_ray.protocol import grid_points, plan_loras, pool_sizes
    from ooc_ray.trainsets import PoolIndex, build_testset, build_trainset

    classes = class_names(manifest)
    sets = []

    def trainsets():  # plan_trials' loop less the keys
        pools = PoolIndex(synthetic)
        sets[:] = [(s, build_trainset(manifest, synthetic if s.needs_synthetic else None, s, seed=cfg.classify.seed,
                                      split=cfg.generator.split, classes=classes, pools=pools),
                    build_testset(manifest, s.fold))
                   for s in grid_points(cfg, fold_ids(manifest))]

    def trial_keys():  # plan_trials' keys of those sets
        return [keys.trial_key(cfg, s.point(), classes, train, test, "weights-id") for s, train, test in sets]

    steps = [measure(f"{tag}1 protocol.pool_sizes", lambda: pool_sizes(manifest, cfg)),
             measure(f"{tag}2 protocol.plan_loras (LoRA keys)", lambda: plan_loras(cfg, manifest, "base-id")),
             measure(f"{tag}3 sample plan (plan_images)", lambda: _sample_plan(cfg, manifest)),
             measure(f"{tag}4 every trial's train/test set", trainsets)]
    if not sets and selected(f"{tag}5"):
        trainsets()  # step 5 hashes step 4's sets
    return steps + [measure(f"{tag}5 every trial's key (keys.trial_key)", trial_keys)]


def part_plan_data(work: Path, scale: int) -> tuple[str, list[dict]]:
    cfg, manifest, synthetic = fake_tables(scale, WEIGHTS)
    what = f"{len(manifest):,} images, {len(synthetic):,} synthetic rows, 65 trials"
    return what, _planning("b-data ", cfg, manifest, synthetic)


def part_plan_grid(work: Path, scale: int) -> tuple[str, list[dict]]:
    weights = tuple(round(1.0 - 0.2 * i / scale, 6) for i in range(2 * scale))  # 1.0, 0.8 at 1x; 2 x scale
    cfg, manifest, synthetic = fake_tables(1, weights)
    what = f"{len(manifest):,} images, {len(weights)} weights, {len(synthetic):,} synthetic rows, " \
           f"{K * (1 + 6 * len(weights)):,} trials"
    return what, _planning("b-grid ", cfg, manifest, synthetic)


def part_report(work: Path, scale: int) -> tuple[str, list[dict]]:
    from ooc_ray.comparisons import naive_baseline
    from ooc_ray.report import plots, render
    from ooc_ray.report.tables import summary_tables

    root = work / f"trials_x{scale}"
    world = pd.read_parquet(root / "world.parquet")
    out = work / f"report_x{scale}"
    out.mkdir(exist_ok=True)

    def read_trials():  # one pandas read per trial file, as run_report reads the planned ones
        return pd.concat([pd.read_parquet(f) for f in sorted((root / "trials").glob("*.parquet"))],
                         ignore_index=True)

    trials = read_trials()
    tables = summary_tables(trials)
    steps = [measure("c1 read the trial files", read_trials),
             measure("c2 report.tables.summary_tables (+ corrected t, Bayesian, Holm)", lambda: summary_tables(trials)),
             measure("c3 table files (CSV, Markdown, LaTeX)", lambda: render.write_tables(tables, out, {}, {})),
             measure("c4 comparisons.naive_baseline", lambda: naive_baseline(world)),
             measure("c5 plots (accuracy vs ratio, confusions)",
                     lambda: (plots.plot_metric_vs_ratio(tables, 0.608, out / "acc.png"),
                              plots.plot_confusions(trials, out / "confusion.png")))]
    return f"{len(trials):,} trial files, {K * scale} folds, {len(world):,} images", steps


def part_queries(work: Path, scale: int) -> tuple[str, list[dict]]:
    import duckdb

    root = work / f"trials_x{scale}"
    sql = re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "results.md").read_text(), re.S)
    (snippet,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "results.md").read_text(), re.S)
    assert len(sql) == 3, "docs/results.md: expected 3 SQL blocks"
    names = ["d1 SQL accuracy per grid point (trials)", "d2 SQL paired gain vs real (trials)",
             "d3 SQL always-wrong images (predictions JOIN trials)"]
    history = ("SELECT t.weight, t.ratio, t.synthetic_only, h.epoch, avg(h.loss) AS loss "
               "FROM read_parquet('results/demo/history/*.parquet') h "
               "JOIN read_parquet('results/demo/trials/*.parquet') t USING (trial_key) GROUP BY ALL")
    con = duckdb.connect()
    steps = [measure(name, lambda q=q: con.execute(q.replace("results/demo/", f"{root}/")).df())
             for name, q in zip(names, sql)]
    steps.append(measure("d4 SQL loss per epoch and arm (history; not in docs/results.md)",
                         lambda: con.execute(history.replace("results/demo/", f"{root}/")).df()))
    code = snippet.replace("results/demo/trials", str(root / "trials"))
    steps.append(measure("d5 docs/results.md pandas snippet (trials)", lambda: exec(code, {})))
    n = 65 * scale
    return f"{n:,} trials; {n * N_TEST:,} prediction rows; {n * EPOCHS:,} history rows", steps


RUNNERS = {"data": part_data, "plan-data": part_plan_data, "plan-grid": part_plan_grid, "report": part_report,
           "queries": part_queries}


# ---------------------------------------------------------------------------------------------- driver


def run_child(part: str, scale: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--scale", str(scale), "--root", str(work),
           "--steps", ",".join(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"{part} x{scale} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def exponent(a: float, b: float, sa: int, sb: int) -> float:
    return math.log(max(b, 1e-6) / max(a, 1e-6)) / math.log(sb / sa)


def print_table(results: dict, scales: list[int]) -> None:
    lo, hi = scales[0], scales[-1]
    head = (["step"] + [f"{s}x wall/cpu s" for s in scales] + ["exp"] + [f"{s}x MiB" for s in scales]
            + ["mem exp"])
    rows = []
    for part, by_scale in results.items():
        for i, step in enumerate(by_scale[lo]["steps"]):
            per = [by_scale[s]["steps"][i] for s in scales]
            exp_t = exponent(per[0]["cpu"], per[-1]["cpu"], lo, hi) if len(scales) > 1 else float("nan")
            exp_m = (exponent(max(per[0]["grow_mib"], 1), max(per[-1]["grow_mib"], 1), lo, hi)
                     if len(scales) > 1 else float("nan"))
            flag = "!" if exp_t > 1.1 and per[-1]["cpu"] >= 0.5 else ""
            rows.append([step["step"]] + [f"{p['s']:.2f}/{p['cpu']:.2f}" for p in per] + [f"{exp_t:.2f}{flag}"]
                        + [f"{p['peak_mib']:.0f} (+{max(p['grow_mib'], 0):.0f})" for p in per] + [f"{exp_m:.2f}"])
    widths = [max(len(str(r[c])) for r in [head] + rows) for c in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print(" | ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w) for c, (v, w) in enumerate(zip(r, widths))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,10,100", help="comma-separated multiples of the paper's size")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--root", help="work folder (default: a new temp folder, deleted at the end)")
    ap.add_argument("--steps", default="", help="comma-separated step-name prefixes to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    STEPS[:] = [p for p in args.steps.split(",") if p]
    if args.child:
        what, steps = RUNNERS[args.child](Path(args.root), args.scale)
        steps = [s for s in steps if not s.get("skipped")]
        print(RESULT_TAG + json.dumps({"what": what, "steps": steps}), flush=True)
        return

    scales = sorted(int(s) for s in args.scales.split(","))
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    work = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, scales {scales}, work {work}")
    start = time.time()
    results: dict[str, dict[int, dict]] = {p: {} for p in parts}
    try:
        for scale in scales:
            t0 = time.time()
            if "data" in parts and not (work / f"images_x{scale}" / "images.csv").exists():
                write_images(work / f"images_x{scale}", scale)
            if {"report", "queries"} & set(parts) and not (work / f"trials_x{scale}" / "world.parquet").exists():
                write_trials(work / f"trials_x{scale}", scale)
            print(f"x{scale}: inputs ready in {time.time() - t0:.0f} s", flush=True)
            for part in parts:
                t0 = time.time()
                results[part][scale] = run_child(part, scale, work)
                print(f"  {part} x{scale}: {results[part][scale]['what']} ({time.time() - t0:.0f} s with set-up)",
                      flush=True)
    finally:
        if not args.keep and not args.root:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(results, scales)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
