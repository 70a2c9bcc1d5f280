"""Classic augmentation of real images: the "real + classic augmentation" control (classify.controls:
real_augmented), so that a synthetic arm is compared with extra images made the old way at the same count.

Copy c of a real image is a pure function of that image's bytes and c: a seeded draw of a horizontal and a
vertical flip, a 90-degree turn (180 degrees for a non-square image), a small rotation (up to 15 degrees,
reflected edges), a crop of 80-100 % of each side resized back, and brightness and contrast factors in
[0.8, 1.2] (the transforms of torchvision's and Keras's standard pipelines, done here with PIL so that no
framework's random state is involved). Its identity, which
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

# 2: copies keep a non-square image's width and height (version 1 made every copy square: a 400x300 field came
# out 400x400, a quarter of it mirror padding, or turned to 300x300, a quarter of it cut away).
AUGMENTATION_VERSION = 2
MAX_ROTATION_DEGREES = 15.0
CROP_RANGE = (0.8, 1.0)
JITTER_RANGE = (0.8, 1.2)


def augmented_identity(source_sha256: str, copy: int) -> str:
    return keys.digest("classic-augmentation", source_sha256, int(copy), AUGMENTATION_VERSION, length=64)


def augmented_path(root: Path, identity: str) -> str:
    return str(Path(root) / f"{identity[:24]}.png")


def augment(image: Image.Image, identity: str) -> Image.Image:
    """One classic augmentation of `image`, every draw seeded from the copy's identity; the copy keeps the
    image's width and height (a 4:3 field stays 4:3, as the real images the classifier resizes beside it)."""
    rng = np.random.default_rng(int(identity[:16], 16))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.5:
        image = ImageOps.flip(image)
    turns = int(rng.integers(4))
    # A quarter turn of a non-square image would stand it on its side (3:4), and the classifier's resize would
    # then squash its cells the other way: such images turn by half turns only.
    image = image.rotate(90 * (turns if image.width == image.height else 2 * (turns % 2)), expand=True)
    width, height = image.size
    # Rotate with reflected borders (no black corners a classifier could learn): pad, rotate, cut the centre.
    pad_x, pad_y = width // 4, height // 4
    padded = Image.fromarray(np.pad(np.asarray(image), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect"))
    rotated = padded.rotate(float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)), resample=Image.BILINEAR)
    image = rotated.crop((pad_x, pad_y, pad_x + width, pad_y + height))
    share = rng.uniform(*CROP_RANGE)
    crop_w, crop_h = int(round(width * share)), int(round(height * share))
    x0, y0 = int(rng.integers(width - crop_w + 1)), int(rng.integers(height - crop_h + 1))
    image = image.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((width, height), resample=Image.BICUBIC)
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
