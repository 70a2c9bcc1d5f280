"""Data stage: scan a folder-per-class tree or a CSV, validate every image, write manifest.parquet.

Every image is opened and fully decoded once here, so later stages (which may run for hours on a
cluster) never meet a corrupt file: the error names the file before any GPU time is spent.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ooc_ray.config import ExperimentConfig
from ooc_ray.io import read_parquet, write_parquet
from ooc_ray.paths import ExperimentPaths

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
# Modes that convert to RGB without losing meaning: 8-bit grey, 16-bit grey (microscopes), palette, RGB(A).
SUPPORTED_MODES = {"L", "LA", "I;16", "I;16B", "I;16L", "I", "P", "RGB", "RGBA"}
MANIFEST_COLUMNS = ["id", "path", "label", "label_index", "group", "sha256", "size", "width", "height", "mode"]


class DataError(ValueError):
    """Bad input data; the message names the file or label."""


def _scan_folders(root: Path) -> list[dict]:
    rows = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected one sub-folder of images per class)")
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{class_dir}: class '{class_dir.name}' has no images")
        rows += [{"path": p, "rel": p.relative_to(root).as_posix(), "label": class_dir.name, "group": ""}
                 for p in files]
    return rows


def _scan_csv(csv_path: Path, group_column: str) -> list[dict]:
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read CSV: {exc}") from None
    missing = [c for c in ("file", "label") if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}")
    if group_column and group_column not in table.columns:
        raise DataError(f"{csv_path}: data.group_column '{group_column}' is not a column; found {list(table.columns)}")
    rows = []
    for line, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        if not rec["file"] or not rec["label"]:
            raise DataError(f"{csv_path}:{line}: empty file or label")
        path = Path(rec["file"])
        path = path if path.is_absolute() else csv_path.parent / path
        group = rec[group_column] if group_column else ""
        rows.append({"path": path, "rel": rec["file"], "label": rec["label"], "group": group})
    return rows


def inspect_image(path: Path) -> dict:
    """Decode the whole image (catching truncated files) and return its facts."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # .open() only reads the header; .load() decodes every pixel
            mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from None
    if mode not in SUPPORTED_MODES:
        raise DataError(f"{path}: unsupported image mode {mode!r} (supported: {sorted(SUPPORTED_MODES)})")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "width": width,
        "height": height,
        "mode": mode,
    }


def scan(source: str | Path, classes: tuple[str, ...] = (), group_column: str = "") -> pd.DataFrame:
    """Scan and validate a dataset; returns the manifest table (not yet written)."""
    source = Path(source)
    if source.is_dir():
        if group_column:
            raise DataError(f"{source}: data.group_column needs a CSV source (file,label,{group_column})")
        rows = _scan_folders(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        rows = _scan_csv(source, group_column)
    else:
        raise DataError(f"data.source {str(source)!r}: not a folder or a .csv file")
    if not rows:
        raise DataError(f"{source}: no images listed")

    found = sorted({r["label"] for r in rows})
    if classes:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            example = next(r["path"] for r in rows if r["label"] in unknown)
            raise DataError(f"{source}: unknown label(s) {unknown} (e.g. {example}); data.classes = {list(classes)}")
        empty = [c for c in classes if c not in found]
        if empty:
            raise DataError(f"{source}: class(es) {empty} in data.classes have no images")
        order = list(classes)
    else:
        order = found
    if len(order) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {order}")

    records = []
    for row in rows:
        path = row["path"].resolve()
        facts = inspect_image(path)
        # id = content hash + name hash: stable across machines and re-scans (absolute paths differ,
        # files get added), and unique when two files share bytes (repeated acquisitions happen).
        name_hash = hashlib.sha256(row["rel"].encode()).hexdigest()[:6]
        records.append({"id": f"{facts['sha256'][:12]}-{name_hash}", "path": str(path), "label": row["label"],
                        "group": row["group"], **facts})
    df = pd.DataFrame(records)
    dup_paths = df["path"][df["path"].duplicated()]
    if len(dup_paths):
        raise DataError(f"{source}: file listed twice: {dup_paths.iloc[0]}")
    df["label_index"] = df["label"].map({c: i for i, c in enumerate(order)}).astype(int)
    if group_column and (df["group"] == "").any():
        raise DataError(f"{source}: empty group for {df.loc[df['group'] == '', 'path'].iloc[0]}")
    return df[MANIFEST_COLUMNS]


def class_names(manifest: pd.DataFrame) -> list[str]:
    pairs = manifest[["label_index", "label"]].drop_duplicates().sort_values("label_index")
    return pairs["label"].tolist()


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (grey -> 3 equal channels), optionally resized to size x size."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                # 16-bit microscopy: scale the full range to 8 bits instead of clipping at 255.
                import numpy as np

                arr = np.asarray(img, dtype=np.float64)
                top = max(float(arr.max()), 1.0)
                img = Image.fromarray((arr * (255.0 / top)).astype("uint8"), mode="L")
            rgb = img.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from None
    if size:
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return rgb


def resolve_source(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path:
    if cfg.data.source == "demo":
        from ooc_ray.demo_data import write_demo_dataset

        return write_demo_dataset(paths.demo_data, cfg.data.demo)
    return Path(cfg.data.source).expanduser()


def source_fingerprint(source: Path) -> str:
    """Hash of what a scan would read, from file stats only (no decoding): names, sizes, mtimes.

    Re-scanning the paper's 822 2048x1536 JPGs decodes ~2.6 GB of pixels; a stat walk takes milliseconds."""
    h = hashlib.sha256()
    if source.is_file():
        h.update(source.read_bytes())
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        files = [source.parent / f for f in table.get("file", [])]
    else:
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for f in files:
        st = f.stat() if f.exists() else None
        h.update(f"{f}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def run_data(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Write manifest.parquet and folds.parquet; returns the manifest with its `fold` column.

    Skipped when the data/folds config and the source's file stats are those of the last run (data.json)."""
    from ooc_ray.config import slice_key
    from ooc_ray.folds import assign_folds
    from ooc_ray.io import atomic_write_text

    source = resolve_source(cfg, paths)
    key = slice_key(cfg.data, cfg.folds, source_fingerprint(source))
    stamp = paths.root / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        try:
            return load_manifest(paths)
        except (FileNotFoundError, DataError):
            pass  # outputs damaged or removed: rebuild them
    manifest = scan(source, cfg.data.classes, cfg.data.group_column)
    folds = assign_folds(manifest, cfg.folds)
    # Manifest first, folds second, stamp last: a kill in between leaves a stale stamp key, so it re-runs.
    write_parquet(manifest, paths.manifest)
    write_parquet(folds, paths.folds)
    atomic_write_text(stamp, json.dumps({"key": key, "source": str(source), "images": len(manifest)}))
    return manifest.merge(folds, on="id", validate="one_to_one")


def load_manifest(paths: ExperimentPaths) -> pd.DataFrame:
    manifest = read_parquet(paths.manifest)
    folds = read_parquet(paths.folds)
    merged = manifest.merge(folds, on="id", how="left", validate="one_to_one")
    if merged["fold"].isna().any() or len(folds) != len(manifest):
        raise DataError(f"{paths.folds} does not match {paths.manifest}: re-run `ooc-ray data`")
    merged["fold"] = merged["fold"].astype(int)
    return merged
