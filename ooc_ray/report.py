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
from ooc_ray.comparisons import (ALPHA, POWER, corrected_t, equivalence, holm, minimum_detectable_effect,
                                 paired_bootstrap, repeats_to_detect)
from ooc_ray.config import REPLICATE_SEED_STEP, ClassifyConfig, ExperimentConfig, Variant, format_value
from ooc_ray.data import load_image, load_manifest
from ooc_ray.errors import DataError, MissingInputError
from ooc_ray.io import atomic_path, atomic_write_text, note, parquet_problem
from ooc_ray.paths import ExperimentPaths
from ooc_ray.diffusion.lora import read_metadata
from ooc_ray.protocol import PlannedTrial, plan_grid, safe_name

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def read_trials(trials_dir: Path) -> pd.DataFrame:
    """All trial rows: one glob over trials/*.parquet (history/ and predictions/ live in sub-folders)."""
    files = sorted(Path(trials_dir).glob("*.parquet"))
    if not files:
        raise MissingInputError(f"{trials_dir}: no trial results; run `ooc-ray classify` first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


CONTROL_LABELS = {"real_steps": "real only, steps of + {}%", "real_augmented": "real + {}% classic augmentation"}


def arm_label(ratio: float, synthetic_only: bool, control: str = "") -> str:
    if control:
        return CONTROL_LABELS[control].format(f"{ratio * 100:g}")
    if synthetic_only:
        return "synthetic only"
    if ratio == 0:
        return "real only"
    return f"real + {ratio * 100:g}% synthetic"


def _arm_order(row) -> tuple:
    """Real only, then by ratio each synthetic arm followed by its matched controls, synthetic only last."""
    control = row.get("control", "") or ""
    return (math.inf if row["synthetic_only"] else row["ratio"], sorted(CONTROL_LABELS).index(control) + 1 if control else 0)


def with_arm_columns(trials: pd.DataFrame) -> pd.DataFrame:
    """Trial rows with `control` and `mixing` (trials from before those columns: none, concat)."""
    control = trials["control"].fillna("") if "control" in trials.columns else ""
    mixing = trials["mixing"].fillna("concat") if "mixing" in trials.columns else "concat"
    return trials.assign(control=control, mixing=mixing)


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


def summary_tables(trials: pd.DataFrame, predictions: pd.DataFrame | None = None,
                   margin: float = 0.02) -> dict[float, pd.DataFrame]:
    """One table per LoRA weight: mean/std over folds per arm, and each arm against real only: the corrected
    t-test (CI, p, Holm-adjusted p across the table's arms), TOST equivalence within +-`margin`, the plain paired t
    and Wilcoxon p, and, given the trials' `predictions` (trial_key, id, pred_index, label_index), a paired
    bootstrap CI over images.

    Real-only trials and the matched controls have no weight (NaN; run once per fold) and appear in every table."""
    trials = with_arm_columns(trials)
    real = trials[(trials["ratio"] == 0) & ~trials["synthetic_only"]]
    controls = trials[trials["control"] != ""]
    real_by_fold = real.set_index("fold")
    overlap = test_train_ratio(real) if len(real) else math.nan
    weights = sorted(trials["weight"].dropna().unique(), reverse=True)
    tables = {}
    for weight in weights or [float("nan")]:
        rows = pd.concat([real, controls, trials[trials["weight"] == weight]], ignore_index=True)
        out = []
        for (ratio, synthetic_only, control), group in rows.groupby(["ratio", "synthetic_only", "control"], sort=False):
            by_fold = group.set_index("fold")
            rec = {"arm": arm_label(ratio, synthetic_only, control), "ratio": ratio, "synthetic_only": synthetic_only,
                   "control": control, "weight": weight, "n_folds": len(group)}
            for metric in METRICS:
                rec[f"{metric}_mean"] = group[metric].mean()
                rec[f"{metric}_std"] = group[metric].std(ddof=1) if len(group) > 1 else float("nan")
            is_real = ratio == 0 and not synthetic_only
            test = paired_tests(real_by_fold["accuracy"], by_fold["accuracy"]) if not is_real else {}
            rec["accuracy_diff_vs_real"] = test.get("mean_diff", math.nan)
            corrected = corrected_t(test["differences"], overlap) if not is_real else {}
            rec["diff_ci_low"], rec["diff_ci_high"] = corrected.get("ci_low", math.nan), corrected.get("ci_high", math.nan)
            rec["corrected_p"] = corrected.get("p", math.nan)
            rec["tost_p"] = equivalence(test["differences"], overlap, margin)["p"] if not is_real else math.nan
            rec["diff_sd"] = float(np.std(test["differences"], ddof=1)) if len(test.get("differences", [])) > 1 else math.nan
            rec["paired_t_p"] = test.get("t_p", math.nan)
            rec["wilcoxon_p"] = test.get("wilcoxon_p", math.nan)
            boot = bootstrap_vs_real(predictions, group, real) if predictions is not None and not is_real else {}
            rec["bootstrap_ci_low"], rec["bootstrap_ci_high"] = boot.get("ci_low", math.nan), boot.get("ci_high", math.nan)
            out.append(rec)
        table = pd.DataFrame(out)
        table = table.iloc[sorted(range(len(table)), key=lambda i: _arm_order(table.iloc[i]))].reset_index(drop=True)
        table["holm_p"] = holm(table["corrected_p"])  # the family: this table's arms against real only
        table["verdict"] = [verdict(d, p, t, margin) for d, p, t in
                            zip(table["accuracy_diff_vs_real"], table["holm_p"], table["tost_p"])]
        tables[weight] = table
    return tables


def verdict(diff: float, holm_p: float, tost_p: float, margin: float) -> str:
    """What a row supports at 5 %: better or worse than real only (corrected t, Holm-adjusted), equivalent within
    the margin (TOST on the corrected t), or neither."""
    if math.isnan(diff):
        return ""
    if holm_p < ALPHA:
        return "better" if diff > 0 else "worse"
    if tost_p < ALPHA:
        return f"equivalent (±{margin:g})"
    return "inconclusive"


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
    shown["TOST p"] = table["tost_p"].map(p_value)
    shown["verdict"] = table["verdict"]
    shown["plain paired t p"] = table["paired_t_p"].map(p_value)
    shown["Wilcoxon p"] = table["wilcoxon_p"].map(p_value)
    if "cost_total_s" in table.columns:
        shown["cost s (LoRA + sampling + trials)"] = [
            "" if math.isnan(total) else f"{total:.0f} ({lora:.0f} + {sampling:.0f} + {trial:.0f})"
            for total, lora, sampling, trial in zip(table["cost_total_s"], table["cost_lora_s"],
                                                    table["cost_sampling_s"], table["cost_trials_s"])]
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _plot_accuracy_vs_ratio(tables: dict[float, pd.DataFrame], naive: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(tables.values()))
    for control, rows in first[first["control"] != ""].groupby("control"):  # the same in every table
        real = first[(first["ratio"] == 0) & ~first["synthetic_only"]]
        line = pd.concat([real, rows])
        ax.errorbar(line["ratio"] * 100, line["accuracy_mean"], yerr=line["accuracy_std"].fillna(0), marker="x",
                    capsize=3, linestyle=":", color="grey" if control == "real_steps" else "black",
                    label=f"control: {CONTROL_LABELS[control].format('r')}")
    for weight, table in tables.items():
        mixed = table[~table["synthetic_only"] & (table["control"] == "")]
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


def _plot_confusions(trials: pd.DataFrame, path: Path) -> None:
    """Confusion matrices summed over folds, one panel per (weight, arm)."""
    trials = with_arm_columns(trials)
    groups = sorted(trials.groupby(["weight", "ratio", "synthetic_only", "control"], dropna=False),
                    # real only and controls first, then weights high to low as in the tables, arms by ratio,
                    # synthetic last
                    key=lambda g: (not pd.isna(g[0][0]), -(0 if pd.isna(g[0][0]) else g[0][0]), g[0][2], g[0][1],
                                   g[0][3]))
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    classes = list(trials["classes"].iloc[0])
    for ax, ((weight, ratio, syn, control), group) in zip(axes.flat, groups):
        total = np.sum([np.array([list(r) for r in c]) for c in group["confusion"]], axis=0)
        ax.imshow(total, cmap="Blues")
        for (i, j), v in np.ndenumerate(total):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        title = arm_label(ratio, syn, control) + ("" if pd.isna(weight) else f", w={weight:g}")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(classes)), classes, fontsize=6, rotation=45)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    _save(fig, path, dpi=110)


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


def finished_trials(paths: ExperimentPaths, planned: list[PlannedTrial], manifest: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of the `planned` trials that have finished (trials/ keeps every config's trials: a changed
    setting or changed data adds files, never overwrites); empty when none has. Read-only: builds nothing."""
    files = [paths.trial(t.key) for t in planned if not parquet_problem(paths.trial(t.key))]
    if not files:
        return pd.DataFrame()
    trials = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    digests = sorted(set(trials["data_digest"]))
    if digests != [keys.data_digest(manifest)]:  # cannot happen through the keys; refuse rather than mix
        raise DataError(f"{paths.trials}: trials of different data ({', '.join(d[:12] for d in digests)}) "
                        "would share one table; re-run `ooc-ray classify`")
    return trials


def planned_grid(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame
                 ) -> list[tuple[Variant, list[PlannedTrial]]]:
    """Every variant with its planned trials, as the classify stage plans them (weights resolved, not built)."""
    return plan_grid(cfg, paths, manifest,
                     lambda cc: backbone_weights(cc, paths.models, manifest, build=False).identity)


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


def _header(cfg: ExperimentConfig, manifest: pd.DataFrame, n_trials: int, n_planned: int) -> list[str]:
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
            f"- trials: {n_trials}" + ("" if n_trials == n_planned else f" of {n_planned} planned "
                                                                       "(the others have not run yet)")]


TESTS_NOTE = (
    "Each row is compared with real only, fold by fold. **Δacc** is the mean paired difference. **95% CI (corrected "
    "t)** and **p (corrected t)**: the Nadeau-Bengio corrected resampled t-test (the variance of the fold "
    "differences times 1/J + n_test/n_train, J - 1 df), because training folds overlap and the plain t-test "
    "over-rejects; **p (Holm)**: that p adjusted across this table's arms. **95% CI (bootstrap)**: a paired "
    "percentile bootstrap (2,000 resamples) of the accuracy difference over the held-out images both classifiers "
    "predicted. **plain paired t p** and **Wilcoxon p** are shown for comparison only (with 5 folds Wilcoxon "
    "cannot go below 0.0625). A difference is supported when the corrected CI excludes 0 and the Holm p is below "
    "0.05. **TOST p**: two one-sided corrected t-tests against the equivalence margin (report.equivalence_margin); "
    "below 0.05 the arm is equivalent to real only within that margin, which is how \"no benefit\" is stated as "
    "a result. **verdict**: better / worse (Holm p < 0.05), equivalent (TOST p < 0.05), or inconclusive. "
    "**cost s**: wall seconds spent on the arm, summed over its folds: the training of every LoRA its trials drew "
    "images from (a LoRA shared by arms counts in each), the sampling of the images they drew, and the trials "
    "themselves; on the devices the config names (generator.gpus, sample.gpus_per_actor, classify.gpus_per_trial; "
    "CPU where 0). Matched controls: **real only, steps of + r%** trains on real images for as many steps as the "
    "real + r% arm; **real + r% classic augmentation** adds as many classic augmentations of real images.")


def table_name(prefix: str, weight: float) -> str:
    return prefix + ("no_weight" if pd.isna(weight) else f"w{weight:g}")


def _write_tables(tables: dict[float, pd.DataFrame], out: Path, k: int, prefix: str = "") -> list[str]:
    lines = []
    for weight, table in tables.items():
        name = table_name(prefix, weight)
        shown = display_table(table)
        with atomic_path(out / f"table_{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        atomic_write_text(out / f"table_{name}.md", to_markdown(shown) + "\n")
        atomic_write_text(out / f"table_{name}.tex", shown.to_latex(index=False, escape=True))
        title = "Real images only (no synthetic arms in this grid)" if pd.isna(weight) else f"LoRA weight {weight:g}"
        lines += [f"### {title}" if prefix else f"## {title}", "", to_markdown(shown), ""]
        if sensitivity := sensitivity_line(table, k):
            lines += [sensitivity, ""]
    return lines


def lora_seconds(lora_root: Path, lora_keys) -> dict[str, float]:
    """Training seconds of each LoRA, from its metadata (NaN where it has none)."""
    out = {}
    for key in lora_keys:
        meta = read_metadata(Path(lora_root) / key)
        out[key] = float(meta.get("seconds", math.nan)) if meta else math.nan
    return out


def add_costs(tables: dict[float, pd.DataFrame], trials: pd.DataFrame, planned: list[PlannedTrial],
              synthetic: pd.DataFrame | None, lora_root: Path) -> None:
    """cost_lora_s, cost_sampling_s, cost_trials_s, cost_total_s per arm (TESTS_NOTE: cost s), in place."""
    trials = with_arm_columns(trials)
    train_of = {t.key: t.train for t in planned}
    images = synthetic.set_index("id") if synthetic is not None and len(synthetic) else None
    has_seconds = images is not None and "render_s" in images.columns
    costs = {}
    for (weight, ratio, synthetic_only, control), group in trials.groupby(
            ["weight", "ratio", "synthetic_only", "control"], dropna=False):
        drawn = pd.concat([train_of[k] for k in group["trial_key"] if k in train_of], ignore_index=True)
        ids = drawn.loc[drawn["source"] == "synthetic", "id"].unique()
        lora = sampling = 0.0
        if len(ids):
            if images is None:
                lora = sampling = math.nan
            else:
                lora = sum(lora_seconds(lora_root, images.loc[ids, "lora_key"].unique()).values())
                sampling = float(images.loc[ids, "render_s"].sum(min_count=len(ids))) if has_seconds else math.nan
        key = (None if pd.isna(weight) else float(weight), ratio, bool(synthetic_only), control)
        trial_s = float(group["duration_s"].sum()) if "duration_s" in group.columns else math.nan
        costs[key] = (lora, sampling, trial_s)
    for table in tables.values():
        found = [costs.get((None if (r == 0 and not so) or c else float(w), r, bool(so), c), (math.nan,) * 3)
                 for w, r, so, c in zip(table["weight"], table["ratio"], table["synthetic_only"], table["control"])]
        table["cost_lora_s"], table["cost_sampling_s"], table["cost_trials_s"] = (list(x) for x in zip(*found))
        table["cost_total_s"] = table["cost_lora_s"] + table["cost_sampling_s"] + table["cost_trials_s"]


def summarise_quality(quality: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds per (weight, class): the quality table the report shows."""
    cols = ["kid", "kid_to_weight0", "lora_effect_p", "cas_recall", "cas_accuracy", "nn_distance_median", "memorised_fraction",
            "real_confidence_median"]
    cols = [c for c in cols if c in quality.columns]  # kid_to_weight0: quality tables from before it existed
    return quality.groupby(["weight", "label"], sort=False)[cols].mean().reset_index()


def _quality_section(cfg: ExperimentConfig, paths: ExperimentPaths, heading: str = "##") -> list[str]:
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
    return [f"{heading} Synthetic quality per class (mean over folds)", "",
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


def _plot_axis(trials: pd.DataFrame, axis: str, values: tuple, path: Path) -> None:
    """Accuracy against one axis's values: per arm (and LoRA weight), mean ± std over every trial with that value
    (folds, and the other axes' values and replicates)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [format_value(v) for v in values]
    trials = trials.assign(axis_value=trials[axis].map(format_value))
    arms = trials.groupby(["weight", "ratio", "synthetic_only", "control"], dropna=False, sort=False)
    for (weight, ratio, synthetic_only, control), group in sorted(arms, key=lambda g: _arm_order(
            {"ratio": g[0][1], "synthetic_only": g[0][2], "control": g[0][3]})):
        stats_by = group.groupby("axis_value")["accuracy"].agg(["mean", "std"]).reindex(labels)
        name = arm_label(ratio, synthetic_only, control) + ("" if pd.isna(weight) else f", w={weight:g}")
        ax.errorbar(range(len(labels)), stats_by["mean"], yerr=stats_by["std"].fillna(0), marker="o", capsize=3,
                    label=name, linestyle=":" if control else "-")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(axis)
    ax.set_ylabel("accuracy (mean ± std over trials)")
    ax.legend(fontsize=7)
    _save(fig, path, dpi=120)


REPLICATES_NOTE = (
    "Generator randomness against the classifier's, per arm (and other axes' values): the accuracy averaged over "
    "folds in each generation replicate; the sd of those replicate means (generator sd); the mean over replicates "
    "of the fold-to-fold sd (fold sd: data split and classifier training); and the generator's share of the "
    "variance of one trial, from one-way random effects: var(replicate means) - var(fold) / folds, floored at 0. "
    "Real only draws no synthetic image, so its generator sd is 0 by construction.")


def replicate_table(trials: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """REPLICATES_NOTE's table, one row per arm (and other axes' values)."""
    rows = []
    by = [*axes, "weight", "ratio", "synthetic_only", "control"]
    for point, group in with_arm_columns(trials).groupby(by, dropna=False, sort=False):
        per = group.groupby("replicate")["accuracy"]
        means, within = per.mean(), per.var(ddof=1)
        folds = int(per.size().median())
        between = max(0.0, float(means.var(ddof=1)) - float(within.mean()) / folds) if len(means) > 1 else math.nan
        values = dict(zip(by, point))
        rows.append({**{a: format_value(values[a]) for a in axes},
                     "arm": arm_label(values["ratio"], values["synthetic_only"], values["control"]),
                     "weight": "" if pd.isna(values["weight"]) else f"{values['weight']:g}",
                     "replicates": len(means), "accuracy": f"{group['accuracy'].mean():.3f}",
                     "generator sd": f"{means.std(ddof=1):.3f}" if len(means) > 1 else "",
                     "fold sd": f"{np.sqrt(within.mean()):.3f}",
                     "generator share": "" if math.isnan(between) else f"{between / (between + within.mean()):.0%}"
                     if between + within.mean() > 0 else "0%"})
    return pd.DataFrame(rows)


def _axes_lines(cfg: ExperimentConfig) -> list[str]:
    lines = [f"- axis **{name}**: {', '.join(format_value(v) for v in values)}" for name, values in cfg.axes]
    if cfg.sample.replicates > 1:
        lines.append(f"- generation replicates: {cfg.sample.replicates} independent pools per setting (replicate r "
                     f"samples with sample.seed + {REPLICATE_SEED_STEP} r)")
    return lines


# What run_report writes into report/ besides report.md/html (which it always rewrites): a file of these
# patterns that a run did not write again is another config's (a LoRA weight or axis value since removed).
REPORT_OUTPUTS = ("table_*.csv", "table_*.md", "table_*.tex", "*accuracy_vs_ratio.png", "*confusion_matrices.png",
                  "*real_vs_synthetic.png", "axis_*.png", "replicates.md")


def remove_stale(out: Path, written: set[str]) -> list[Path]:
    """Delete the REPORT_OUTPUTS files in `out` that this run did not write (`written`: file names), so that a
    glob of report/ never mixes this config's tables with an earlier config's; returns them. By name, not by
    time: on shared storage the file server's clock is not this node's."""
    stale = sorted({f for pattern in REPORT_OUTPUTS for f in out.glob(pattern) if f.name not in written})
    for f in stale:
        f.unlink()
    if stale:
        note(f"report: removed {len(stale)} file(s) of an earlier config from {out}, e.g. {stale[0].name}")
    return stale


def run_report(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path:
    """report/: tables, plots and image grids of this config's finished trials, one set per variant of its axes,
    a plot per axis and, with generation replicates, what the generator's randomness contributes."""
    manifest = load_manifest(paths)
    grid = planned_grid(cfg, paths, manifest)
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    naive = naive_baseline(manifest)["overall"]
    margin = cfg.report.equivalence_margin
    body, combined, tagged, written = [], [], [], {"replicates.md"} if cfg.sample.replicates > 1 else set()
    n_planned = len({t.key for _, planned in grid for t in planned})
    for variant, planned in grid:
        vpaths = paths.for_variant(variant.tag)
        trials = finished_trials(paths, planned, manifest)
        heading = "##" if not variant.point else "###"
        if variant.point:
            body += [f"## {variant.label}", ""]
        if trials.empty:
            body += ["No trial of this variant has finished yet.", ""]
            continue
        tables = summary_tables(trials, trial_predictions(paths, trials), margin)
        synthetic = None if parquet_problem(vpaths.synthetic_table) else pd.read_parquet(vpaths.synthetic_table)
        add_costs(tables, trials, planned, synthetic, paths.lora)
        prefix = f"{variant.tag}__" if variant.tag else ""
        body += _write_tables(tables, out, cfg.folds.k, prefix)
        written |= {f"table_{table_name(prefix, weight)}.{ext}" for weight in tables for ext in ("csv", "md", "tex")}
        written |= {f"{prefix}{name}.png" for name in ("accuracy_vs_ratio", "confusion_matrices", "real_vs_synthetic")}
        _plot_accuracy_vs_ratio(tables, naive, out / f"{prefix}accuracy_vs_ratio.png")
        _plot_confusions(trials, out / f"{prefix}confusion_matrices.png")
        body += [f"![accuracy vs ratio]({prefix}accuracy_vs_ratio.png)", "",
                 f"![confusion]({prefix}confusion_matrices.png)", ""]
        if synthetic is not None and len(synthetic):
            image_grid(manifest, synthetic, out / f"{prefix}real_vs_synthetic.png")
            body += [f"![real vs synthetic]({prefix}real_vs_synthetic.png)", ""]
        body += _quality_section(variant.cfg, vpaths, heading)
        point = {name: format_value(value) for name, value in variant.point}
        combined += [table.assign(variant=variant.tag, **point) for table in tables.values()]
        tagged.append(with_arm_columns(trials).assign(**dict(variant.point)))
    if not combined:
        raise MissingInputError(f"{paths.trials}: no trials of this config on this data; run `ooc-ray classify` first")
    with atomic_path(out / "summary.csv") as tmp:
        pd.concat(combined, ignore_index=True).to_csv(tmp, index=False)
    everything = pd.concat(tagged, ignore_index=True)
    extra = []
    for name, values in cfg.axes:
        file = f"axis_{safe_name(name)}.png"
        written.add(file)
        _plot_axis(everything, name, values, out / file)
        extra += [f"![accuracy against {name}]({file})", ""]
    if cfg.sample.replicates > 1:
        table = replicate_table(everything, [name for name, _ in cfg.axes])
        atomic_write_text(out / "replicates.md", to_markdown(table) + "\n")
        extra += ["## Generator randomness (generation replicates)", "", REPLICATES_NOTE, "", to_markdown(table), ""]
    n_trials = everything["trial_key"].nunique()
    lines = (_header(cfg, manifest, n_trials, n_planned) + _axes_lines(cfg) + ["", TESTS_NOTE, ""]
             + (extra if cfg.axes else []) + body + ([] if cfg.axes else extra))
    text = "\n".join(lines)
    atomic_write_text(out / "report.html", html_report(text, out, f"ooc-ray report: {cfg.name}"))
    report = atomic_write_text(out / "report.md", text)
    remove_stale(out, written)
    note(f"report: {report} (and report.html beside it: one file, images embedded)")
    return report
