"""Thin CLI: parse, load the config, dispatch to a stage function. Stages import lazily so that
`ooc-ray data` never pays for importing TensorFlow or torch."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from ooc_ray.config import ConfigError, load_config, save_resolved
from ooc_ray.data import DataError
from ooc_ray.paths import ExperimentPaths

# stage name -> (module, function); `run` chains the pipeline stages in this order.
STAGES = {
    "data": ("ooc_ray.data", "run_data"),
    "finetune": ("ooc_ray.finetune", "run_finetune"),
    "sample": ("ooc_ray.sample", "run_sample"),
    "quality": ("ooc_ray.quality", "run_quality"),
    "classify": ("ooc_ray.classify", "run_classify"),
    "report": ("ooc_ray.report", "run_report"),
    "search": ("ooc_ray.search", "run_search"),
}
PIPELINE = ("data", "finetune", "sample", "quality", "classify", "report")
HELP = {
    "data": "scan + validate images, write manifest.parquet and folds.parquet",
    "finetune": "train one LoRA per (fold, class) [per group]",
    "sample": "sample synthetic pools with Ray actors, write synthetic.parquet",
    "quality": "per-class KID, synthetic-only accuracy (CAS), nearest-real distances",
    "classify": "Ray Tune grid of classifier trials over ratio x LoRA weight x fold",
    "report": "tables, plots and image grids from the trial Parquet files",
    "search": "Ray Tune + Optuna search over LoRA hyperparameters",
    "run": "data -> finetune -> sample -> quality -> classify -> report, skipping finished work",
}


def run_stage(name: str, cfg, paths: ExperimentPaths):
    module, func = STAGES[name]
    return getattr(importlib.import_module(module), func)(cfg, paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ooc-ray", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in [*STAGES, "run"]:
        p = sub.add_parser(name, help=HELP[name])
        p.add_argument("config", help="experiment YAML, e.g. experiments/demo.yaml")
        p.add_argument(
            "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. -o classify.epochs=2 (repeatable)",
        )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    paths = ExperimentPaths.of(cfg)
    save_resolved(cfg, paths.config)
    stages = PIPELINE if args.stage == "run" else (args.stage,)
    if args.stage == "run" and not cfg.quality.enabled:
        stages = tuple(s for s in stages if s != "quality")
    from tqdm import tqdm

    bar = tqdm(stages, desc="ooc-ray", unit="stage", disable=len(stages) == 1)
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        print(f"[ooc-ray] {name} ...", flush=True)
        try:
            run_stage(name, cfg, paths)
        except (ConfigError, DataError, FileNotFoundError) as exc:  # bad user input: message names file/key
            print(f"[ooc-ray] {name} failed: {exc}", file=sys.stderr)
            return 1
        print(f"[ooc-ray] {name} done in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"[ooc-ray] outputs in {paths.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
