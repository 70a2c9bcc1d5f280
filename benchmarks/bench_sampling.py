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

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ooc_ray.config import from_dict  # noqa: E402
from ooc_ray.finetune import finetune_all  # noqa: E402
from ooc_ray.finetune import lora_table  # noqa: E402
from ooc_ray.paths import ExperimentPaths  # noqa: E402
from ooc_ray.sample import generate, plan_samples  # noqa: E402


def tiny_dataset(root: Path, per_class: int = 4, k: int = 2, size: int = 64) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for li, label in enumerate(["good", "bad"]):
        for j in range(per_class):
            path = root / "images" / label / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(60 + 120 * li + rng.normal(0, 20, (size, size, 3)), 0, 255)
                            .astype(np.uint8)).save(path)
            rows.append({"id": f"{label}-{j}", "path": str(path), "label": label, "label_index": li, "group": "",
                         "fold": j % k})
    return pd.DataFrame(rows)


def timed(plan: pd.DataFrame, cfg, paths, out: Path, use_ray: bool) -> dict:
    plan = plan.assign(path=[str(out / Path(p).relative_to(paths.synthetic)) for p in plan.path])
    start = time.time()
    n = generate(plan, cfg, paths, use_ray=use_ray)
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
        manifest = tiny_dataset(root, size=args.resolution)
        ratio = args.images / 8  # 4 LoRAs (2 folds x 2 classes), 2 training images each
        raw = {"name": "bench", "results_dir": str(root / "results"),
               "generator": {"base": "tiny", "resolution": args.resolution, "epochs": 1, "repeats": 1},
               "sample": {"weights": [1.0], "steps": args.steps, "resolution": args.resolution,
                          "batch_size": args.batch},
               "classify": {"ratios": [ratio], "synthetic_only": False}}
        cfg = from_dict(raw)
        paths = ExperimentPaths.of(cfg)
        finetune_all(cfg, paths, manifest)
        plan = plan_samples(cfg, paths, lora_table(cfg, paths, manifest), manifest)
        print(f"tiny base, {len(plan)} images of {args.resolution}px, {args.steps} Euler-a steps, CFG 7, "
              f"batch {args.batch}, {os.cpu_count()} CPUs")

        import torch

        threads = torch.get_num_threads()
        results = {f"in-process loop, {threads} torch threads": timed(plan, cfg, paths, root / "local", False)}
        # Ray actors run with OMP_NUM_THREADS=1; on a shared 2-core machine a multi-threaded torch loop can
        # be >10x slower than a 1-thread one (OpenMP threads spin-wait on cores other processes hold).
        torch.set_num_threads(1)
        results["in-process loop, 1 torch thread"] = timed(plan, cfg, paths, root / "local1", False)
        torch.set_num_threads(threads)
        from ooc_ray.raycluster import init_ray

        t = time.time()
        init_ray(cfg)
        print(f"ray.init: {time.time() - t:.1f} s (not counted below)")
        for actors in (1, 2):
            c = from_dict({**raw, "sample": {**raw["sample"], "actors": actors}})
            results[f"ray, {actors} actor{'s' * (actors > 1)}"] = timed(plan, c, paths, root / f"ray{actors}", True)
        print(pd.DataFrame(results).T.to_string())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
