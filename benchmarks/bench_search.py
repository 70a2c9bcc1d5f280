"""Early stopping in the LoRA search, same wall budget with and without it: experiments/lora_search.yaml (the demo
set, 4 folds, every trial scored on folds 0 and 1), searched for --budget seconds with search.scheduler asha and
none, then each run's best point confirmed against the file's own settings on folds 2 and 3.

    python benchmarks/bench_search.py [--budget 420] [--out DIR]        (~2 x (budget + 3 min) + pretraining)

Both runs start from the same pretrained base (pretrained once, copied) and the same Optuna seed, each in its own
results folder (no trial re-used across runs); Ray Tune's time_budget_s ends each search, and trials still running
then count as stopped. Printed per scheduler: trials started, run to their end and stopped early, LoRA epochs
trained in all, the best complete trial's search objective (mean of folds 0 and 1, its se), and its confirmation:
the best point's and the file's own settings' CAS on folds 2 and 3, the gain with its corrected CI, the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ooc_ray.cli import main  # noqa: E402
from ooc_ray.report.render import to_markdown  # noqa: E402

EXPERIMENT = ROOT / "experiments" / "lora_search.yaml"
SCHEDULERS = ("asha", "none")


def search(out: Path, scheduler: str, budget: float) -> None:
    code = main(["search", str(EXPERIMENT), "-q", "-o", f"results_dir={out}", "-o", f"search.scheduler={scheduler}",
                 "-o", f"search.time_budget_s={budget}", "-o", "search.num_samples=200"])
    assert code == 0, f"search with scheduler {scheduler} failed"


def summary(out: Path, scheduler: str) -> dict:
    """One column of the table, from the run's files (its wall time from its runs/ record)."""
    root = out / "lora_search"
    (record,) = sorted((root / "runs").glob("*-search.yaml"))
    stamp = "%Y%m%dT%H%M%SZ"
    wall = datetime.strptime(yaml.safe_load(record.read_text())["finished"], stamp) - \
        datetime.strptime(record.name.split("-")[0], stamp)
    results = pd.read_parquet(root / "search" / "results.parquet")
    best = json.loads((root / "search" / "best.json").read_text())
    checked = best["confirm"]
    own = best.get("lead_over_own")  # the file's own settings: the search's first trial
    confirmed = (f"{checked['best_mean']:.3f} / {checked['default_mean']:.3f}" if "best_mean" in checked
                 else "(best = own settings)")
    gain = (f"{checked['gain_mean']:+.3f} [{checked['gain_ci'][0]:+.3f}, {checked['gain_ci'][1]:+.3f}]"
            if "gain_mean" in checked else "")
    return {"scheduler": scheduler, "wall s (search + confirmation)": int(wall.total_seconds()),
            "trials started": len(results), "run to the end": int(results["complete"].sum()),
            "stopped (early, or at the budget)": int((~results["complete"]).sum()), "LoRA epochs trained": int(results["epochs_trained"].sum()),
            "own settings' search CAS": f"{own['own_score']:.3f}" if own else "(stopped early)",
            "best search CAS (folds 0, 1)": f"{best['score']:.3f} ± {best['score_se']:.3f}",
            "confirmed: best / own settings (folds 2, 3)": confirmed, "gain [corrected 95% CI]": gain,
            "verdict": checked["verdict"]}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds of search per scheduler")
    parser.add_argument("--out", type=Path, default=None, help="keep the results here (default: a temp folder)")
    parser.add_argument("--summarise", action="store_true", help="only print the table of the runs already in --out")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_search_"))
    if args.summarise:
        return print_table([summary(out / s, s) for s in SCHEDULERS], args.budget, out)
    start = time.perf_counter()
    for stage in ("data", "pretrain"):
        assert main([stage, str(EXPERIMENT), "-q", "-o", f"results_dir={out / 'base'}"]) == 0, stage
    print(f"pretraining: {time.perf_counter() - start:.0f} s (once, copied into both runs)")
    for scheduler in SCHEDULERS:
        shutil.copytree(out / "base" / "lora_search" / "models", out / scheduler / "lora_search" / "models",
                        dirs_exist_ok=True)
        search(out / scheduler, scheduler, args.budget)
    print_table([summary(out / s, s) for s in SCHEDULERS], args.budget, out)


def print_table(rows: list[dict], budget: float, out: Path) -> None:
    print(f"\nsearch budget {budget:g} s each, {os.cpu_count()} CPUs")
    print(to_markdown(pd.DataFrame(rows).set_index("scheduler").T.rename_axis("").reset_index()))
    print(f"results in {out}")


if __name__ == "__main__":
    main_()
