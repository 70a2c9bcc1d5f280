"""Data stage: scan a folder-per-class tree or a CSV, validate every image, write manifest.parquet + folds.

Every image's bytes are hashed on every run (cheap: the paper's 822 JPGs are a few hundred MB) and every image
whose bytes are new is fully decoded, so later stages (which may run for hours on a cluster) never meet a
corrupt file, and a file replaced in place (same path, new bytes) is never mistaken for the old one.
"""
from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ooc_ray.config import DataConfig, ExperimentConfig
from ooc_ray.demo_data import write_demo_dataset
from ooc_ray.errors import DataError, MissingInputError
from ooc_ray.folds import assign_folds
from ooc_ray.io import parquet_problem, sha256_file, write_parquet
from ooc_ray.logs import note, warn
from ooc_ray.keys import fold_columns
from ooc_ray.near_copies import image_signatures, near_copy_pairs
from ooc_ray.paths import ExperimentPaths

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
# Modes that convert to RGB without losing meaning: 8-bit grey, 16-bit grey (microscopes), palette, RGB(A).
SUPPORTED_MODES = {"L", "LA", "I;16", "I;16B", "I;16L", "I", "P", "RGB", "RGBA"}
MANIFEST_COLUMNS = ["id", "path", "label", "label_index", "group", "sha256", "size", "width", "height", "mode",
                    "file"]
_FACTS = ["size", "width", "height", "mode"]
SHOWN_PROBLEMS = 10  # bad files named in the one error (with the count of all): a line stays readable
# CSV cells read as text (keep_default_na=False) that stand for no value: empty, or what str() of pandas' missing
# float writes ("nan"), which would otherwise become a class of its own. Not "none" or "NA": real labels can be.
MISSING_TEXT = {"", "nan", "NaN"}


def _listed(problems: list[str]) -> str:
    """The first SHOWN_PROBLEMS of `problems`, and how many more."""
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return "; ".join(problems[:SHOWN_PROBLEMS]) + more


def visible(path: Path, root: Path) -> bool:
    """No part of `path` below `root` is hidden: '.thumbs/', '.DS_Store', macOS's '._x.png' are not images."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan_folders(root: Path) -> list[dict]:
    rows = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected one sub-folder of images per class)")
    for class_dir in class_dirs:
        # A link whose target is gone stays listed (is_symlink), so the scan names it instead of dropping it.
        files = sorted(p for p in class_dir.rglob("*") if (p.is_file() or p.is_symlink()) and visible(p, class_dir)
                       and p.suffix.lower() in IMAGE_SUFFIXES)
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
    needed = ("file", "label", group_column) if group_column else ("file", "label")
    empty = [f"line {line}: {column} {rec[column]!r}" if rec[column] else f"line {line}: no {column}"
             for line, rec in enumerate(table.to_dict("records"), start=2)  # line 1 is the header
             for column in needed if rec[column].strip() in MISSING_TEXT]
    if empty:
        raise DataError(f"{csv_path}: {len(empty)} empty or missing value(s): {_listed(empty)}")
    for rec in table.to_dict("records"):
        path = Path(rec["file"])
        path = path if path.is_absolute() else csv_path.parent / path
        group = rec[group_column] if group_column else ""
        rows.append({"path": path, "rel": rec["file"], "label": rec["label"], "group": group})
    return rows


def inspect_image(path: Path, data: bytes) -> dict:
    """Decode the whole image (catching truncated files) and return its facts."""
    if not data:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # .open() only reads the header; .load() decodes every pixel
            mode, (width, height) = img.mode, img.size
            lowest = img.getextrema()[0] if mode in ("I", "F") else 0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from None
    if mode not in SUPPORTED_MODES:
        raise DataError(f"{path}: unsupported image mode {mode!r} (supported: {sorted(SUPPORTED_MODES)})")
    if lowest < 0:  # a signed file (a background-subtracted export): grey levels start at 0
        raise DataError(f"{path}: negative pixel values (down to {lowest:g}); shift them to 0 and above and save")
    return {"size": len(data), "width": width, "height": height, "mode": mode}


def _raw_mode(img: Image.Image) -> str:
    """How the file stores its pixels (Pillow's raw mode: 'RGB;16B', 'I;16S'), from its header."""
    if not img.tile:
        return img.mode
    args = img.tile[0].args
    return args[0] if isinstance(args, tuple) else str(args)


def _one_frame(path: Path) -> None:
    """What every stage would misread, from the headers (no pixel decoded), also for bytes a manifest knew:
    a TIFF stack or an animated PNG (its first frame only), and 16 bits per channel other than plain grey
    (colour, grey with alpha: Pillow keeps the high byte of each, and a 12-bit camera's frame comes out nearly
    black). Negative pixels are refused where images are decoded (inspect_image, images.load_image)."""
    with Image.open(path) as img:
        frames, raw = getattr(img, "n_frames", 1), _raw_mode(img)
    if frames > 1:
        raise DataError(f"{path}: {frames} frames (a stack); one image per file: split it")
    if ";16" in raw and not raw.startswith("I;"):  # RGB;16B, RGBA;16L, RGBX;16L, RGBa;16L, LA;16B, ...
        raise DataError(f"{path}: 16 bits per channel ({raw}), which Pillow reads as their high 8 bits; save it as "
                        "8-bit colour or 16-bit grey without alpha")


def _list_images(source: Path, group_column: str) -> list[dict]:
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
    return rows


def _label_problems(source: Path, labels: set[str]) -> None:
    """Labels a typo or an export made apart: spaces around one, or two that differ only in case or in how their
    Unicode is composed ('Good' and 'good'), would each become a class of their own."""
    spaced = sorted(label for label in labels if label != label.strip())
    alike: dict[str, list[str]] = {}
    for label in sorted(labels):
        alike.setdefault(unicodedata.normalize("NFC", label).strip().casefold(), []).append(label)
    twins = [names for names in alike.values() if len(names) > 1]
    found = ([f"label(s) with spaces around them: {spaced}"] if spaced else []) + \
        [f"labels that differ only in case, spaces or Unicode form: {names}" for names in twins]
    if found:
        raise DataError(f"{source}: {'; '.join(found)} (each would be a class of its own)")


def _class_order(source: Path, rows: list[dict], classes: tuple[str, ...]) -> list[str]:
    found = sorted({r["label"] for r in rows})
    _label_problems(source, set(found))
    order = found
    if classes:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            example = next(r["path"] for r in rows if r["label"] in unknown)
            # 'café' typed in a config and 'café' in a macOS folder name look alike, as different code points
            points = "" if all(n.isascii() for n in [*unknown, *classes]) else \
                f" (as code points: {ascii(unknown)} and {ascii(list(classes))})"
            raise DataError(f"{source}: unknown label(s) {unknown} (e.g. {example}); data.classes = {list(classes)}"
                            + points)
        empty = [c for c in classes if c not in found]
        if empty:
            raise DataError(f"{source}: class(es) {empty} in data.classes have no images")
        order = list(classes)
    if len(order) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {order}")
    return order


def scan(source: str | Path, classes: tuple[str, ...] = (), group_column: str = "",
         known: dict[str, dict] | None = None) -> pd.DataFrame:
    """Scan and validate a dataset; returns the manifest table (not yet written).

    `known` maps sha256 -> facts of images decoded before (a previous manifest): bytes seen and checked
    before need no second decode, since decoding is a pure function of the bytes."""
    source = Path(source)
    rows = _list_images(source, group_column)
    order = _class_order(source, rows, classes)
    known = known or {}
    records, problems = [], []
    for row in rows:
        try:
            path = row["path"].resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic-link loop
            problems.append(f"{row['path']}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{row['path']}: file not found" + (f" (a link to {path})" if path != row["path"] else ""))
            continue
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        try:
            facts = known.get(sha) or inspect_image(path, data)
            _one_frame(path)  # also for bytes known from a manifest written before stacks were refused
        except DataError as exc:
            problems.append(str(exc))
            continue
        # id = hash of the path relative to the source: stable across machines and moves of the whole set,
        # and kept when the bytes change (sha256 carries the content), so folds do not reshuffle then.
        rel_hash = hashlib.sha256(row["rel"].encode()).hexdigest()[:16]
        records.append({"id": rel_hash, "path": str(path), "file": row["rel"], "label": row["label"],
                        "group": row["group"], "sha256": sha, **{k: facts[k] for k in _FACTS}})
    if problems:  # every bad file at once (the first SHOWN_PROBLEMS named), not one per run
        raise DataError(f"{source}: {len(problems)} of {len(rows)} images cannot be used: {_listed(problems)}")
    df = pd.DataFrame(records)
    _refuse_copies(source, df)
    df["label_index"] = df["label"].map({c: i for i, c in enumerate(order)}).astype(int)
    return df[MANIFEST_COLUMNS]


def _refuse_copies(source: Path, df: pd.DataFrame) -> None:
    """A file listed twice, or the same bytes under two names: k-fold would put one copy in training and its twin
    in the held-out fold (inflating accuracy), and the same bytes under two labels cannot both be right. Every
    set is named (the first SHOWN_PROBLEMS) in one error."""
    twice = [f"{path} as {', '.join(rows['file'])}" for path, rows in df.groupby("path", sort=True) if len(rows) > 1]
    copies = [f"{', '.join(f'{f} ({label})' for f, label in zip(rows['file'], rows['label']))}"
              for _, rows in df.drop_duplicates("path").groupby("sha256", sort=False) if len(rows) > 1]
    found = ([f"{len(twice)} file(s) listed twice: {_listed(twice)}"] if twice else []) + \
        ([f"{len(copies)} set(s) of byte-identical images (a copy in training and its twin held out inflate "
          f"accuracy; keep one of each): {_listed(copies)}"] if copies else [])
    if found:
        raise DataError(f"{source}: {' | '.join(found)}")


def _refuse_split_near_copies(cfg: DataConfig, source: Path, manifest: pd.DataFrame, folds: pd.DataFrame,
                              cache: Path) -> None:
    """One picture saved twice (re-encoded, resized: ooc_ray.near_copies) under two labels, or in two folds of any
    repeat, where one is held out while its twin trains: every such pair named in one error (in a warning with
    data.near_copies: allow). Twins in one fold never meet across the split and are left alone."""
    columns = fold_columns(folds)
    relabelled, split = [], []
    for i, j in near_copy_pairs(image_signatures(manifest["path"].tolist(), manifest["sha256"].tolist(), cache)):
        a, b = manifest.iloc[i], manifest.iloc[j]
        if a["label"] != b["label"]:
            relabelled.append(" ~ ".join(sorted(f"{row['file']} ({row['label']})" for row in (a, b))))
        elif (folds[columns].iloc[i] != folds[columns].iloc[j]).any():
            split.append(" ~ ".join(sorted((a["file"], b["file"]))))
    found = ([f"{len(relabelled)} picture(s) under two labels (one image re-encoded or resized): "
              f"{_listed(relabelled)}; correct the label or keep one"] if relabelled else []) + \
        ([f"{len(split)} pair(s) of near-identical images (one picture re-encoded or resized) in different folds, "
          f"so one would be held out while its twin trains: {_listed(split)}; keep one of each, or give each pair "
          "one data.group_column value"] if split else [])
    report_near_copies(cfg, f"{source}: {' | '.join(found)}" if found else "")


def report_near_copies(cfg: DataConfig, message: str) -> None:
    """Stop on the near copies `message` names, or with data.near_copies: allow say it and go on."""
    if not message:
        return
    if cfg.near_copies == "allow":
        warn(f"{message} (data.near_copies: allow: going on)")
        return
    raise DataError(f"{message} (if they are distinct images, set data.near_copies: allow)")


def class_names(manifest: pd.DataFrame) -> list[str]:
    pairs = manifest[["label_index", "label"]].drop_duplicates().sort_values("label_index")
    return pairs["label"].tolist()


def resolve_source(cfg: DataConfig, paths: ExperimentPaths) -> Path:
    if cfg.source == "demo":
        return write_demo_dataset(paths.demo_data, cfg.demo)
    return Path(cfg.source).expanduser()


def _known_facts(paths: ExperimentPaths) -> dict[str, dict]:
    problem = parquet_problem(paths.manifest)
    if problem:
        if problem != "missing":
            note(f"data: {paths.manifest} is damaged ({problem}): scanning everything again")
        return {}
    old = pd.read_parquet(paths.manifest)
    return {r["sha256"]: r for r in old[["sha256", *_FACTS]].to_dict("records")}


def _write_if_changed(table: pd.DataFrame, path: Path) -> bool:
    """Write `table` unless the same table is already there (its mtime then tells when the data last changed)."""
    if not parquet_problem(path) and pd.read_parquet(path).equals(table):
        return False
    write_parquet(table, path)
    return True


def run_data(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame:
    """Write manifest.parquet and folds.parquet; returns the manifest with its `fold` column."""
    source = resolve_source(cfg.data, paths)
    manifest = scan(source, cfg.data.classes, cfg.data.group_column, known=_known_facts(paths))
    folds = assign_folds(manifest, cfg.folds)
    _refuse_split_near_copies(cfg.data, source, manifest, folds, paths.image_signatures)
    # Manifest first, folds second: load_manifest refuses a pair that does not match (a kill in between).
    changed = _write_if_changed(manifest, paths.manifest)
    changed = _write_if_changed(folds, paths.folds) or changed
    note(f"data: {len(manifest)} images in {manifest['label'].nunique()} classes from {source}"
         f"{'' if changed else ' (unchanged)'}")
    deep = int(manifest["mode"].str.startswith("I").sum())
    if deep:
        note(f"data: {deep} of them 16-bit grey, each scaled to 8 bits by its own maximum: brightness differences "
             "between images are not kept (docs/limits.md)")
    return manifest.merge(folds, on="id", validate="one_to_one")


def load_manifest(paths: ExperimentPaths) -> pd.DataFrame:
    """The manifest with its `fold` column, every image's bytes checked against it once per process (hashed
    again: the 2,400 PBC images, 39 MB, took 0.05 s here, warm in the page cache; large TIFF sets on NFS take
    longer); errors name the file to re-make."""
    for path in (paths.manifest, paths.folds):
        problem = parquet_problem(path)
        if problem:
            raise MissingInputError(f"{path}: {problem}; run `ooc-ray data` first")
    manifest, folds = pd.read_parquet(paths.manifest), pd.read_parquet(paths.folds)
    merged = manifest.merge(folds, on="id", how="left", validate="one_to_one")
    columns = fold_columns(merged)
    if merged[columns].isna().any(axis=None) or len(folds) != len(manifest):
        raise DataError(f"{paths.folds} does not match {paths.manifest}: re-run `ooc-ray data`")
    merged[columns] = merged[columns].astype(int)
    _check_bytes(paths.manifest, merged)
    return merged


# Manifests whose images this process has hashed (path, mtime, size of the manifest): a command's later stages
# (`run` loads it up to 7 times) and a search worker's later trials do not hash a large set again.
_CHECKED: set[tuple] = set()


def _check_bytes(manifest_path: Path, manifest: pd.DataFrame) -> None:
    """Every image's bytes as the manifest recorded them: a stage would key its results by the recorded bytes and
    read the new ones. Once per manifest per process (the data stage itself hashes every image at each run)."""
    stat = manifest_path.stat()
    signature = (str(manifest_path), stat.st_mtime_ns, stat.st_size)
    if signature in _CHECKED:
        return
    changed = [path for path, sha in zip(manifest["path"], manifest["sha256"]) if _sha256_or_gone(path) != sha]
    if changed:
        raise DataError(f"{manifest_path}: {len(changed)} image(s) changed or gone since `ooc-ray data` ran, e.g. "
                        f"{changed[0]}; run `ooc-ray run` (or `ooc-ray data` first)")
    _CHECKED.add(signature)


def _sha256_or_gone(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return "gone"
