"""How far apart distinct images and copies lie under ooc_ray.near_copies' two signatures, and what the check costs.

    python benchmarks/bench_near_copies.py [--copies 100]      (~15 s; needs ../shared/data/pbc_blood_cells)

For the 2,400 PBC images of ../shared/data and the demo's generated set: each image's highest correlation with
any other image (thumbnail and detail, the quantiles and the maximum: how close distinct images come), and for
`--copies` images of each set saved again as JPEG at quality 50 and 90 and at half size, the lowest correlation
with its original (how far a copy strays). The thresholds (THUMBNAIL_MIN, DETAIL_MIN) must lie between the two.
Also the wall time of the check over the PBC set, signatures computed and then read from their cache.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ooc_ray.config import DemoDataConfig  # noqa: E402
from ooc_ray.demo_data import write_demo_dataset  # noqa: E402
from ooc_ray.near_copies import (DETAIL_MIN, THUMBNAIL_MIN, comparable, image_signatures,  # noqa: E402
                                 near_copy_pairs, signatures)

SAVES = {"jpeg q50": lambda im: _jpeg(im, 50), "jpeg q90": lambda im: _jpeg(im, 90),
         "half size": lambda im: im.resize((max(im.width // 2, 8), max(im.height // 2, 8)), Image.LANCZOS)}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def separation(name: str, files: list[Path], n_copies: int) -> None:
    raw = tuple(np.stack(parts) for parts in zip(*(signatures(f) for f in files)))
    (thumbnails, details), = comparable(raw)
    for label, vectors in (("thumbnail", thumbnails), ("detail", details)):
        closest = vectors @ vectors.T
        np.fill_diagonal(closest, -1)
        q = np.quantile(closest.max(axis=1), [0.5, 0.99, 1.0])
        print(f"{name} ({len(files)} images), {label}: closest other image, median {q[0]:.4f}, 99 % {q[1]:.4f}, "
              f"max {q[2]:.4f}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        for save_name, save in SAVES.items():
            lowest = [1.0, 1.0]
            for k in rng.choice(len(files), min(n_copies, len(files)), replace=False):
                copy = Path(scratch) / "copy.png"
                save(Image.open(files[k])).save(copy)
                # The copy beside the set, its shared pattern taken from both (as the data stage would see it).
                (set_t, set_d), (copy_t, copy_d) = comparable(raw, tuple(v[None] for v in signatures(copy)))
                lowest = [min(lowest[0], float(copy_t[0] @ set_t[k])), min(lowest[1], float(copy_d[0] @ set_d[k]))]
            print(f"{name}, copies as {save_name}: lowest thumbnail {lowest[0]:.4f}, detail {lowest[1]:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=100)
    args = ap.parse_args()
    print(f"thresholds: thumbnail >= {THUMBNAIL_MIN}, detail >= {DETAIL_MIN}")
    pbc = sorted((ROOT.parent / "shared" / "data" / "pbc_blood_cells").rglob("*.jpg"))
    if pbc:
        separation("PBC", pbc, args.copies)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            cache = Path(scratch) / "signatures.npz"
            digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in pbc]
            for run in ("first run", "cached"):
                start = time.perf_counter()
                pairs = near_copy_pairs(image_signatures([str(p) for p in pbc], digests, cache))
                print(f"signatures and pairs of the {len(pbc)} PBC images, {run}: {len(pairs)} pairs, "
                      f"{time.perf_counter() - start:.2f} s")
    with tempfile.TemporaryDirectory() as scratch:
        write_demo_dataset(Path(scratch), DemoDataConfig())
        separation("demo", sorted(Path(scratch).rglob("*.png")), args.copies)


if __name__ == "__main__":
    main()
