"""Images that are one picture saved twice (re-encoded, resized, converted), found by their pixels: the data stage
refuses byte-identical copies by sha256, which a JPEG re-save or a resized export escapes. A near copy held out
while its twin trains inflates accuracy just as an exact one does.

Two images are near copies when both of their grey-level signatures agree: the 16x16 thumbnail (its overall
light and shapes) and the 32x32 thumbnail less its Gaussian blur (its edges and detail, free of illumination
such as vignetting, which distinct fields of one microscope share). Each is centred and scaled to unit length,
so agreement is a correlation. Measured with benchmarks/bench_near_copies.py (2026-12-06, 2-core Xeon): distinct
images come at most to 0.918 (thumbnail) and 0.733 (detail) among the 2,400 PBC images of ../shared/data, 0.871
and 0.196 among the demo's 52; PBC copies saved as JPEG at quality 50 or 90 or at half size keep at least 0.9996
and 0.9988. Requiring both, above THUMBNAIL_MIN and DETAIL_MIN, flags only copies. The demo's 64 px fields lose
more to a re-save (quality 50: 0.978 and 0.920; half size: 0.989 and 0.932): such copies of tiny images may go
unseen. The PBC set's check takes 2.7 s, most of it decoding.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageFilter

from ooc_ray.images import load_image
from ooc_ray.io import atomic_path
from ooc_ray.logs import note

THUMBNAIL_MIN = 0.99
DETAIL_MIN = 0.95
_THUMBNAIL, _DETAIL, _BLUR = 16, 32, 2.0  # pixels; the blur's radius at 32 px
# What a cached signature was computed with: a cache made otherwise is made again.
SETTINGS = f"thumbnail {_THUMBNAIL}, detail {_DETAIL} less blur {_BLUR}, Pillow {PIL.__version__}"
# Rows of the correlation matrix at a time: 1,024 x 82,200 float32 is 340 MB. The search is quadratic, in BLAS:
# 0.2 s for 8,220 images, 1 s for 20,000, 21 s for 82,200 (100x the paper's set; 2 cores).
_BLOCK = 1024


def _unit(values: np.ndarray) -> np.ndarray:
    centred = values.ravel() - values.mean()
    norm = np.linalg.norm(centred)
    return (centred / norm if norm > 0 else centred).astype(np.float32)  # a flat image matches nothing


def signatures(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, detail) unit vectors of one image, read as every stage reads it (images.load_image)."""
    grey = load_image(path).convert("L")
    thumbnail = np.asarray(grey.resize((_THUMBNAIL, _THUMBNAIL), Image.BILINEAR), dtype=np.float64)
    small = grey.resize((_DETAIL, _DETAIL), Image.BILINEAR)
    detail = (np.asarray(small, dtype=np.float64)
              - np.asarray(small.filter(ImageFilter.GaussianBlur(_BLUR)), dtype=np.float64))
    return _unit(thumbnail), _unit(detail)


def _cached(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sha256 -> signatures from `cache`, when it was written with these SETTINGS (else nothing)."""
    if not cache.exists():
        return {}
    try:
        with np.load(cache) as saved:
            if str(saved["settings"]) != SETTINGS:
                return {}
            return dict(zip(saved["sha256"].tolist(), zip(saved["thumbnail"], saved["detail"])))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        note(f"data: {cache} is damaged ({exc}): computing every image's signature again")
        return {}


def image_signatures(paths: list[str], digests: list[str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 256) thumbnails and (n, 1024) details of the images at `paths`, whose bytes are `digests`; a
    signature is a pure function of the bytes, so `cache` keeps them by sha256 and only new bytes are decoded
    (the PBC set's 2,400: 2.7 s, most of it decoding). The cache is rewritten to hold exactly these images."""
    known = _cached(cache)
    rows = [known.get(sha) or signatures(path) for path, sha in zip(paths, digests)]
    thumbnails = np.stack([row[0] for row in rows]) if rows else np.empty((0, _THUMBNAIL ** 2), np.float32)
    details = np.stack([row[1] for row in rows]) if rows else np.empty((0, _DETAIL ** 2), np.float32)
    if set(known) != set(digests):
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, settings=SETTINGS, sha256=np.asarray(digests, dtype=str), thumbnail=thumbnails,
                         detail=details)
    return thumbnails, details


def near_copy_pairs(signatures_a: tuple[np.ndarray, np.ndarray], signatures_b: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> list[tuple[int, int]]:
    """Index pairs of images that are near copies, from their image_signatures: (i, j) with i < j within one set,
    or (i in a, j in b) between two."""
    (thumbnails_a, details_a), within = signatures_a, signatures_b is None
    thumbnails_b, details_b = signatures_a if within else signatures_b
    pairs = []
    for start in range(0, len(thumbnails_a), _BLOCK):
        close = thumbnails_a[start:start + _BLOCK] @ thumbnails_b.T >= THUMBNAIL_MIN
        for i, j in zip(*np.nonzero(close)):
            i += start
            if (i < j or not within) and float(details_a[i] @ details_b[j]) >= DETAIL_MIN:
                pairs.append((int(i), int(j)))
    return pairs
