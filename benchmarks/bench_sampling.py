"""Sampling throughput on the tiny base: an in-process batched loop vs Ray Data actors (1 and 2).

    python benchmarks/bench_sampling.py [--images 64] [--steps 10] [--batch 8] [--resolution 64]

Prints, per executor, the wall time (pipeline/actor start-up included), end-to-end images/s, and the
steady-state images/s measured between the first and the last PNG written (start-up excluded). Run it on an
otherwise idle machine; on a 2-core CPU two 1-thread actors compete with each other and with the driver.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from helpers import make_manifest, write_manifest  # noqa: E402

from ooc_ray.config import from_dict  # noqa: E402
from ooc_ray.finetune import run_finetune  # noqa: E402
from ooc_ray.paths import ExperimentPaths  # noqa: E402
from ooc_ray.sample import plan_pools, render  # noqa: E402


def timed(plan: pd.DataFrame, cfg, paths, base, out: Path, use_ray: bool) -> dict:
    plan = plan.assign(path=[str(out / Path(p).relative_to(paths.synthetic)) for p in plan.path])
    start = time.time()
    n = render(plan, cfg, base, use_ray=use_ray)
    wall = time.time() - start
    mtimes = sorted(os.stat(p).st_mtime for p in plan.path)
    first_batch = cfg.sample.batch_size
    steady = (len(mtimes) - first_batch) / max(mtimes[-1] - mtimes[first_batch - 1], 1e-9)
    return {"images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
            "steady_images_per_s": round(steady, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images per run (multiple of 4 LoRAs x 2 images)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        manifest = make_manifest((4, 4), k=2, root=root, size=args.resolution)
        ratio = args.images / 8  # 4 LoRAs (2 folds x 2 classes), 2 training images each
        raw = {"name": "bench", "results_dir": str(root / "results"),
               "generator": {"base": "tiny", "resolution": args.resolution, "epochs": 1, "repeats": 1},
               "sample": {"weights": [1.0], "steps": args.steps, "resolution": args.resolution,
                          "batch_size": args.batch},
               "classify": {"ratios": [ratio], "synthetic_only": False}}
        cfg = from_dict(raw)
        paths = ExperimentPaths.of(cfg)
        write_manifest(manifest, paths)
        run_finetune(cfg, paths)
        base, plan = plan_pools(cfg, paths, manifest)
        print(f"tiny base, {len(plan)} images of {args.resolution}px, {args.steps} Euler-a steps, CFG 7, "
              f"batch {args.batch}, {os.cpu_count()} CPUs")

        import torch

        threads = torch.get_num_threads()
        results = {f"in-process loop, {threads} torch threads": timed(plan, cfg, paths, base, root / "local", False)}
        # Ray actors run with OMP_NUM_THREADS=1; on a shared 2-core machine a multi-threaded torch loop can
        # be >10x slower than a 1-thread one (OpenMP threads spin-wait on cores other processes hold).
        torch.set_num_threads(1)
        results["in-process loop, 1 torch thread"] = timed(plan, cfg, paths, base, root / "local1", False)
        torch.set_num_threads(threads)
        from ooc_ray.raycluster import init_ray

        t = time.time()
        init_ray(cfg)
        print(f"ray.init: {time.time() - t:.1f} s (not counted below)")
        for actors in (1, 2):
            c = from_dict({**raw, "sample": {**raw["sample"], "actors": actors}})
            results[f"ray, {actors} actor{'s' * (actors > 1)}"] = timed(plan, c, paths, base, root / f"ray{actors}", True)
        print(pd.DataFrame(results).T.to_string())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
