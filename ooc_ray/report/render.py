"""The report's text: tables as Markdown/CSV/LaTeX, the text around them, and report.md as one self-contained HTML
page (its figures: ooc_ray.report.plots). Numbers come in computed (ooc_ray.report.tables); nothing here tests
anything.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import markdown
import pandas as pd

from ooc_ray import keys
from ooc_ray.backbones import CALIBRATED, SMALL_CNN
from ooc_ray.config import RANDOM_WEIGHTS, REPLICATE_SEED_STEP, ClassifyConfig, ExperimentConfig
from ooc_ray.fields import format_value
from ooc_ray.errors import MissingInputError
from ooc_ray.io import atomic_path, atomic_write_text
from ooc_ray.report.tables import METRICS

METRIC_SHORT = {"accuracy": "acc", "balanced_accuracy": "bal. acc", "f1_macro": "F1"}
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy (macro recall)",
                "f1_macro": "macro F1"}


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# The tables' non-ASCII symbols as LaTeX writes them (pdflatex stops at a raw Δ: "not set up for use with LaTeX").
LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--"}


def to_latex(df: pd.DataFrame) -> str:
    text = df.to_latex(index=False, escape=True)
    for symbol, command in LATEX_SYMBOLS.items():
        text = text.replace(symbol, command)
    return text


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


def _bootstrap_cell(low: float, high: float, n: float, fewest: float, unit: str) -> str:
    """The bootstrap interval; over groups, how many (few make it coarse), or why there is none."""
    if math.isnan(low) and not math.isnan(fewest):
        what = unit if fewest != 1 else unit.rstrip("s")
        return f"no interval (a fold holds {fewest:.0f} {what}: too few to resample)"
    return _interval(low, high) + (f" ({n:.0f} groups)" if unit == "groups" and not math.isnan(low) else "")


def _p(p: float) -> str:
    return "" if math.isnan(p) else f"{p:.3f}"


def display_table(table: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Human-facing columns: 'mean ± std' strings, intervals, p-values, probabilities and the verdict;
    `reference` (tables.reference_values of the same rows): the paper's values beside them."""
    metric = table["metric"].iloc[0] if len(table) else "accuracy"
    short = METRIC_SHORT[metric]
    shown = pd.DataFrame({"training set": table["arm"], "folds": table["n_folds"]})
    for name in METRICS:
        shown[name.replace("_macro", "")] = [_fmt(m, s) for m, s in zip(table[f"{name}_mean"], table[f"{name}_std"])]
    if reference is not None and reference.notna().any(axis=None):
        shown["paper (acc / prec / rec)"] = [
            " / ".join("–" if math.isnan(v) else f"{v:.3f}" for v in row)
            for row in reference[["accuracy", "precision", "recall"]].itertuples(index=False)]
        ours = table["accuracy_mean"]
        shown["Δacc to paper"] = ["" if math.isnan(p) else f"{m - p:+.3f}" for m, p in zip(ours, reference["accuracy"])]
    shown[f"Δ{short} vs real"] = [("" if math.isnan(d) else f"{d:+.3f}") for d in table[f"{metric}_diff_vs_real"]]
    shown["95% CI (corrected t)"] = [_interval(lo, hi) for lo, hi in zip(table["diff_ci_low"], table["diff_ci_high"])]
    shown["p (corrected t)"] = table["corrected_p"].map(_p)
    shown["p (Holm)"] = table["holm_p"].map(_p)
    shown["95% CI (bootstrap)"] = [_bootstrap_cell(*row) for row in zip(
        table["bootstrap_ci_low"], table["bootstrap_ci_high"], table["bootstrap_clusters"],
        table["bootstrap_fewest_per_fold"], table["bootstrap_unit"])]
    shown["TOST p (Holm)"] = table["tost_holm_p"].map(_p)
    shown["verdict"] = table["verdict"].fillna("")
    shown["P(better / equiv. / worse)"] = [
        "" if math.isnan(b) else f"{b:.2f} / {e:.2f} / {w:.2f}"
        for b, e, w in zip(table["p_better"], table["p_equivalent"], table["p_worse"])]
    shown["plain paired t p"] = table["paired_t_p"].map(_p)
    shown["Wilcoxon p"] = table["wilcoxon_p"].map(_p)
    if "cost_total_s" in table.columns:
        shown["cost s (LoRA + sampling + trials)"] = [
            "" if math.isnan(total) else f"{total:.0f} ({lora:.0f} + {sampling:.0f} + {trial:.0f})"
            for total, lora, sampling, trial in zip(table["cost_total_s"], table["cost_lora_s"],
                                                    table["cost_sampling_s"], table["cost_trials_s"])]
    return shown


def sensitivity_text(info: dict | None) -> str:
    """tables.design_sensitivity as a sentence (and a warning when the design is too small to say anything)."""
    if info is None:
        return ""

    def need(effect: float) -> str:
        repeats = info["need"][effect]
        if repeats is None:
            return f"{effect:g}: no number of repeats (the corrected test's floor is {info['floor']:.3f})"
        if repeats <= info["repeats"]:
            return f"{effect:g}: this design ({info['repeats']} repeat{'s' * (info['repeats'] > 1)})"
        return f"{effect:g}: {repeats} repeats in all (this design has {info['repeats']})"

    text = (f"Design sensitivity (corrected t, non-central t, {info['power']:.0%} power, two-sided α = "
            f"{info['alpha']:g}, n_test/n_train = {info['ratio']:.3f}): with {info['j']} distinct folds (the most an arm pairs) and the arms' "
            f"median fold-to-fold sd of the difference, {info['sd']:.3f}, the smallest difference this grid detects "
            f"is **{info['mde']:.3f}**. Repeats of {info['k']}-fold CV needed to detect {need(0.01)}; {need(0.02)}.")
    if info["too_small"]:
        why = (f"{info['j'] - 1} degrees of freedom" if info["j"] - 1 <= 2 else
               f"its detectable difference {info['mde']:.3f} is above the largest observed one, "
               f"{info['largest_diff']:.3f}")
        text = (f"**Warning: this design is too small to say anything** ({why}): read the rows as descriptions, "
                f"not findings. " + text)
    return text


TESTS_NOTE = (
    "Each row is compared with real only, fold by fold, on the tested metric. **Δ** is the mean paired difference "
    "over distinct folds (a repeat that drew an earlier repeat's partition is one fold, not two). **95% CI "
    "(corrected t)** and **p (corrected t)**: the Nadeau-Bengio corrected resampled t-test (the variance of the "
    "fold differences times 1/J + n_test/n_train, J - 1 df), because training folds overlap and the plain t-test "
    "over-rejects. **p (Holm)**: that p adjusted over one family, every distinct comparison this report makes "
    "(each counted once, however many tables show it). **verdict**: better / worse (Holm p < 0.05), equivalent "
    "(TOST Holm p < 0.05), inconclusive, or undefined when the differences have no spread (every fold moved by the "
    "same amount: no variance to test against, so no p-value and no verdict). **TOST p (Holm)**: two one-sided "
    "corrected t-tests against the equivalence margin (report.equivalence_margin), so \"no benefit\" can be a "
    "result; Holm-adjusted over the same family (each TOST holds only its own level). **P(better / equiv. / "
    "worse)**: the Bayesian correlated t-test (Corani & Benavoli 2015), the "
    "posterior mass of the mean difference above +margin, inside ±margin, below -margin, from the same corrected "
    "variance. **95% CI (bootstrap)**: a percentile bootstrap (2,000 resamples) of the same per-fold mean "
    "difference, recomputed from the held-out predictions, resampling images or, when the folds keep groups "
    "apart, whole groups; it ignores how much retraining moves a classifier, so it is narrower. **plain paired "
    "t p** and **Wilcoxon p** are for comparison only (with 5 folds Wilcoxon cannot go below 0.0625). **cost "
    "s**: wall seconds spent on the arm, summed over its folds: the training of every LoRA its trials drew images "
    "from (a LoRA shared by arms counts in each), the sampling of the images they drew, and the trials "
    "themselves; on the devices the config names (CPU where 0). Matched controls: **real only, steps of + r%** "
    "trains on real images for as many steps as the real + r% arm (under concat and split_bn: loss_weighted and "
    "replace take real only's steps, and run no such control); **real + r% classic augmentation** adds as many "
    "classic augmentations of real images.")

REPLICATES_NOTE = (
    "Generator randomness against the folds', per arm (and other axes' values), on the tested metric. Replicates "
    "are crossed with folds (each replicate runs on the same folds), so the replicate x fold table is decomposed "
    "two ways: **generator sd** = sqrt((MS_rep - MS_resid) / folds), **fold sd** = sqrt((MS_fold - MS_resid) / "
    "replicates), **residual sd** = sqrt(MS_resid) (classifier training and the replicate x fold interaction); "
    "**generator share** = the generator's share of one trial's variance within a fold, var_gen / (var_gen + "
    "var_resid), with its exact 95 % interval from the F distribution of MS_rep / MS_resid. **pooled Δ vs real**: "
    "the arm against real only over every replicate, its variance holding the folds' corrected term and var_gen / "
    "replicates (Satterthwaite df), so the claim holds over generator draws, not one pool. Real only draws no "
    "synthetic image: nothing to decompose.")


def replicate_display(table: pd.DataFrame, axes: list[str], metric: str) -> pd.DataFrame:
    """tables.replicate_table for people."""
    def sd(v: float) -> str:
        return "" if math.isnan(v) else f"{math.sqrt(v):.3f}"

    out = pd.DataFrame({a: table[a].map(format_value) for a in axes})
    out["arm"], out["weight"] = table["arm"], table["weight"].map(lambda w: "" if pd.isna(w) else f"{w:g}")
    out["replicates"], out["folds"] = table["replicates"], table["folds"]
    out[METRIC_SHORT[metric]] = table[f"{metric}_mean"].map("{:.3f}".format)
    undefined = table["undefined"].fillna("") != ""
    out["generator sd"] = [("" if u else sd(v)) for u, v in zip(undefined, table["var_generator"])]
    out["fold sd"] = table["var_fold"].map(sd)
    out["residual sd"] = [("" if u else sd(v)) for u, v in zip(undefined, table["var_resid"])]
    out["generator share [95% CI]"] = [
        "undefined (no spread)" if u else f"{s:.0%} [{lo:.0%}, {hi:.0%}]"
        for u, s, lo, hi in zip(undefined, table["share"], table["share_low"], table["share_high"])]
    if "pooled_diff" in table.columns:
        out["pooled Δ vs real [95% CI], p"] = [
            "" if pd.isna(d) else (f"{d:+.3f} (undefined: no spread)" if isinstance(u, str) and u else
                                   f"{d:+.3f} {_interval(lo, hi)}, p = {p:.3f}")
            for d, lo, hi, p, u in zip(table["pooled_diff"], table["pooled_ci_low"], table["pooled_ci_high"],
                                       table["pooled_p"], table["pooled_undefined"])]
    return out


# backbones.backbone_weights: a random initialisation whose BatchNorms are set from the first 32 images by id.
CALIBRATED_NOTE = ("**calibrated: a random initialisation whose BatchNorms saw 32 images, held-out ones among them; "
                   "for offline demos, not results**")


def classifier_line(cc: ClassifyConfig) -> str:
    if cc.backbone == SMALL_CNN:
        trained = "trained from scratch" if cc.weights == "none" else f"from {cc.weights}, all layers trained"
    elif cc.train_backbone:
        trained = f"{cc.weights}, top {cc.train_backbone} blocks trained"
    elif cc.weights == RANDOM_WEIGHTS:
        trained = ("**random initialisation, frozen: the head learned from random features; a test of the "
                   "pipeline, not a result**")
    elif cc.weights == CALIBRATED:
        trained = f"{CALIBRATED_NOTE}, frozen"
    else:
        trained = f"{cc.weights}, frozen"
    return f"{cc.backbone} ({trained}), {cc.input_size} px, {cc.epochs} epochs, lr {cc.lr:g}, mode {cc.mode}"


def header(cfg: ExperimentConfig, manifest: pd.DataFrame, facts: dict) -> list[str]:
    """The report's first lines. `facts`: naive (comparisons.naive_baseline), n_trials, n_planned, n_test
    ((fewest, most) held-out images of a fold), family (the Holm family's size), grouped (folds keep groups)."""
    protocol = {"fold": "generator per fold: each fold's LoRAs saw only that fold's training images",
                "all": "generator on all images (the paper's protocol): LoRAs saw the held-out images too"}
    naive, (low, high), rc = facts["naive"], facts["n_test"], cfg.report
    counts = ", ".join(f"{k} {v}" for k, v in manifest["label"].value_counts().items())
    n_test = f"{low}" if low == high else f"{low}-{high}"
    step = f"{1 / low:.4f}" if low == high else f"{1 / high:.4f}-{1 / low:.4f}"  # 1/16 = 0.0625 is not 0.062
    n_trials, n_planned = facts["n_trials"], facts["n_planned"]
    return [f"# ooc-ray report: {cfg.name}", "",
            f"- data: {len(manifest)} images in {manifest['label'].nunique()} classes ({counts}); "
            f"manifest digest `{keys.data_digest(manifest)[:16]}`; {cfg.folds.k}-fold CV"
            + ("" if cfg.folds.repeats == 1 else f", {cfg.folds.repeats} repeats ({cfg.folds.k * cfg.folds.repeats} folds)")
            + ("; folds keep groups apart (the bootstrap resamples groups)" if facts["grouped"] else ""),
            f"- held-out folds of {n_test} images: one image moves a fold's accuracy by {step} (the resolution "
            "of every per-fold score below)",
            f"- generator protocol: **{cfg.generator.split}** ({protocol[cfg.generator.split]})",
            f"- classifier: {classifier_line(cfg.classify)}",
            f"- naive (majority class) accuracy: {naive['overall']:.3f} overall, "
            f"{naive['per_fold_mean']:.3f} mean over held-out folds",
            f"- tested metric: **{METRIC_NAMES[rc.metric]}** (report.metric); equivalence margin ±{rc.equivalence_margin:g}"
            f"; multiplicity: one Holm family of {facts['family']} comparison{'s' * (facts['family'] != 1)} (every "
            "distinct arm-vs-real-only comparison in this report, each tested once)",
            f"- trials: {n_trials}" + ("" if n_trials == n_planned else
                                       f" **of {n_planned} planned**: the others have not run (or their files were "
                                       "removed); a row over fewer folds than real only is compared on its own folds"),
            f"- computed with: {facts['versions']}"]


def axes_lines(cfg: ExperimentConfig) -> list[str]:
    lines = [f"- axis **{name}**: {', '.join(format_value(v) for v in values)}" for name, values in cfg.axes]
    if cfg.sample.replicates > 1:
        lines.append(f"- generation replicates: {cfg.sample.replicates} independent pools per setting (replicate r "
                     f"samples with sample.seed + {REPLICATE_SEED_STEP} r)")
    return lines


def table_name(prefix: str, weight: float) -> str:
    return prefix + ("no_weight" if pd.isna(weight) else f"w{weight:g}")


def write_tables(tables: dict[float, pd.DataFrame], out: Path, sensitivity: dict, references: dict,
                 prefix: str = "") -> list[str]:
    """Each table as CSV (every number), Markdown and LaTeX (what people read); returns report.md's lines.
    `sensitivity`, `references`: per weight, tables.design_sensitivity and tables.reference_values."""
    lines = []
    for weight, table in tables.items():
        name = table_name(prefix, weight)
        shown = display_table(table, references.get(weight))
        with atomic_path(out / f"table_{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        atomic_write_text(out / f"table_{name}.md", to_markdown(shown) + "\n")
        atomic_write_text(out / f"table_{name}.tex", to_latex(shown))
        title = "Real images only (no synthetic arms in this grid)" if pd.isna(weight) else f"LoRA weight {weight:g}"
        lines += [f"### {title}" if prefix else f"## {title}", "", to_markdown(shown), ""]
        if text := sensitivity_text(sensitivity.get(weight)):
            lines += [text, ""]
    return lines


def quality_section(quality: pd.DataFrame, cfg: ExperimentConfig, heading: str = "##") -> list[str]:
    """tables.summarise_quality's table with what its measures mean."""
    cc = cfg.classify
    if cfg.quality.features == "image_statistics":
        features = (f"weight-free image statistics at {cfg.sample.output_size or cfg.sample.resolution} px (grey "
                    "levels, edges, power spectrum; standardised on the real images)")
    elif cc.weights == RANDOM_WEIGHTS:  # none is refused here (checks.random_features_problem)
        features = (f"{cc.backbone} features **of a random initialisation: a test of the pipeline, not a "
                    "measurement**")
    elif cc.weights == CALIBRATED:
        features = f"{cc.backbone} features ({CALIBRATED_NOTE}, frozen)"
    else:
        features = f"{cc.backbone} features ({cc.weights}, frozen)"
    return [f"{heading} Synthetic quality per class (mean over folds)", "",
            f"All measures on {features}. KID: lower is closer to the real training images of that class; "
            "kid_to_weight0: KID between this pool and the LoRA-weight-0.0 pool (the base without the class LoRA) "
            "of the same class, i.e. how far the LoRA moved the images; lora_effect_p: permutation p-value "
            "(1,000 relabellings) of the MMD between the two, all folds pooled. CAS = recall on real held-out "
            "images of a linear classifier trained on synthetic images only; memorised = share of synthetic images "
            "closer to a real training image than 95 % of real images are to each other. fd: Frechet distance "
            "(FID's formula on these features; biased upwards at small n); precision / recall: share of synthetic "
            "images inside the real images' k-nearest-neighbour balls and of real images inside the synthetic ones' "
            f"(k = {cfg.quality.nn_k}); density / coverage (Naeem et al. 2020): ~1 / high when the sets are alike; "
            "vendi: effective number of distinct synthetic images (vendi_real: of the real ones). An empty cell has "
            "no value in at least one fold (the k-NN measures need more than k images of the class; kid_to_weight0 "
            "and lora_effect_p do not exist at weight 0).", "",
            to_markdown(quality.round(4).astype(object).where(quality.notna(), "")), ""]


EQUIVALENCE_NOTE = (
    "How many real images is a synthetic image worth (ooc_ray.real_equivalence)? Real only's {metric} against "
    "the real training images per fold (one point per classify.real_fraction, linear between them) is the "
    "exchange curve; an arm of n real and m synthetic images that reaches the curve's value at n* is worth "
    "(n* - n) / m real images per synthetic image (negative: the synthetic images cost accuracy), n* the first "
    "size where the folds' curves (over the sizes every fold measured) reach the arm on average. 95 % interval: "
    "every worth x0 at which the folds' differences, each arm's {metric} minus its own fold's curve at n + x0 m, "
    "are not different from 0 by the corrected resampled t-test (as the Δ column; fold effects cancel); an end "
    "that reaches the first or last common size is open. Not estimable beyond the common sizes.")


def equivalence_section(table: pd.DataFrame, others: list[str], metric: str) -> list[str]:
    """real_equivalence.equivalence_table's rows as a table with what they mean."""
    shown = table[[*others, "classify.real_fraction", "arm", "mixing", "n_real", "n_synthetic", "value",
                   "real_only_value", "statement"]].rename(columns={"value": METRIC_SHORT[metric],
                                                                    "real_only_value": "real only"})
    return ["## What a synthetic image is worth in real images", "",
            EQUIVALENCE_NOTE.format(metric=METRIC_NAMES[metric]), "", to_markdown(shown.round(3)), ""]


VALIDITY_NOTE = (
    "Does a quality measure predict usefulness on this data? Spearman's rho, over the pools of this run (variant "
    "x fold x LoRA weight), between the pool's measure (mean over classes) and the change of {metric} its images "
    "gave an arm over real only on that fold, both centred within the fold (its pools share the fold's real-only "
    "trial and LoRAs; correlated across folds, that shared part alone gave 'predicts' in 18-24 % of simulated "
    "reports where nothing predicts): among the pools of one fold, did the better measure give the larger change? "
    "n_eff: pools less folds (a fold with one pool says nothing). `predicts`: the 95 % interval (Fisher's z) "
    "lies on the side of `better`; `misleads`: on the other side; `no evidence`: it holds 0; `not estimable`: "
    "n_eff below 4, no spread, or |rho| = 1 (ooc_ray.measure_validity).")


def validity_section(validity: pd.DataFrame, metric: str) -> list[str]:
    """measure_validity's table (one row per arm and measure) with what it means."""
    return ["## Which quality measure predicted usefulness", "", VALIDITY_NOTE.format(metric=METRIC_NAMES[metric]), "",
            to_markdown(validity.round(3)), ""]


# One file to open anywhere (mail it, attach it to a lab notebook): no script, no external resource.
HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #eee; }} td:first-child, th:first-child {{ text-align: left; }}
/* Wide tables (a dozen statistics per arm) scroll inside their own box, the arm column fixed at the left. */
.table-scroll {{ overflow-x: auto; max-width: 100%; }}
.table-scroll td:first-child {{ position: sticky; left: 0; background: #fff; }}
.table-scroll th:first-child {{ position: sticky; left: 0; background: #eee; }}
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
    body = body.replace("<table>", '<div class="table-scroll"><table>').replace("</table>", "</table></div>")
    return HTML_PAGE.format(title=html.escape(title), body=body)

