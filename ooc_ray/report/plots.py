"""The report's figures: accuracy against the ratio and against each axis, confusion matrices, real-vs-synthetic
image grids, as PNG files (written atomically). Numbers come in computed (ooc_ray.report.tables).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ooc_ray.fields import format_value  # noqa: E402
from ooc_ray.images import load_image  # noqa: E402
from ooc_ray.io import atomic_path  # noqa: E402
from ooc_ray.protocol import CONTROL_LABELS  # noqa: E402
from ooc_ray.protocol import with_arms  # noqa: E402


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_metric_vs_ratio(tables: dict[float, pd.DataFrame], naive: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(tables.values()))
    for control, rows in first[first["control"].fillna("") != ""].groupby("control"):  # the same in every table
        real = first[(first["ratio"] == 0) & ~first["synthetic_only"] & (first["control"].fillna("") == "")]
        line = pd.concat([real, rows])
        ax.errorbar(line["ratio"] * 100, line["accuracy_mean"], yerr=line["accuracy_std"].fillna(0), marker="x",
                    capsize=3, linestyle=":", color="grey" if control == "real_steps" else "black",
                    label=f"control: {CONTROL_LABELS[control].format('r')}")
    for weight, table in tables.items():
        mixed = table[~table["synthetic_only"] & (table["control"].fillna("") == "")]
        ax.errorbar(mixed["ratio"] * 100, mixed["accuracy_mean"], yerr=mixed["accuracy_std"].fillna(0),
                    marker="o", capsize=3, label=f"LoRA weight {weight:g}")
        syn = table[table["synthetic_only"]]
        if len(syn):
            ax.errorbar([mixed["ratio"].max() * 100 + 15], syn["accuracy_mean"], yerr=syn["accuracy_std"].fillna(0),
                        marker="s", capsize=3, linestyle="none", color=ax.lines[-1].get_color())
    ax.axhline(naive, color="grey", linestyle="--", label=f"naive (majority) {naive:.3f}")
    ax.set_xlabel("synthetic images added (% of real training set); square = synthetic only")
    ax.set_ylabel("accuracy (mean ± std over folds)")
    ax.legend(fontsize=8)
    _save(fig, path, dpi=120)


def plot_confusions(trials: pd.DataFrame, path: Path) -> None:
    """Confusion matrices summed over folds, one panel per arm (real only and controls first, then weights high
    to low as in the tables, arms by their order)."""
    groups = sorted(with_arms(trials).groupby("arm_", sort=False),
                    key=lambda g: (g[0].has_weight, -(g[0].weight or 0.0), g[0].order))
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    classes = list(trials["classes"].iloc[0])
    for ax, (arm, group) in zip(axes.flat, groups):
        total = np.sum([np.array([list(r) for r in c]) for c in group["confusion"]], axis=0)
        ax.imshow(total, cmap="Blues")
        for (i, j), v in np.ndenumerate(total):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        ax.set_title(arm.label_with_weight, fontsize=8)
        ax.set_xticks(range(len(classes)), classes, fontsize=6, rotation=45)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    _save(fig, path, dpi=110)


def plot_axis(trials: pd.DataFrame, axis: str, values: tuple, path: Path) -> None:
    """Accuracy against one axis's values: per arm (and LoRA weight), mean ± std over every trial with that value
    (folds, and the other axes' values and replicates)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [format_value(v) for v in values]
    trials = with_arms(trials).assign(axis_value=trials[axis].map(format_value))
    for arm, group in sorted(trials.groupby("arm_", sort=False), key=lambda g: g[0].order):
        stats_by = group.groupby("axis_value")["accuracy"].agg(["mean", "std"]).reindex(labels)
        ax.errorbar(range(len(labels)), stats_by["mean"], yerr=stats_by["std"].fillna(0), marker="o", capsize=3,
                    label=arm.label_with_weight, linestyle=":" if arm.control else "-")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(axis)
    ax.set_ylabel("accuracy (mean ± std over trials)")
    ax.legend(fontsize=7)
    _save(fig, path, dpi=120)


def plot_real_size(curves: pd.DataFrame, metric: str, path: Path) -> None:
    """The metric against the real training images per fold (real_equivalence.size_curves): one line per arm (and
    curve of the other axes), its corrected 95 % interval as error bars (none where it is undefined)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (curve, mixing, order, arm), line in curves.groupby(["curve", "mixing", "order", "arm"], sort=True):
        line = line.sort_values("n_real")
        error = np.vstack([line["mean"] - line["ci_low"], line["ci_high"] - line["mean"]])
        label = ", ".join(part for part in (arm, "" if mixing == "concat" else mixing, curve) if part)
        ax.errorbar(line["n_real"], line["mean"], yerr=np.nan_to_num(error), marker="o", capsize=3, label=label)
    ax.set_xlabel("real training images per fold")
    ax.set_ylim(0, 1.02)  # the metric lives in [0, 1]; a corrected t interval over 3 folds can reach far beyond
    ax.set_ylabel(f"{metric} (mean over folds, corrected 95 % CI)")
    ax.legend(fontsize=7)
    _save(fig, path, dpi=120)


STRETCH_PERCENTILES = (1, 99)
GRID_CAPTION = ("Each tile's contrast is stretched to its own 1st-99th percentile for display (phase-contrast cells "
                "span ~10 grey levels of 255 and showed as flat grey); the images themselves are unchanged.")


def stretch_contrast(image: Image.Image, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> Image.Image:
    """The tile for display: its grey levels from the low to the high percentile mapped onto 0-255 (all channels
    by one map, so colours keep their balance). A flat tile stays as it is."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    low, high = np.percentile(pixels, percentiles)
    if high - low < 1:
        return image.convert("RGB")
    return Image.fromarray(np.clip((pixels - low) * 255.0 / (high - low), 0, 255).astype(np.uint8))


def image_grid(manifest: pd.DataFrame, synthetic: pd.DataFrame, path: Path, per_row: int = 6, size: int = 96) -> Path:
    """Per class: one row of real images, then one row of synthetic images per LoRA weight, each tile's contrast
    stretched for display (GRID_CAPTION)."""
    rows: list[tuple[str, list[str]]] = []
    for label in manifest.sort_values("label_index")["label"].unique():
        real = manifest[manifest["label"] == label].sort_values("id")["path"].head(per_row).tolist()
        rows.append((f"{label}: real", real))
        for weight in sorted(synthetic["weight"].unique(), reverse=True):
            syn = synthetic[(synthetic["label"] == label) & (synthetic["weight"] == weight)]
            rows.append((f"{label}: w={weight:g}", syn.sort_values("path")["path"].head(per_row).tolist()))
    label_w = 130
    canvas = Image.new("RGB", (label_w + per_row * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, files) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), name, fill="black")
        for c, file in enumerate(files):
            canvas.paste(stretch_contrast(load_image(file, size)), (label_w + c * size, r * size))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
