"""Reading an image file the one way every stage does: 8-bit RGB, 16-bit microscopy scaled to its full range.

Apart from the data stage (ooc_ray.data) so that the processes that only read images (sampling actors, feature
tasks, LoRA training) do not import what scanning and folds need (scikit-learn: ~0.8 s of each process's start).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ooc_ray.errors import DataError


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (grey -> 3 equal channels), optionally resized to size x size."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                # 16-bit microscopy: scale the full range to 8 bits instead of clipping at 255.
                arr = np.asarray(img, dtype=np.float64)
                if arr.min() < 0:  # the data stage refuses these (new bytes); a cast to 8 bits would wrap them
                    raise DataError(f"{path}: negative pixel values (down to {arr.min():g}); shift them to 0 and "
                                    "above and save")
                top = max(float(arr.max()), 1.0)
                img = Image.fromarray((arr * (255.0 / top)).astype("uint8"), mode="L")
            rgb = img.convert("RGB")
    except DataError:
        raise
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from None
    if size:
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return rgb
