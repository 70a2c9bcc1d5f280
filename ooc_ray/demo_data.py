"""A small labelled microscopy-like image set the project generates itself (no downloads).

Phase-contrast-like cell cultures in three quality classes, echoing the paper's good/acceptable/bad:
  good        dense, evenly spread round cells with bright halos, sharp;
  acceptable  about half the density, some elongated cells, mild blur;
  bad         sparse cells, clumps and debris, uneven illumination, strong blur.
Each image belongs to a fake "cell line" group (different cell size and background), written to the CSV,
so group-aware folds can be exercised. Like the paper's set (790 grey + 32 RGB; 2048x1536 and 640x480) it
mixes modes and resolutions: ~1 in 8 images is RGB and ~1 in 6 is at a smaller 4:3 size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ooc_ray.config import DemoDataConfig
from ooc_ray.errors import ConfigError
from ooc_ray.io import atomic_dir
from ooc_ray.keys import digest

CLASSES = ("good", "acceptable", "bad")
VERSION = 2  # part of the reuse key: bump when the drawing changes, so old generated sets are rebuilt
_DENSITY = {"good": (26, 34), "acceptable": (11, 17), "bad": (2, 6)}  # cells per image at 64 px height
_BLUR = {"good": 0.0, "acceptable": 0.6, "bad": 1.4}  # Gaussian radius in px at 64 px height


def _draw(label: str, line: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    scale = height / 64.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = 110.0 + 4.0 * line  # cell lines differ a little (4 grey levels, 8 % in radius), less than classes
    img = np.full((height, width), background, np.float32)
    if label == "bad":  # uneven illumination: a linear ramp of up to 40 grey levels
        angle = rng.uniform(0, 2 * np.pi)
        img += 40.0 * ((np.cos(angle) * xx + np.sin(angle) * yy) / max(width, height) - 0.5)
    radius0 = (3.0 + 0.25 * line) * scale
    lo, hi = _DENSITY[label]
    for _ in range(int(rng.integers(lo, hi + 1))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        elong = rng.uniform(1.0, 2.2) if label != "good" else rng.uniform(1.0, 1.25)
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / elong
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        r = np.sqrt(u * u + v * v) / (radius0 * rng.uniform(0.8, 1.2))
        img -= 45.0 * np.exp(-(r**2) * 1.5)  # dark cell body
        img += 60.0 * np.exp(-((r - 1.15) ** 2) / 0.03)  # bright phase-contrast halo
    if label == "bad":  # debris: small bright specks and a dark clump
        for _ in range(int(rng.integers(8, 16))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            img += 70.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.8 * scale) ** 2)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        img -= 50.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (6.0 * scale) ** 2)
    img += rng.normal(0.0, 6.0, img.shape)  # camera noise
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")
    if _BLUR[label]:
        out = out.filter(ImageFilter.GaussianBlur(_BLUR[label] * scale))
    return np.asarray(out)


def make_image(label: str, line: int, height: int, rgb: bool, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width = height * 4 // 3  # the paper's microscope frames are 4:3 (2048x1536, 640x480)
    grey = _draw(label, line, width, height, rng)
    if not rgb:
        return Image.fromarray(grey, mode="L")
    tint = np.array([1.0, 0.92, 0.85], np.float32)  # warm tint, as an RGB camera export would have
    return Image.fromarray(np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8), mode="RGB")


def write_demo_dataset(root: Path, cfg: DemoDataConfig) -> Path:
    """Write <root>/<class>/*.png and <root>/labels.csv (file,label,cell_line); returns the CSV path.

    Skips the work when the same config already produced the set (key in <root>/demo.json)."""
    root = Path(root)
    key = digest(cfg, VERSION)
    csv = root / "labels.csv"
    marker = root / "demo.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key and csv.exists():
        listed = [line.split(",", 1)[0] for line in csv.read_text().splitlines()[1:]]
        if all((root / name).is_file() for name in listed):
            return csv  # whole: the data stage decodes every file anyway

    if len(cfg.per_class) != len(CLASSES):  # the loader checks this too; here for direct callers
        raise ConfigError(f"data.demo.per_class: need {len(CLASSES)} counts ({', '.join(CLASSES)})")
    with atomic_dir(root) as tmp:
        lines = ["file,label,cell_line"]
        for class_index, (label, count) in enumerate(zip(CLASSES, cfg.per_class)):
            (tmp / label).mkdir()
            for i in range(count):
                seed = cfg.seed * 1_000_003 + class_index * 10_007 + i
                line = i % cfg.groups
                small = i % 6 == 5
                rgb = i % 8 == 7
                height = cfg.size * 3 // 4 if small else cfg.size
                name = f"{label}/{label}_{i:04d}.png"
                make_image(label, line, height, rgb, seed).save(tmp / name)
                lines.append(f"{name},{label},line{line}")
        (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
        (tmp / "demo.json").write_text(json.dumps({"key": key, "config": {"per_class": list(cfg.per_class),
                                                                          "size": cfg.size, "seed": cfg.seed}}))
    return csv
