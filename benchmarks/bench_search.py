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
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ooc_ray.cli import main  # noqa: E402
from ooc_ray.report.render import to_markdown  # noqa: E402

EXPERIMENT = ROOT / "experiments" / "lora_search.yaml"


def search(out: Path, scheduler: str, budget: float) -> dict:
    start = time.perf_counter()
    code = main(["search", str(EXPERIMENT), "-q", "-o", f"results_dir={out}", "-o", f"search.scheduler={scheduler}",
                 "-o", f"search.time_budget_s={budget}", "-o", "search.num_samples=200"])
    assert code == 0, f"search with scheduler {scheduler} failed"
    wall = time.perf_counter() - start
    folder = out / "lora_search" / "search"
    results, best = pd.read_parquet(folder / "results.parquet"), json.loads((folder / "best.json").read_text())
    checked = best["confirm"]
    return {"scheduler": scheduler, "wall s (search + confirmation)": round(wall),
            "trials started": len(results), "run to the end": int(results["complete"].sum()),
            "stopped early": int((~results["complete"]).sum()), "LoRA epochs trained": int(results["epochs_trained"].sum()),
            "best search CAS (folds 0, 1)": f"{best['score']:.3f} ± {best['score_se']:.3f}",
            "confirmed: best / own settings (folds 2, 3)": f"{checked['best_mean']:.3f} / {checked['default_mean']:.3f}",
            "gain [corrected 95% CI]": f"{checked['gain_mean']:+.3f} [{checked['gain_ci'][0]:+.3f}, "
                                       f"{checked['gain_ci'][1]:+.3f}]",
            "verdict": checked["verdict"]}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds of search per scheduler")
    parser.add_argument("--out", type=Path, default=None, help="keep the results here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_search_"))
    start = time.perf_counter()
    for stage in ("data", "pretrain"):
        assert main([stage, str(EXPERIMENT), "-q", "-o", f"results_dir={out / 'base'}"]) == 0, stage
    print(f"pretraining: {time.perf_counter() - start:.0f} s (once, copied into both runs)")
    rows = []
    for scheduler in ("asha", "none"):
        shutil.copytree(out / "base" / "lora_search" / "models", out / scheduler / "lora_search" / "models",
                        dirs_exist_ok=True)
        rows.append(search(out / scheduler, scheduler, args.budget))
    print(f"\nsearch budget {args.budget:g} s each, {os.cpu_count()} CPUs")
    print(to_markdown(pd.DataFrame(rows).set_index("scheduler").T.rename_axis("").reset_index()))
    print(f"results in {out}")


if __name__ == "__main__":
    main_()
