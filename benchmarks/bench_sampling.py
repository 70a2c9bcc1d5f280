"""Sampling throughput on the tiny base: Ray actors vs an in-process batched loop, same images, same threads.

    python benchmarks/bench_sampling.py [--images 512] [--steps 20] [--batch 16] [--resolution 32]   (~10 min)
    python benchmarks/bench_sampling.py --images 2048 --one-thread-only                              (~9 min)

The defaults are the demo's sampling settings (32 px, 20 Euler-a steps, CFG 1, batch 16). Every executor renders
the same planned images (4 LoRAs, weight 1.0) into its own folder through sample.render, the stage's own code:
  in-process  SampleWorker called in this process, torch set to 1 or 2 threads
  ray         the sample stage's Ray actors (sampler.SamplingActor), Ray started with 1 or 2 CPUs: one actor gets the node's
              CPUs as threads (sample.cpus_per_cpu_actor), two actors one thread each
Wall time is end to end: actor start-up (process, imports, pipeline load), every image rendered and written as
PNG, the driver's dispatch of batches; ray.init is printed apart (the pipeline starts Ray once for all its stages). The
in-process loop pays its pipeline load too (imports are warmed first). Also printed: the steady rate, between
the first and the last PNG (start-up excluded), and the ratios the goals are stated in.
"""
from __future__ import annotations

import argparse
import importlib
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

from ooc_ray.load import from_dict  # noqa: E402
from ooc_ray.finetune import run_finetune  # noqa: E402
from ooc_ray.paths import ExperimentPaths  # noqa: E402
from ooc_ray.raycluster import init_ray  # noqa: E402
from ooc_ray.sample import plan_pools, render  # noqa: E402


def timed(plan: pd.DataFrame, cfg, paths, base, out: Path, use_ray: bool) -> dict:
    plan = plan.assign(path=[str(out / Path(p).relative_to(paths.synthetic)) for p in plan.path])
    start = time.time()
    n = len(render(plan, cfg, base, use_ray=use_ray))
    wall = time.time() - start
    mtimes = sorted(os.stat(p).st_mtime for p in plan.path)
    first_batch = cfg.sample.batch_size
    steady = (len(mtimes) - first_batch) / max(mtimes[-1] - mtimes[first_batch - 1], 1e-9)
    return {"images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 2),
            "first_png_s": round(mtimes[0] - start, 1), "steady_images_per_s": round(steady, 2)}


def restart_ray(cfg) -> float:
    import ray

    ray.shutdown()
    start = time.time()
    init_ray(cfg)
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="images per run (a multiple of 8: 4 LoRAs x 2 images)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--one-thread-only", action="store_true",
                    help="only what the goals compare: 1 actor x 1 thread, 2 actors x 1 thread, in-process 1 thread")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        manifest = make_manifest((4, 4), k=2, root=root, size=args.resolution)
        ratio = args.images / 8  # 4 LoRAs (2 folds x 2 classes), 2 training images each
        raw = {"name": "bench", "results_dir": str(root / "results"),
               "generator": {"base": "tiny", "resolution": args.resolution, "epochs": 1, "repeats": 1},
               "sample": {"weights": [1.0], "steps": args.steps, "resolution": args.resolution, "cfg": args.cfg,
                          "batch_size": args.batch},
               "classify": {"ratios": [ratio], "synthetic_only": False}}
        cfg = from_dict(raw)
        paths = ExperimentPaths.of(cfg)
        write_manifest(manifest, paths)
        run_finetune(cfg, paths)
        base, plan = plan_pools(cfg, paths, manifest)
        print(f"tiny base, {len(plan)} images of {args.resolution} px, {args.steps} Euler-a steps, CFG {args.cfg:g}, "
              f"batch {args.batch}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")

        import torch

        importlib.import_module("diffusers")  # warm: the in-process loop should not pay the imports an actor pays

        results, inits = {}, {}
        for cpus in (1, 2):
            variant = {**raw, "ray": {"num_cpus": cpus}}
            inits[cpus] = restart_ray(from_dict(variant))
            for actors in ((1,) if cpus == 1 else (1, 2)):
                if args.one_thread_only and cpus // actors > 1:
                    continue
                c = from_dict({**variant, "sample": {**raw["sample"], "actors": actors}})
                label = f"ray, {actors} actor{'s' * (actors > 1)} x {cpus // actors} thread{'s' * (cpus // actors > 1)}"
                results[label] = timed(plan, c, paths, base, root / f"ray{cpus}-{actors}", True)
            if args.one_thread_only and cpus > 1:
                continue
            torch.set_num_threads(cpus)
            results[f"in-process, {cpus} thread{'s' * (cpus > 1)}"] = timed(plan, cfg, paths, base,
                                                                           root / f"local{cpus}", False)
        print(f"ray.init (not counted): {inits[1]:.1f} s with 1 CPU, {inits[2]:.1f} s with 2")
        table = pd.DataFrame(results).T
        print(table.to_string())
        rate = table["images_per_s"]
        one_actor = "ray, 1 actor x 1 thread"
        print(f"1 actor x 1 thread vs in-process 1 thread, end to end: {rate[one_actor] / rate['in-process, 1 thread']:.2f}x")
        if not args.one_thread_only:
            print(f"1 actor x 2 threads vs in-process 2 threads: "
                  f"{rate['ray, 1 actor x 2 threads'] / rate['in-process, 2 threads']:.2f}x")
            print(f"2 actors x 1 thread vs in-process 2 threads: "
                  f"{rate['ray, 2 actors x 1 thread'] / rate['in-process, 2 threads']:.2f}x")
        print(f"2 actors x 1 thread vs 1 actor x 1 thread: {rate['ray, 2 actors x 1 thread'] / rate[one_actor]:.2f}x "
              f"end to end, {table.loc['ray, 2 actors x 1 thread', 'steady_images_per_s'] / table.loc[one_actor, 'steady_images_per_s']:.2f}x steady")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
