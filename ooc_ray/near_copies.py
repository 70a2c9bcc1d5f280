"""Images that are one picture saved twice (re-encoded, resized, converted), found by their pixels: the data stage
refuses byte-identical copies by sha256, which a JPEG re-save or a resized export escapes. A near copy held out
while its twin trains inflates accuracy just as an exact one does.

Two images are near copies when both of their grey-level signatures agree: the 16x16 thumbnail (its overall
light and shapes) and the 32x32 thumbnail less its Gaussian blur (its edges and detail, free of slow
illumination changes). Each is centred and scaled to unit length, then the set's mean signature is taken away
and the rest scaled to unit length again (comparable()): what every field of one microscope shares (a burned-in
scale bar or time stamp, dust on the sensor, vignetting) cancels, so the agreement left is a correlation of
what differs. Measured with benchmarks/bench_near_copies.py (2026-12-06, 2-core Xeon): distinct images come at
most to 0.755 (thumbnail) and 0.727 (detail) among the 2,400 PBC images of ../shared/data, 0.860 and 0.172
among the demo's 52; PBC copies saved as JPEG at quality 50 or 90 or at half size keep at least 0.9996 and
0.9986, the demo's (64 px) 0.977 and 0.918. Sparse fields sharing a scale bar and stamp: 0.13 apart, a quality-90
re-save 0.99 and 0.97 (tests/test_data.py). Both above THUMBNAIL_MIN and DETAIL_MIN is a near copy; a faint
field re-saved at low JPEG quality may go unseen (0.80 and 0.75 at quality 50). data.near_copies: allow turns
the refusal into a warning for distinct images the check mistakes.
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

THUMBNAIL_MIN = 0.97
DETAIL_MIN = 0.90
_THUMBNAIL, _DETAIL, _BLUR = 16, 32, 2.0  # pixels; the blur's radius at 32 px
# What a cached signature was computed with: a cache made otherwise is made again.
SIGNATURE_VERSION = 1  # bumped whenever signatures() or the reading it relies on (images.load_image) changes
SETTINGS = (f"version {SIGNATURE_VERSION}, thumbnail {_THUMBNAIL}, detail {_DETAIL} less blur {_BLUR}, "
            f"Pillow {PIL.__version__}")
# Rows of the correlation matrix at a time: 1,024 x 82,200 float32 is 340 MB. The search is quadratic, in BLAS:
# 0.2 s for 8,220 images, 1 s for 20,000, 21 s for 82,200 (100x the paper's set; 2 cores).
_BLOCK = 1024
Signatures = tuple[np.ndarray, np.ndarray]  # (thumbnails, details) of a set of images: image_signatures'


def _unit(values: np.ndarray) -> np.ndarray:
    """One image's grey levels, centred and of unit length (a flat image: zeros, which match nothing)."""
    return _unit_rows((values.ravel() - values.mean())[None])[0]


def _unit_rows(values: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return (values / np.where(norms > 0, norms, 1.0)).astype(np.float32)


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


def image_signatures(paths: list[str], digests: list[str], cache: Path) -> Signatures:
    """The (n, 256) thumbnails and (n, 1024) details of the images at `paths`, whose bytes are `digests`; a
    signature is a pure function of the bytes, so `cache` keeps them by sha256 and only new bytes are decoded
    (the PBC set's 2,400: 2.8 s, most of it decoding; 0.08 s cached). The cache is rewritten to hold exactly
    these images."""
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


def comparable(*sets: Signatures) -> list[Signatures]:
    """Each set's signatures less the mean signature of all of them, scaled to unit length again: what every image
    shares (a burned-in scale bar or time stamp, dust on the sensor, vignetting) would otherwise make distinct
    fields of one microscope agree, and it cancels here."""
    shared = [np.concatenate([signatures[part] for signatures in sets]).mean(axis=0) for part in (0, 1)]
    return [(_unit_rows(thumbnails - shared[0]), _unit_rows(details - shared[1])) for thumbnails, details in sets]


def near_copy_pairs(signatures_a: Signatures, signatures_b: Signatures | None = None) -> list[tuple[int, int]]:
    """Index pairs of images that are near copies, from their image_signatures: (i, j) with i < j within one set,
    or (i in a, j in b) between two."""
    within = signatures_b is None
    (thumbnails_a, details_a), (thumbnails_b, details_b) = (
        comparable(signatures_a) * 2 if within else comparable(signatures_a, signatures_b))
    pairs = []
    for start in range(0, len(thumbnails_a), _BLOCK):
        close = thumbnails_a[start:start + _BLOCK] @ thumbnails_b.T >= THUMBNAIL_MIN
        for i, j in zip(*np.nonzero(close)):
            i += start
            if (i < j or not within) and float(details_a[i] @ details_b[j]) >= DETAIL_MIN:
                pairs.append((int(i), int(j)))
    return pairs
