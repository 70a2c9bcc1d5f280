"""Report stage: Table I/II-style tables, plots and real-vs-synthetic grids from the trial Parquet files.

Tables follow the paper's layout (one table per LoRA weight; rows real only, real + r% synthetic, synthetic
only) with mean and std over folds and the naive majority baseline. Each row is compared with real only, fold
by fold (ooc_ray.comparisons): the headline is the Nadeau-Bengio corrected resampled t-test (its CI of the
accuracy difference and its p, then Holm-adjusted across the table's arms), beside a paired bootstrap CI over
held-out images. The plain paired t and Wilcoxon p stay as columns, not as the headline: the plain t treats
overlapping training folds as independent, and with k=5 the Wilcoxon test cannot go below p=0.0625.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI; must precede pyplot's import
import markdown  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import stats

from ooc_ray import keys
from ooc_ray.backbones import SMALL_CNN, backbone_weights
from ooc_ray.comparisons import (ALPHA, POWER, corrected_t, holm, minimum_detectable_effect, paired_bootstrap,
                                 repeats_to_detect)
from ooc_ray.config import ClassifyConfig, ExperimentConfig
from ooc_ray.data import load_image, load_manifest
from ooc_ray.errors import DataError, MissingInputError
from ooc_ray.io import atomic_path, atomic_write_text, note, parquet_problem
from ooc_ray.paths import ExperimentPaths
from ooc_ray.protocol import draw_table, plan_trials

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def read_trials(trials_dir: Path) -> pd.DataFrame:
    """All trial rows: one glob over trials/*.parquet (history/ and predictions/ live in sub-folders)."""
    files = sorted(Path(trials_dir).glob("*.parquet"))
    if not files:
        raise MissingInputError(f"{trials_dir}: no trial results; run `ooc-ray classify` first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def arm_label(ratio: float, synthetic_only: bool) -> str:
    if synthetic_only:
        return "synthetic only"
    if ratio == 0:
        return "real only"
    return f"real + {ratio * 100:g}% synthetic"


def _arm_order(row) -> float:
    return math.inf if row["synthetic_only"] else row["ratio"]


def naive_baseline(manifest: pd.DataFrame) -> dict:
    """Majority-class accuracy: of the whole set, and per fold of every repeat (predict the training folds'
    majority)."""
    overall = manifest["label"].value_counts(normalize=True).iloc[0]
    per_fold = [acc for column in keys.fold_columns(manifest) for acc in _majority_per_fold(manifest, column)]
    return {"overall": float(overall), "per_fold_mean": float(np.mean(per_fold))}


def _majority_per_fold(manifest: pd.DataFrame, column: str) -> list[float]:
    """Held-out accuracy of the training majority, per fold of one repeat's fold `column`."""
    # From counts, not by filtering and sorting the manifest once per fold: with folds growing with the data that
    # loop was quadratic (500 folds of 164 of 82,000 images: 10 s, now 0.2 s; benchmarks/bench_scale.py).
    held = manifest.groupby([column, "label"]).size()
    total = manifest["label"].value_counts(sort=False)
    # A tie goes where train_rows(...)["label"].value_counts().idxmax() sends it: to the label met first in the
    # training rows sorted by id. Per label: its first image in id order, and its first in any other fold.
    ordered = manifest.sort_values("id", kind="stable")
    labels, folds = ordered["label"].to_numpy(), ordered[column].to_numpy()
    first = {}
    for label in total.index:
        pos = np.flatnonzero(labels == label)
        other = pos[folds[pos] != folds[pos[0]]]
        first[label] = (folds[pos[0]], pos[0], other[0] if len(other) else None)
    per_fold = []
    for fold in sorted(int(f) for f in manifest[column].unique()):
        train = {label: n - int(held.get((fold, label), 0)) for label, n in total.items()}
        met_first = {label: (elsewhere if first_fold == fold else at)
                     for label, (first_fold, at, elsewhere) in first.items()}
        most = max(train.values())
        if most == 0:
            raise ValueError(f"fold {fold}: no training images")  # as value_counts().idxmax() raised
        majority = min((label for label, n in train.items() if n == most), key=met_first.get)
        per_fold.append(int(held.get((fold, majority), 0)) / int(held.loc[fold].sum()))  # == (test == majority).mean()
    return per_fold


def paired_tests(real: pd.Series, other: pd.Series) -> dict:
    """Paired per-fold comparison of `other` against real only (both indexed by fold)."""
    both = pd.concat([real.rename("real"), other.rename("other")], axis=1).dropna()
    diff = both["other"] - both["real"]
    out = {"n_pairs": len(both), "mean_diff": float(diff.mean()) if len(both) else float("nan"),
           "t_p": float("nan"), "wilcoxon_p": float("nan"), "differences": diff.to_numpy()}
    if len(both) >= 2 and diff.abs().sum() > 0:
        out["t_p"] = float(stats.ttest_rel(both["other"], both["real"]).pvalue)
        out["wilcoxon_p"] = float(stats.wilcoxon(both["other"], both["real"]).pvalue)
    return out


def test_train_ratio(real: pd.DataFrame) -> float:
    """n_test / n_train of the real-only trials, mean over folds: the overlap term of the corrected t-test. The
    real images are what the folds resample; synthetic images added to an arm do not change the overlap."""
    return float((real["n_test"] / real["n_train_real"]).mean())


def _correct(predictions: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """(fold, id, correct) of `trials`' held-out predictions."""
    rows = predictions.merge(trials[["trial_key", "fold"]], on="trial_key")
    return pd.DataFrame({"fold": rows["fold"], "id": rows["id"], "correct": rows["pred_index"] == rows["label_index"]})


def bootstrap_vs_real(predictions: pd.DataFrame, arm: pd.DataFrame, real: pd.DataFrame, seed: int = 0) -> dict:
    """Paired bootstrap CI of accuracy(arm) - accuracy(real only) over the images both predicted in a fold."""
    both = _correct(predictions, arm).merge(_correct(predictions, real), on=["fold", "id"], suffixes=("_arm", "_real"))
    return paired_bootstrap(both["id"], both["correct_arm"], both["correct_real"], seed=seed)


def summary_tables(trials: pd.DataFrame, predictions: pd.DataFrame | None = None) -> dict[float, pd.DataFrame]:
    """One table per LoRA weight: mean/std over folds per arm, and each arm against real only: the corrected
    t-test (CI, p, Holm-adjusted p across the table's arms), the plain paired t and Wilcoxon p, and, given the
    trials' `predictions` (trial_key, id, pred_index, label_index), a paired bootstrap CI over images.

    Real-only trials have no weight (NaN; run once per fold) and appear as the first row of every table."""
    real = trials[(trials["ratio"] == 0) & ~trials["synthetic_only"]]
    real_by_fold = real.set_index("fold")
    overlap = test_train_ratio(real) if len(real) else math.nan
    weights = sorted(trials["weight"].dropna().unique(), reverse=True)
    tables = {}
    for weight in weights or [float("nan")]:
        rows = pd.concat([real, trials[trials["weight"] == weight]], ignore_index=True)
        out = []
        for (ratio, synthetic_only), group in rows.groupby(["ratio", "synthetic_only"], sort=False):
            by_fold = group.set_index("fold")
            rec = {"arm": arm_label(ratio, synthetic_only), "ratio": ratio, "synthetic_only": synthetic_only,
                   "weight": weight, "n_folds": len(group)}
            for metric in METRICS:
                rec[f"{metric}_mean"] = group[metric].mean()
                rec[f"{metric}_std"] = group[metric].std(ddof=1) if len(group) > 1 else float("nan")
            is_real = ratio == 0 and not synthetic_only
            test = paired_tests(real_by_fold["accuracy"], by_fold["accuracy"]) if not is_real else {}
            rec["accuracy_diff_vs_real"] = test.get("mean_diff", math.nan)
            corrected = corrected_t(test["differences"], overlap) if not is_real else {}
            rec["diff_ci_low"], rec["diff_ci_high"] = corrected.get("ci_low", math.nan), corrected.get("ci_high", math.nan)
            rec["corrected_p"] = corrected.get("p", math.nan)
            rec["diff_sd"] = float(np.std(test["differences"], ddof=1)) if len(test.get("differences", [])) > 1 else math.nan
            rec["paired_t_p"] = test.get("t_p", math.nan)
            rec["wilcoxon_p"] = test.get("wilcoxon_p", math.nan)
            boot = bootstrap_vs_real(predictions, group, real) if predictions is not None and not is_real else {}
            rec["bootstrap_ci_low"], rec["bootstrap_ci_high"] = boot.get("ci_low", math.nan), boot.get("ci_high", math.nan)
            out.append(rec)
        table = pd.DataFrame(out)
        table = table.iloc[sorted(range(len(table)), key=lambda i: _arm_order(table.iloc[i]))].reset_index(drop=True)
        table["holm_p"] = holm(table["corrected_p"])  # the family: this table's arms against real only
        tables[weight] = table
    return tables


def sensitivity_line(table: pd.DataFrame, k: int) -> str:
    """What the design can detect: the corrected t's minimum detectable effect at 80 % power from the arms'
    median fold-to-fold sd of the difference, and the repeats of k-fold CV that 0.01 and 0.02 would need."""
    arms = table[table["diff_sd"].notna()]
    if arms.empty or not arms["diff_sd"].median() > 0:  # no spread of differences: nothing to scale from
        return ""
    sd, j = float(arms["diff_sd"].median()), int(arms["n_folds"].median())
    mde = minimum_detectable_effect(sd, j, 1 / (k - 1))
    floor = minimum_detectable_effect(sd, 10 ** 6, 1 / (k - 1))

    def need(effect: float) -> str:
        repeats = repeats_to_detect(effect, sd, k)
        if repeats is None:
            return f"{effect:g}: no number of repeats (the corrected test's floor is {floor:.3f})"
        return f"{effect:g}: " + ("this design" if repeats == 1 else f"{repeats} repeats")

    return (f"Design sensitivity (corrected t, {POWER:.0%} power, two-sided α = {ALPHA:g}): with {j} folds and the "
            f"arms' median fold-to-fold sd of the difference, {sd:.3f}, the smallest accuracy difference this grid "
            f"detects is **{mde:.3f}**. Repeats of {k}-fold CV needed to detect {need(0.01)}; {need(0.02)}.")


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-facing columns: 'mean ± std' strings and p-values."""
    shown = pd.DataFrame({"training set": table["arm"], "folds": table["n_folds"]})
    for metric in METRICS:
        shown[metric.replace("_macro", "")] = [_fmt(m, s) for m, s in
                                               zip(table[f"{metric}_mean"], table[f"{metric}_std"])]
    def interval(low: float, high: float) -> str:
        return "" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"

    def p_value(p: float) -> str:
        return "" if math.isnan(p) else f"{p:.3f}"

    shown["Δacc vs real"] = [("" if math.isnan(d) else f"{d:+.3f}") for d in table["accuracy_diff_vs_real"]]
    shown["95% CI (corrected t)"] = [interval(lo, hi) for lo, hi in zip(table["diff_ci_low"], table["diff_ci_high"])]
    shown["p (corrected t)"] = table["corrected_p"].map(p_value)
    shown["p (Holm)"] = table["holm_p"].map(p_value)
    shown["95% CI (bootstrap)"] = [interval(lo, hi) for lo, hi in zip(table["bootstrap_ci_low"],
                                                                       table["bootstrap_ci_high"])]
    shown["plain paired t p"] = table["paired_t_p"].map(p_value)
    shown["Wilcoxon p"] = table["wilcoxon_p"].map(p_value)
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _plot_accuracy_vs_ratio(tables: dict[float, pd.DataFrame], naive: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for weight, table in tables.items():
        mixed = table[~table["synthetic_only"]]
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _plot_confusions(trials: pd.DataFrame, path: Path) -> None:
    """Confusion matrices summed over folds, one panel per (weight, arm)."""
    groups = sorted(trials.groupby(["weight", "ratio", "synthetic_only"], dropna=False),
                    # real only first, then weights high to low as in the tables, arms by ratio, synthetic last
                    key=lambda g: (not pd.isna(g[0][0]), -(0 if pd.isna(g[0][0]) else g[0][0]), g[0][2], g[0][1]))
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    classes = list(trials["classes"].iloc[0])
    for ax, ((weight, ratio, syn), group) in zip(axes.flat, groups):
        total = np.sum([np.array([list(r) for r in c]) for c in group["confusion"]], axis=0)
        ax.imshow(total, cmap="Blues")
        for (i, j), v in np.ndenumerate(total):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        title = arm_label(ratio, syn) + ("" if pd.isna(weight) else f", w={weight:g}")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(classes)), classes, fontsize=6, rotation=45)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def image_grid(manifest: pd.DataFrame, synthetic: pd.DataFrame, path: Path, per_row: int = 6, size: int = 96) -> Path:
    """Per class: one row of real images, then one row of synthetic images per LoRA weight."""
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
            canvas.paste(load_image(file, size), (label_w + c * size, r * size))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def current_trials(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame
                   ) -> tuple[pd.DataFrame, int]:
    """The finished trials of this config on this data (trials/ keeps every config's trials: a changed setting
    or changed data adds files, never overwrites), and how many the grid plans. Read-only: builds nothing."""
    weights = backbone_weights(cfg.classify, paths.models, manifest, build=False)
    planned = plan_trials(cfg, manifest, draw_table(cfg, paths), weights.identity)
    files = [paths.trial(t.key) for t in planned if not parquet_problem(paths.trial(t.key))]
    if not files:
        raise MissingInputError(f"{paths.trials}: no trials of this config on this data; run `ooc-ray classify` first")
    trials = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    digests = sorted(set(trials["data_digest"]))
    if digests != [keys.data_digest(manifest)]:  # cannot happen through the keys; refuse rather than mix
        raise DataError(f"{paths.trials}: trials of different data ({', '.join(d[:12] for d in digests)}) "
                        "would share one table; re-run `ooc-ray classify`")
    return trials, len(planned)


def trial_predictions(paths: ExperimentPaths, trials: pd.DataFrame) -> pd.DataFrame | None:
    """The per-image predictions of `trials` (for the bootstrap), or None where any trial's file is missing
    (trials from before predictions were stored): then the report says so rather than resample a subset."""
    files = [paths.predictions / f"{key}.parquet" for key in trials["trial_key"]]
    if any(parquet_problem(f) for f in files):
        note("report: some trials have no predictions file: no bootstrap intervals")
        return None
    columns = ["trial_key", "id", "pred_index", "label_index"]
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


def _classifier_line(cc: ClassifyConfig) -> str:
    if cc.backbone == SMALL_CNN:
        trained = "trained from scratch" if cc.weights == "none" else f"from {cc.weights}, all layers trained"
    elif cc.train_backbone:
        trained = f"{cc.weights}, top {cc.train_backbone} blocks trained"
    else:
        trained = f"{cc.weights}, frozen"
    return f"{cc.backbone} ({trained}), {cc.input_size} px, {cc.epochs} epochs, lr {cc.lr:g}, mode {cc.mode}"


def _header(cfg: ExperimentConfig, manifest: pd.DataFrame, trials: pd.DataFrame, n_planned: int) -> list[str]:
    protocol = {"fold": "generator per fold: each fold's LoRAs saw only that fold's training images",
                "all": "generator on all images (the paper's protocol): LoRAs saw the held-out images too"}
    naive = naive_baseline(manifest)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["label"].value_counts().items())
    return [f"# ooc-ray report: {cfg.name}", "",
            f"- data: {len(manifest)} images in {manifest['label'].nunique()} classes ({counts}); "
            f"manifest digest `{keys.data_digest(manifest)[:16]}`; {cfg.folds.k}-fold CV"
            + ("" if cfg.folds.repeats == 1 else f", {cfg.folds.repeats} repeats ({cfg.folds.k * cfg.folds.repeats} folds)"),
            f"- generator protocol: **{cfg.generator.split}** ({protocol[cfg.generator.split]})",
            f"- classifier: {_classifier_line(cfg.classify)}",
            f"- naive (majority class) accuracy: {naive['overall']:.3f} overall, "
            f"{naive['per_fold_mean']:.3f} mean over held-out folds",
            f"- trials: {len(trials)}" + ("" if len(trials) == n_planned else f" of {n_planned} planned "
                                                                            "(the others have not run yet)"), ""]


TESTS_NOTE = (
    "Each row is compared with real only, fold by fold. **Δacc** is the mean paired difference. **95% CI (corrected "
    "t)** and **p (corrected t)**: the Nadeau-Bengio corrected resampled t-test (the variance of the fold "
    "differences times 1/J + n_test/n_train, J - 1 df), because training folds overlap and the plain t-test "
    "over-rejects; **p (Holm)**: that p adjusted across this table's arms. **95% CI (bootstrap)**: a paired "
    "percentile bootstrap (2,000 resamples) of the accuracy difference over the held-out images both classifiers "
    "predicted. **plain paired t p** and **Wilcoxon p** are shown for comparison only (with 5 folds Wilcoxon "
    "cannot go below 0.0625). A difference is supported when the corrected CI excludes 0 and the Holm p is below "
    "0.05.")


def _write_tables(tables: dict[float, pd.DataFrame], out: Path, k: int) -> list[str]:
    lines, combined = [TESTS_NOTE, ""], []
    for weight, table in tables.items():
        name = "no_weight" if pd.isna(weight) else f"w{weight:g}"
        shown = display_table(table)
        with atomic_path(out / f"table_{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        atomic_write_text(out / f"table_{name}.md", to_markdown(shown) + "\n")
        atomic_write_text(out / f"table_{name}.tex", shown.to_latex(index=False, escape=True))
        title = "Real images only (no synthetic arms in this grid)" if pd.isna(weight) else f"LoRA weight {weight:g}"
        lines += [f"## {title}", "", to_markdown(shown), ""]
        if sensitivity := sensitivity_line(table, k):
            lines += [sensitivity, ""]
        combined.append(table)
    with atomic_path(out / "summary.csv") as tmp:
        pd.concat(combined, ignore_index=True).to_csv(tmp, index=False)
    return lines


def summarise_quality(quality: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds per (weight, class): the quality table the report shows."""
    cols = ["kid", "kid_to_weight0", "lora_effect_p", "cas_recall", "cas_accuracy", "nn_distance_median", "memorised_fraction",
            "real_confidence_median"]
    cols = [c for c in cols if c in quality.columns]  # kid_to_weight0: quality tables from before it existed
    return quality.groupby(["weight", "label"], sort=False)[cols].mean().reset_index()


def _quality_section(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[str]:
    if parquet_problem(paths.quality):
        return []
    quality = summarise_quality(pd.read_parquet(paths.quality))
    cc = cfg.classify
    untrained = cc.backbone == SMALL_CNN and cc.weights == "none"
    if cfg.quality.features == "image_statistics":
        features = (f"weight-free image statistics at {cfg.sample.output_size or cfg.sample.resolution} px (grey "
                    "levels, edges, power spectrum; standardised on the real images)")
    else:
        features = (f"{cc.backbone} features" + (" of its seeded random initialisation, as the trials start from it"
                                                 if untrained else f" ({cc.weights}, frozen)"))
    return ["## Synthetic quality per class (mean over folds)", "",
            f"All measures on {features}. KID: lower is closer to the real training images of that class; "
            "kid_to_weight0: KID between this pool and the LoRA-weight-0.0 pool (the base without the class LoRA) "
            "of the same class, i.e. how far the LoRA moved the images; lora_effect_p: permutation p-value "
            "(1,000 relabellings) of the MMD between the two, all folds pooled. CAS = recall on real held-out "
            "images of a linear classifier trained on synthetic images only; memorised = share of synthetic images "
            "closer to a real training image than 95 % of real images are to each other.", "",
            to_markdown(quality.round(4)), ""]


# One file to open anywhere (mail it, attach it to a lab notebook): no script, no external resource.
HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #eee; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head>
<body>
{body}
</body></html>
"""


def html_report(markdown_text: str, folder: Path, title: str) -> str:
    """report.md as one self-contained HTML page: the same text and tables (Python-Markdown with its tables
    extension), every PNG it shows embedded as a data URI. A PNG the text names but the folder lacks is an error,
    never a broken image."""
    body = markdown.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        png = folder / html.unescape(match.group(1))
        if not png.is_file():
            raise MissingInputError(f"{png}: the report shows it, but it was not written")
        return f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"/:]+\.png)"', embed, body)
    return HTML_PAGE.format(title=html.escape(title), body=body)


def run_report(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path:
    """report/: tables, plots and image grids of this config's finished trials."""
    manifest = load_manifest(paths)
    trials, n_planned = current_trials(cfg, paths, manifest)
    tables = summary_tables(trials, trial_predictions(paths, trials))
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    lines = _header(cfg, manifest, trials, n_planned) + _write_tables(tables, out, cfg.folds.k)
    _plot_accuracy_vs_ratio(tables, naive_baseline(manifest)["overall"], out / "accuracy_vs_ratio.png")
    _plot_confusions(trials, out / "confusion_matrices.png")
    lines += ["![accuracy vs ratio](accuracy_vs_ratio.png)", "", "![confusion](confusion_matrices.png)", ""]
    if not parquet_problem(paths.synthetic_table):
        synthetic = pd.read_parquet(paths.synthetic_table)
        if len(synthetic):
            image_grid(manifest, synthetic, out / "real_vs_synthetic.png")
            lines += ["![real vs synthetic](real_vs_synthetic.png)", ""]
    lines += _quality_section(cfg, paths)
    text = "\n".join(lines)
    atomic_write_text(out / "report.html", html_report(text, out, f"ooc-ray report: {cfg.name}"))
    report = atomic_write_text(out / "report.md", text)
    note(f"report: {report} (and report.html beside it: one file, images embedded)")
    return report
