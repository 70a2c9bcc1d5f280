"""Thin CLI: parse, load the config, take the results folder's lock, dispatch to stage functions.

Stages are imported when they run (the STAGES table names them), so `ooc-ray data` never pays for importing
TensorFlow or torch. Every expected failure (ooc_ray.errors.OocRayError) becomes one line on stderr and a
non-zero exit: 2 for a config error, 1 for everything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from tqdm import tqdm

from ooc_ray.config import ExperimentConfig
from ooc_ray.fields import to_dict
from ooc_ray.load import load_config
from ooc_ray.errors import ConfigError, OocRayError, one_line
from ooc_ray.io import atomic_write_text
from ooc_ray import logs
from ooc_ray.logs import note
from ooc_ray.lock import RunLock, command_line
from ooc_ray.paths import ExperimentPaths
from ooc_ray.tracking import mlflow_side

# stage name -> (module, function); `run` chains the pipeline stages in this order.
STAGES = {
    "data": ("ooc_ray.data", "run_data"),
    "pretrain": ("ooc_ray.pretrain", "run_pretrain"),
    "finetune": ("ooc_ray.finetune", "run_finetune"),
    "sample": ("ooc_ray.sample", "run_sample"),
    "quality": ("ooc_ray.quality", "run_quality"),
    "classify": ("ooc_ray.classify", "run_classify"),
    "report": ("ooc_ray.report", "run_report"),
    "search": ("ooc_ray.search", "run_search"),
    "fetch": ("ooc_ray.fetch", "run_fetch"),
    "status": ("ooc_ray.status", "run_status"),
    "plan": ("ooc_ray.plan", "run_plan"),
}
PIPELINE = ("data", "pretrain", "finetune", "sample", "quality", "classify", "report")
# Take no lock: report reads finished trials and writes only report/ (it runs beside a writer); fetch writes
# only into the model caches (HF_HOME, KERAS_HOME, models/) and runs before the jobs that read them.
READ_ONLY = {"report", "fetch", "status", "plan"}
QUIET_STAGES = {"status", "plan"}  # print their own lines only
HELP = {
    "data": "scan + validate images, write manifest.parquet and folds.parquet",
    "pretrain": "domain-pretrain the generator base on unlabeled images (generator.pretrain)",
    "finetune": "train one LoRA per (fold, class) [per group]",
    "sample": "sample synthetic pools with Ray actors, write synthetic.parquet",
    "quality": "per-class KID, synthetic-only accuracy (CAS), nearest-real distances",
    "classify": "Ray Tune grid of classifier trials over ratio x LoRA weight x fold",
    "report": "tables, plots and image grids from the trial Parquet files (read-only)",
    "search": "Ray Tune + Optuna search over LoRA and sampling settings, confirmed on unseen folds",
    "fetch": "download the hub base and ImageNet weights the config names, once (cluster setup)",
    "plan": "what `run` would make and re-use, per stage, and roughly how long it takes (read-only)",
    "status": "what an experiment's results folder holds now: lock holder, each stage's output, the last commands",
    "run": "data -> pretrain -> finetune -> sample -> quality -> classify -> report, skipping finished work",
}
# What each command reads and writes under results/<name>/ (its `--help`).
READS_WRITES = {
    "data": "Reads data.source (a folder per class, or a CSV file,label[,group]; `demo` draws a set). Writes "
            "manifest.parquet (one row per image: path, label, group, sha256, size) and folds.parquet.",
    "pretrain": "Reads the unlabeled images of generator.pretrain.source. Writes models/pretrained/<key>/ (a "
                "diffusers folder) and pretrain_images.parquet. Nothing to do without generator.pretrain.",
    "finetune": "Reads manifest.parquet, folds.parquet and the base. Writes lora/<fold>_<class>_<key>/ (both LoRA "
                "formats and metadata.json) and lora/loras.parquet. Trained LoRAs with the same key are re-used.",
    "sample": "Reads the LoRAs. Writes synthetic/<pool>/*.png and synthetic.parquet (one row per image: seed, "
              "LoRA, weight, sha256, node). Finished images are kept.",
    "quality": "Reads the pools and the real images. Writes quality.parquet (per-class KID, MMD, nearest-real "
               "distances, linear-probe accuracy) and synthetic_scores.parquet.",
    "classify": "Reads manifest, folds and pools. Writes trials/<trial>.parquet (one row per trial: arm, fold, "
                "metrics, node), history/ and predictions/. Finished trials with the same key are re-used.",
    "report": "Reads the trials. Writes report/ (report.md, report.html, CSV/Markdown/LaTeX tables, plots). "
              "Read-only on everything else.",
    "search": "Searches search.space with Ray Tune + Optuna (several folds per trial, early stopping), then compares "
              "the best point with the config's own settings on folds it never scored. Writes search/ (trials, "
              "results, confirm, best.json, best.yaml).",
    "fetch": "Downloads the hub base and ImageNet weights the config names into HF_HOME and KERAS_HOME.",
    "plan": "Reads the config, manifest.parquet and what earlier runs left in results/<name>/ (bases, LoRAs, "
            "images, trials, their recorded seconds); writes nothing, starts no Ray.",
    "status": "Reads results/<name>/ only (the lock, the stages' tables and files, runs/); writes nothing.",
    "run": "Every stage above in order; each re-uses what it finds finished.",
}


def run_stage(name: str, cfg: ExperimentConfig, paths: ExperimentPaths, **options):
    """Import the stage's module and call it; each stage runs every variant of the axes itself (ooc_ray.variants).
    `options`: the command's own flags (search: resume)."""
    module, func = STAGES[name]
    with logs.native_lines_hidden():  # the C++ libraries' import-time notices, below -v
        stage = getattr(importlib.import_module(module), func)
    return stage(cfg, paths, **options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ooc-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('ooc-ray')}")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in [*STAGES, "run"]:
        p = sub.add_parser(name, help=HELP[name], description=f"{HELP[name]}. {READS_WRITES[name]}")
        p.add_argument("config", help="experiment YAML, e.g. experiments/demo.yaml")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. -o classify.epochs=2 (repeatable)")
        p.add_argument("--tiny", action="store_true",
                       help="seconds-scale settings (config.TINY + the file's `tiny:` section), for smoke tests")
        loudness = p.add_mutually_exclusive_group()
        loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
        loudness.add_argument("-v", "--verbose", action="store_true",
                              help="also the libraries' own output (transformers, diffusers, TensorFlow, Ray, Tune)")
        if name == "search":
            p.add_argument("--resume", action="store_true",
                           help="continue this config's search where it was stopped or killed (Ray Tune restore)")
        if name == "report":
            p.add_argument("--out", metavar="DIR", help="write the report into DIR instead of results/<name>/report "
                                                        "(results one cannot write to)")
    return parser


def _run(stages: tuple[str, ...], cfg: ExperimentConfig, paths: ExperimentPaths, **options) -> tuple[int, str]:
    """Run `stages` in order (`options`: a single stage's own flags); (exit code, the one-line error or "")."""
    # No ETA: stages differ in length by orders of magnitude, so an average per stage predicts nothing.
    bar = tqdm(stages, desc="ooc-ray", unit="stage", disable=len(stages) == 1 or not logs.progress_shown(),
               bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]")
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        if name not in QUIET_STAGES:
            note(f"{name} ...")
        try:
            run_stage(name, cfg, paths, **options)
        except ModuleNotFoundError as exc:  # the analysis install (no torch, TensorFlow, Ray) running a stage
            error = (f"{name} failed: no module named '{exc.name}': this command needs the pipeline install "
                     "(bash scripts/install.sh, or pip install -e \".[pipeline]\")")
            print(f"[ooc-ray] {error}", file=sys.stderr)
            return 1, error
        except (OocRayError, OSError) as exc:
            error = f"{name} failed: {one_line(exc)}"
            print(f"[ooc-ray] {error}", file=sys.stderr)
            return 1, error
        if name not in QUIET_STAGES:
            note(f"{name} done in {time.perf_counter() - start:.1f} s")
    if not set(stages) <= QUIET_STAGES:
        # report alone writes only its report folder, which --out may put outside the results
        note(f"outputs in {paths.report if stages == ('report',) else paths.root}")
    return 0, ""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(logs.QUIET if args.quiet else logs.VERBOSE if args.verbose else logs.DEFAULT)
    try:
        cfg = load_config(args.config, args.override, tiny=args.tiny)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    paths = ExperimentPaths.of(cfg)
    if getattr(args, "out", None):
        paths = dataclasses.replace(paths, report_dir=Path(args.out).resolve())
    stages = PIPELINE if args.stage == "run" else (args.stage,)
    if args.stage == "run" and not cfg.quality.enabled:
        stages = tuple(s for s in stages if s != "quality")
    if set(stages) <= READ_ONLY:
        return _run(stages, cfg, paths)[0]
    try:
        runs = mlflow_side(cfg)  # tracking.mlflow: the experiment's parent run, open while the stages run
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        lock = RunLock(paths.lock, command_line()).acquire()
    except (OocRayError, OSError) as exc:
        print(f"[ooc-ray] {one_line(exc)}", file=sys.stderr)
        return 1
    try:
        resolved = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        record = {"argv": list(sys.argv[1:] if argv is None else argv), "stage": args.stage, "config_file": str(args.config),
                  "overrides": args.override, "tiny": args.tiny, "config": to_dict(cfg)}
        record_path = paths.run_record(started, args.stage)
        atomic_write_text(record_path, yaml.safe_dump(record, sort_keys=False))
        parent = runs.open_parent(cfg, paths, args.stage) if runs else None
        code, error = _run(stages, cfg, paths, **({"resume": args.resume} if args.stage == "search" else {}))
        if code == 0:  # beside the results only when they were made from it
            atomic_write_text(paths.config, resolved)
        if runs:
            runs.close_parent(cfg, paths, parent, code, reported="report" in stages)
        finished = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        atomic_write_text(record_path, yaml.safe_dump({**record, "finished": finished, "exit": code, "error": error},
                                                      sort_keys=False))
        return code
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
