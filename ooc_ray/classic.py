"""Classic augmentation of real images: the "real + classic augmentation" control (classify.controls:
real_augmented), so that a synthetic arm is compared with extra images made the old way at the same count.

Copy c of a real image is a pure function of that image's bytes and c: a seeded draw of a horizontal and a
vertical flip, a 90-degree turn, a small rotation (up to 15 degrees, reflected edges), a crop of 80-100 % of the
side resized back, and brightness and contrast factors in [0.8, 1.2] (the transforms of torchvision's and Keras's
standard pipelines, done here with PIL so that no framework's random state is involved). Its identity, which
trial keys and feature caches hold in place of a file digest, is sha256(source digest, c, AUGMENTATION_VERSION):
a new recipe bumps the version, so no key can describe images of the old recipe.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

from ooc_ray import keys
from ooc_ray.images import load_image
from ooc_ray.io import atomic_path, image_problem
from ooc_ray.logs import note

AUGMENTATION_VERSION = 1
MAX_ROTATION_DEGREES = 15.0
CROP_RANGE = (0.8, 1.0)
JITTER_RANGE = (0.8, 1.2)


def augmented_identity(source_sha256: str, copy: int) -> str:
    return keys.digest("classic-augmentation", source_sha256, int(copy), AUGMENTATION_VERSION, length=64)


def augmented_path(root: Path, identity: str) -> str:
    return str(Path(root) / f"{identity[:24]}.png")


def augment(image: Image.Image, identity: str) -> Image.Image:
    """One classic augmentation of `image`, every draw seeded from the copy's identity."""
    rng = np.random.default_rng(int(identity[:16], 16))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.5:
        image = ImageOps.flip(image)
    image = image.rotate(90 * int(rng.integers(4)), expand=True)
    side = image.size[0]
    # Rotate with reflected borders (no black corners a classifier could learn): pad, rotate, cut the centre.
    pad = side // 4
    padded = Image.fromarray(np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    rotated = padded.rotate(float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)), resample=Image.BILINEAR)
    image = rotated.crop((pad, pad, pad + side, pad + side))
    crop = int(round(side * rng.uniform(*CROP_RANGE)))
    x0, y0 = (int(rng.integers(side - crop + 1)) for _ in range(2))
    image = image.crop((x0, y0, x0 + crop, y0 + crop)).resize((side, side), resample=Image.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(*JITTER_RANGE)))
    return ImageEnhance.Contrast(image).enhance(float(rng.uniform(*JITTER_RANGE)))


def write_missing(rows: pd.DataFrame, sources: dict[str, str]) -> int:
    """Write every augmented image of `rows` (columns path, sha256 = identity, source_path looked up in
    `sources` by the row's identity) that is missing or undecodable; returns how many were written."""
    written = 0
    for row in rows.drop_duplicates("path").itertuples(index=False):
        if os.path.exists(row.path):
            problem = image_problem(row.path)
            if not problem:
                continue
            note(f"classify: {row.path} is damaged ({problem}): writing it again")
        image = load_image(sources[row.sha256])
        with atomic_path(row.path) as tmp:
            augment(image, row.sha256).save(tmp, format="PNG")
        written += 1
    return written
