"""Weight-free image features for the quality stage (quality.features: image_statistics).

A frozen random network cannot tell a cell image from noise in a way KID can read (the SmallCNN the demo's
trials train from scratch has only its random initialisation before training), and no Inception or ImageNet
weights can be downloaded offline. These statistics describe what distinguishes microscopy images from each
other and from noise, and need no weights:
  - the grey image area-pooled to 4 x 4 (density and illumination layout), 16 values;
  - a 16-bin intensity histogram (background, dark cell bodies, bright halos), 16 values;
  - gradient magnitude mean, std and 90th percentile, mean absolute Laplacian (edges, sharpness vs blur);
  - the radially averaged log power spectrum in 8 frequency bands (object size, blur, noise), 8 values;
  - mean and std of the grey values.
All images are read at one size, the synthetic images' (sample.output_size or sample.resolution): reading real
images at a larger size than the synthetic ones would count resampling blur as a difference. Every feature is
then standardised with the mean and std of the labelled real images, so that KID's polynomial kernel weighs the
groups alike and two runs on the same real images share one scale.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from ooc_ray.images import load_image

VERSION = 1  # part of the features' identity (quality and search keys): bump when a statistic changes
POOLED = 4
HISTOGRAM_BINS = 16
SPECTRUM_BANDS = 8


def _radial_log_power(grey: np.ndarray) -> np.ndarray:
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot(yy - h // 2, xx - w // 2) / (min(h, w) / 2)  # 1.0 = Nyquist along the shorter side
    band = np.minimum((radius * SPECTRUM_BANDS).astype(int), SPECTRUM_BANDS)  # corners beyond Nyquist: dropped
    sums = np.bincount(band.ravel(), power.ravel(), SPECTRUM_BANDS + 1)[:SPECTRUM_BANDS]
    counts = np.bincount(band.ravel(), minlength=SPECTRUM_BANDS + 1)[:SPECTRUM_BANDS]
    return np.log1p(sums / np.maximum(counts, 1))


# The feature groups, in statistics_of's order: (name, length).
GROUPS = (("pooled", POOLED * POOLED), ("histogram", HISTOGRAM_BINS), ("edges", 4), ("spectrum", SPECTRUM_BANDS),
          ("grey", 2))


def statistics_of(path: str, size: int) -> np.ndarray:
    """The raw (unstandardised) statistics of one image read at size x size, grey in [0, 1]."""
    grey = np.asarray(load_image(path, size=size).convert("L"), dtype=np.float64) / 255.0
    pooled = np.asarray(Image.fromarray(grey).resize((POOLED, POOLED), Image.BOX)).ravel()
    histogram = np.histogram(grey, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / grey.size
    gy, gx = np.gradient(grey)
    gradient = np.hypot(gx, gy)
    laplacian = (np.roll(grey, 1, 0) + np.roll(grey, -1, 0) + np.roll(grey, 1, 1) + np.roll(grey, -1, 1)
                 - 4 * grey)[1:-1, 1:-1]
    edges = [gradient.mean(), gradient.std(), np.percentile(gradient, 90), np.abs(laplacian).mean()]
    return np.concatenate([pooled, histogram, edges, _radial_log_power(grey), [grey.mean(), grey.std()]])


def identity(size: int) -> str:
    """What the features are, for the keys of every table computed from them."""
    return f"image-statistics-v{VERSION}-{size}px"


def image_statistics(images: pd.DataFrame, reference: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    """sha256 -> standardised statistics for every image in `images` (columns path, sha256); the mean and std
    come from the `reference` images (the labelled real set), a constant feature gets std 1."""
    unique = images.drop_duplicates("sha256")
    raw = np.stack([statistics_of(p, size) for p in unique["path"]])
    by_digest = dict(zip(unique["sha256"], raw))
    ref = np.stack([by_digest[d] if d in by_digest else statistics_of(p, size)
                    for p, d in zip(reference["path"], reference["sha256"])])
    return {d: (x - ref.mean(0)) / group_scale(ref) for d, x in by_digest.items()}


def group_scale(reference: np.ndarray) -> np.ndarray:
    """Per feature, a divisor that gives every group the same total variance over the reference images (the
    mean per feature stays 1). Per group, not per feature: a histogram bin the real images almost never reach
    has a std near 0, and dividing by it put one synthetic image 100s of units away, whose cube then dominated
    KID (measured: 186,858 vs ~100). Alike per group, not per feature: otherwise the 16 pooled values, which
    mostly say where cells happen to lie, would outweigh the 4 edge statistics that say how sharp they are."""
    dims, share = reference.shape[1], reference.shape[1] / len(GROUPS)  # each group's share of the variance
    scale, start = np.empty(dims), 0
    for _, length in GROUPS:
        block_variance = float((reference[:, start:start + length].std(0) ** 2).sum())
        scale[start:start + length] = max(np.sqrt(block_variance / share), 1e-12)
        start += length
    return scale
