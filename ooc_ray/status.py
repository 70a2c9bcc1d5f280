"""`ooc-ray status CONFIG`: what an experiment's results folder holds now, read-only and without Ray, torch or
TensorFlow: who holds its lock, what each stage has written (counted from the files themselves, so a running
stage's progress shows), whether the report is older than the newest trial, and the last commands with their
outcome (runs/)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from ooc_ray import keys
from ooc_ray.config import ExperimentConfig
from ooc_ray.errors import LockError
from ooc_ray.io import parquet_problem
from ooc_ray.lock import current_holder
from ooc_ray.paths import ExperimentPaths
from ooc_ray.trial_files import trial_problem

LAST_RUNS = 3  # commands shown, newest first


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def lock_line(paths: ExperimentPaths) -> str:
    try:
        found = current_holder(paths.lock)
    except LockError as exc:  # the other lines still help: status is what one runs to find out what is wrong
        return f"lock: {exc}"
    if found is None:
        return "lock: free (no run is writing)"
    holder, alive, age = found
    who = f"host {holder.get('host')}, pid {holder.get('pid')}, `{holder.get('command')}`, since {holder.get('since')}"
    if alive:
        return f"lock: held by {who}; heartbeat {_ago(age)} ago"
    return f"lock: left by a run that is gone ({who}); the next command takes it over"


def _rows(path: Path) -> int | None:
    try:
        return pd.read_parquet(path).shape[0]
    except (OSError, ValueError):
        return None


def stage_lines(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[str]:
    root = paths.root
    lines = []
    problem = parquet_problem(paths.manifest)
    lines.append("data: not run" if problem == "missing" else
                 f"data: {paths.manifest} is {problem}: run `ooc-ray data`" if problem else
                 f"data: {_rows(paths.manifest)} images in manifest.parquet")
    pretrained = paths.models / "pretrained"  # diffusion.pretrain.pretrained_dir: one folder per key
    # Not a pretraining still being written (io.atomic_dir's hidden .<key>.*.tmp folder beside it).
    bases = sorted(p.name for p in pretrained.iterdir() if p.is_dir() and not p.name.startswith(".")
                   ) if pretrained.is_dir() else []
    lines.append(f"pretrain: {len(bases)} pretrained base(s)" + (f" ({', '.join(bases)})" if bases else ""))
    loras = [p for p in paths.lora.glob("*/metadata.json")] if paths.lora.is_dir() else []
    planned = _rows(paths.lora_table)
    lines.append(f"finetune: {len(loras)} LoRAs trained" + (f"; loras.parquet lists {planned}" if planned else ""))
    pngs = sum(1 for _ in paths.synthetic.rglob("*.png")) if paths.synthetic.is_dir() else 0
    tables = [paths.synthetic_table, *sorted((root / "variants").glob("*/synthetic.parquet"))]
    rows = sum(n for n in (_rows(t) for t in tables) if n)
    lines.append(f"sample: {pngs} images on disk; synthetic tables list {rows}")
    trials = sorted(paths.trials.glob("*.parquet")) if paths.trials.is_dir() else []
    damaged = [t for t in trials if trial_problem(paths, t.stem)]
    lines.append(f"classify: {len(trials) - len(damaged)} trials finished"
                 + (f"; {len(damaged)} damaged or not their trial's, e.g. {damaged[0].name} (classify runs them "
                    "again)" if damaged else ""))
    report = paths.report / "report.md"
    if report.exists():
        newest = max((t.stat().st_mtime for t in trials), default=0.0)
        written = datetime.fromtimestamp(report.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        stale = "; older than the newest trial: run `ooc-ray report`" if newest > report.stat().st_mtime else ""
        lines.append(f"report: written {written}{stale}{_settings_note(cfg, paths)}")
    else:
        lines.append("report: not written")
    return lines


def _settings_note(cfg: ExperimentConfig, paths: ExperimentPaths) -> str:
    """Whether the report was made with this config's settings (resources aside), from its index."""
    try:
        made_with = json.loads(paths.report_index.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):  # missing, unreadable, or a list from before settings were kept
        return "; with settings it does not record: run `ooc-ray report` to be sure it is this config's"
    if made_with != keys.settings_digest(cfg):
        return "; with other settings than this config's (one changed since): run `ooc-ray report`"
    return ""


def run_lines(paths: ExperimentPaths) -> list[str]:
    records = sorted((paths.root / "runs").glob("*.yaml"), reverse=True)[:LAST_RUNS]
    lines = []
    for path in records:
        try:
            record = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if "exit" not in record:
            outcome = "running, or stopped without a word (killed)"
        elif record["exit"] == 0:
            outcome = f"succeeded ({record.get('finished')})"
        else:
            outcome = f"failed: {record.get('error')}"
        lines.append(f"  {path.stem.split('-', 1)[0]} `ooc-ray {' '.join(record.get('argv', []))}`: {outcome}")
    return (["last commands:"] + lines) if lines else ["last commands: none recorded"]


def run_status(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[str]:
    """Print (and return) the status lines of cfg's results folder."""
    if not paths.root.exists():
        lines = [f"{cfg.name}: {paths.root} does not exist yet (nothing has run)"]
    else:
        lines = [f"{cfg.name}: {paths.root} (at {datetime.now(timezone.utc).isoformat(timespec='seconds')})",
                 lock_line(paths), *stage_lines(cfg, paths), *run_lines(paths)]
    for line in lines:
        print(line)
    return lines

