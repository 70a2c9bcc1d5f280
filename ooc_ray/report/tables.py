"""The report's numbers: trial rows in, one DataFrame per table out. No file is read or written here, nothing is
formatted for display (ooc_ray.report.render does that).

A table holds, per arm (protocol.Arm), the mean and std over folds of every metric and its comparison with real
only on the tested metric (report.metric), fold by fold (ooc_ray.comparisons): the corrected resampled t (CI, p),
TOST equivalence and the Bayesian correlated t within +-report.equivalence_margin, the plain paired t and
Wilcoxon, and a bootstrap over held-out clusters. Holm's correction runs over one family, every distinct
comparison of the report (a control or real only shared by several tables is one comparison, tested once).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ooc_ray.comparisons import (ALPHA, METRIC_COLUMNS, POWER, bayesian_correlated_t, cluster_bootstrap, corrected_t,
                                 equivalence, holm, minimum_detectable_effect, paired_differences,
                                 pooled_replicates_t, replicate_components, repeats_to_detect, verdict)
from ooc_ray.protocol import Arm, with_arms

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def overlap_ratio(real: pd.DataFrame) -> float:
    """n_test / n_train of the real-only trials, mean over folds: the overlap term of the corrected t-test. The
    real images are what the folds resample; synthetic images added to an arm do not change the overlap."""
    return float((real["n_test"] / real["n_train_real"]).mean())


def _predicted(predictions: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """(fold, id, label_index, pred_index) of `trials`' held-out predictions."""
    return predictions.merge(trials[["trial_key", "fold"]], on="trial_key")[["fold", "id", "label_index",
                                                                              "pred_index"]]


def bootstrap_vs_real(predictions: pd.DataFrame, arm: pd.DataFrame, real: pd.DataFrame, n_classes: int,
                      metric: str = "accuracy", clusters: pd.Series | None = None,
                      signatures: dict | None = None, seed: int = 0) -> dict:
    """comparisons.cluster_bootstrap of the arm against real only over the images both predicted in a fold;
    `clusters` maps image id -> what is resampled (its group with grouped folds; the image itself by default);
    `signatures` merges fold ids that hold out the same images."""
    both = _predicted(predictions, arm).merge(_predicted(predictions, real), on=["fold", "id", "label_index"],
                                              suffixes=("_arm", "_real"))
    folds = both["fold"].map(signatures) if signatures else both["fold"]
    groups = both["id"].map(clusters) if clusters is not None else both["id"]
    return cluster_bootstrap(groups, folds, both["label_index"], both["pred_index_arm"], both["pred_index_real"],
                             n_classes, metric, seed=seed)


NO_REAL_ONLY = "no real-only trials: classify.ratios has no 0.0, so there is nothing to compare with"


def _comparison(group: pd.DataFrame, real: pd.DataFrame, column: str, ratio: float, margin: float,
                signatures: dict | None) -> dict:
    """One arm against real only on trial column `column`."""
    pairs = paired_differences(real.set_index("fold")[column], group.set_index("fold")[column], signatures)
    d = pairs["differences"]
    test, tost, bayes = corrected_t(d, ratio), equivalence(d, ratio, margin), bayesian_correlated_t(d, ratio, margin)
    # No real-only trial at all (classify.ratios without 0.0) is no shortage of folds: say what is missing.
    undefined = NO_REAL_ONLY if real.empty else test["undefined"]
    return {"n_pairs": pairs["n_pairs"], "diff": pairs["mean_diff"], "diff_ci_low": test["ci_low"],
            "diff_ci_high": test["ci_high"], "corrected_p": test["p"], "df": test["df"], "undefined": undefined,
            "tost_p": tost["p"], "p_better": bayes["p_better"], "p_equivalent": bayes["p_equivalent"],
            "p_worse": bayes["p_worse"], "diff_sd": float(np.std(d, ddof=1)) if len(d) > 1 else math.nan,
            "max_abs_diff": float(np.max(np.abs(d))) if len(d) else math.nan,
            "paired_t_p": pairs["t_p"], "wilcoxon_p": pairs["wilcoxon_p"]}


def summary_tables(trials: pd.DataFrame, predictions: pd.DataFrame | None = None, margin: float = 0.02,
                   metric: str = "accuracy", clusters: pd.Series | None = None, signatures: dict | None = None,
                   family: bool = True) -> dict[float, pd.DataFrame]:
    """One table per LoRA weight (highest first): per arm the mean/std over folds of every metric and its
    comparison with real only on `metric` (module doc). Given `predictions` (trial_key, id, pred_index,
    label_index), a bootstrap CI over held-out clusters. Real-only trials and the matched controls have no weight
    (run once per fold) and appear in every table. `family`: Holm and the verdicts over these tables' distinct
    comparisons (run_report passes False and applies one family to the whole report)."""
    column = METRIC_COLUMNS[metric]
    trials = with_arms(trials)
    is_real = np.array([arm.is_real for arm in trials["arm_"]])
    real, shared = trials[is_real], trials[[not arm.has_weight for arm in trials["arm_"]]]
    ratio = overlap_ratio(real) if len(real) else math.nan
    n_classes = len(trials["classes"].iloc[0]) if "classes" in trials.columns else 0
    weights = sorted(trials["weight"].dropna().unique(), reverse=True)
    tables = {}
    for weight in weights or [math.nan]:
        rows = pd.concat([shared, trials[trials["weight"] == weight]], ignore_index=True)
        out = []
        for arm, group in sorted(rows.groupby("arm_", sort=False), key=lambda item: item[0].order):
            rec = {"arm": arm.label, "arm_id": arm.id, "ratio": arm.ratio, "synthetic_only": arm.synthetic_only,
                   "control": arm.control, "weight": weight, "n_folds": len(group), "metric": metric,
                   "comparison": "|".join(sorted(group["trial_key"])) if "trial_key" in group.columns else arm.id}
            for name in METRICS:
                rec[f"{name}_mean"] = group[name].mean()
                rec[f"{name}_std"] = group[name].std(ddof=1) if len(group) > 1 else math.nan
            if not arm.is_real:
                found = _comparison(group, real, column, ratio, margin, signatures)
                rec.update({f"{metric}_diff_vs_real" if k == "diff" else k: v for k, v in found.items()})
                if predictions is not None and n_classes:
                    boot = bootstrap_vs_real(predictions, group, real, n_classes, metric, clusters, signatures)
                    rec["bootstrap_ci_low"], rec["bootstrap_ci_high"] = boot["ci_low"], boot["ci_high"]
                    rec["bootstrap_clusters"] = boot["n_clusters"]
                    rec["bootstrap_fewest_per_fold"] = boot["fewest_per_fold"]
                    rec["bootstrap_unit"] = "images" if clusters is None else "groups"
            out.append(rec)
        table = pd.DataFrame(out).reindex(columns=table_columns(metric))
        table["weight"] = table["weight"].astype(float)
        tables[weight] = table
    if family:
        apply_family(list(tables.values()), margin)
    return tables


def table_columns(metric: str) -> list[str]:
    """Every numeric column of a table, in order."""
    return (["arm", "arm_id", "ratio", "synthetic_only", "control", "weight", "n_folds", "n_pairs", "metric"]
            + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
            + [f"{metric}_diff_vs_real", "diff_ci_low", "diff_ci_high", "df", "corrected_p", "holm_p", "undefined",
               "tost_p", "tost_holm_p", "p_better", "p_equivalent", "p_worse", "diff_sd", "max_abs_diff",
               "paired_t_p", "wilcoxon_p", "bootstrap_ci_low", "bootstrap_ci_high", "bootstrap_clusters",
               "bootstrap_fewest_per_fold", "bootstrap_unit", "verdict", "comparison"])


def apply_family(tables: list[pd.DataFrame], margin: float) -> int:
    """Holm over every distinct comparison of `tables` (the report's one multiplicity family: each comparison
    counted once, however many tables show it), then each row's verdict; in place. Returns the family's size."""
    joined = pd.concat([t[["comparison", "corrected_p", "tost_p"]] for t in tables], ignore_index=True)
    distinct = joined.dropna(subset=["corrected_p"]).drop_duplicates("comparison")
    adjusted = dict(zip(distinct["comparison"], holm(distinct["corrected_p"])))
    # Equivalence too: each TOST holds its own level, not a family's (8 arms on the margin: a false
    # "equivalent" somewhere in 32 % of reports, simulated), so its p is Holm-adjusted over the same family.
    tost_adjusted = dict(zip(distinct["comparison"], holm(distinct["tost_p"])))
    for table in tables:
        table["holm_p"] = table["comparison"].map(adjusted).astype(float)
        table["tost_holm_p"] = table["comparison"].map(tost_adjusted).astype(float)
        diffs = table.filter(like="_diff_vs_real").iloc[:, 0]
        table["verdict"] = [verdict(d, h, t, margin, u) for d, h, t, u in
                            zip(diffs, table["holm_p"], table["tost_holm_p"], table["undefined"].fillna(""))]
    return len(distinct)


def design_sensitivity(table: pd.DataFrame, k: int, repeats: int, ratio: float) -> dict | None:
    """What the design can detect, from the arms' median fold-to-fold sd of the difference: the corrected t's
    minimum detectable effect at 80 % power (non-central t, with the measured n_test/n_train) over the most
    distinct folds any arm pairs (a complete grid's: repeats may repeat a held-out fold, which the tests count
    once, so not k x repeats; an unfinished grid's median arm had fewer and stated a wider effect), the repeats of k-fold CV in all that 0.01 and 0.02 would need (None: no number of repeats), and whether the
    design is too small to say anything (df <= 2, or an MDE above every observed difference). None without a
    spread."""
    arms = table[table["diff_sd"].notna() & (table["diff_sd"] > 0)]
    if arms.empty or not math.isfinite(ratio):
        return None
    sd, j = float(arms["diff_sd"].median()), int(arms["n_pairs"].max())
    mde = minimum_detectable_effect(sd, j, ratio)
    largest = float(arms["max_abs_diff"].max())
    return {"sd": sd, "j": j, "k": k, "repeats": repeats, "ratio": ratio, "mde": mde,
            "floor": minimum_detectable_effect(sd, 10 ** 6, ratio), "largest_diff": largest,
            "need": {effect: repeats_to_detect(effect, sd, k, ratio) for effect in (0.01, 0.02)},
            "too_small": j - 1 <= 2 or mde > largest, "power": POWER, "alpha": ALPHA}


def reference_values(table: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """The published values (report.reference) of each row's arm: columns accuracy, precision, recall, f1 where
    the reference gives them (NaN elsewhere), matched by (ratio, synthetic only, LoRA weight)."""
    columns = ["accuracy", "precision", "recall", "f1"]
    if reference is None:
        return pd.DataFrame(index=table.index, columns=columns, dtype=float)
    published = {Arm.of(r.ratio, r.synthetic_only, "", r.weight).id: r for r in reference.itertuples(index=False)}
    rows = [published.get(arm_id) for arm_id in table["arm_id"]]
    return pd.DataFrame([{c: float(getattr(r, c, math.nan)) if r is not None else math.nan for c in columns}
                         for r in rows], index=table.index, columns=columns)


def costs(trials: pd.DataFrame, planned: list, synthetic: pd.DataFrame | None,
          lora_seconds: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """arm id -> (LoRA, sampling, trial) seconds: training every LoRA its trials drew from (`lora_seconds`, from
    each LoRA's metadata; not for images drawn at weight 0, which are the base's), sampling the images they
    drew (`render_s`; NaN for pools from before it was recorded), its trials' `duration_s`; a LoRA or image shared
    by two arms counts in each."""
    train_of = {t.key: t.train for t in planned}
    images = synthetic.set_index("id") if synthetic is not None and len(synthetic) else None
    has_seconds = images is not None and "render_s" in images.columns
    out = {}
    for arm, group in with_arms(trials).groupby("arm_", sort=False):
        drawn = [train_of[k] for k in group["trial_key"] if k in train_of]
        drawn = pd.concat(drawn, ignore_index=True) if drawn else pd.DataFrame(columns=["id", "source"])
        ids = drawn.loc[drawn["source"] == "synthetic", "id"].unique()
        lora = sampling = 0.0
        if len(ids):
            if images is None:
                lora = sampling = math.nan
            else:
                drawn_images = images.loc[ids]
                with_lora = drawn_images.loc[drawn_images["weight"] != 0, "lora_key"].unique()
                lora = sum(lora_seconds.get(key, math.nan) for key in with_lora)
                sampling = float(images.loc[ids, "render_s"].sum(min_count=len(ids))) if has_seconds else math.nan
        trial_s = float(group["duration_s"].sum()) if "duration_s" in group.columns else math.nan
        out[arm.id] = (lora, sampling, trial_s)
    return out


def add_costs(tables: dict[float, pd.DataFrame], trials: pd.DataFrame, planned: list,
              synthetic: pd.DataFrame | None, lora_seconds: dict[str, float]) -> None:
    """cost_lora_s, cost_sampling_s, cost_trials_s, cost_total_s per arm (costs()), in place."""
    per_arm = costs(trials, planned, synthetic, lora_seconds)
    for table in tables.values():
        found = [per_arm.get(arm_id, (math.nan,) * 3) for arm_id in table["arm_id"]]
        table["cost_lora_s"], table["cost_sampling_s"], table["cost_trials_s"] = (list(x) for x in zip(*found))
        table["cost_total_s"] = table["cost_lora_s"] + table["cost_sampling_s"] + table["cost_trials_s"]


def replicate_table(trials: pd.DataFrame, axes: list[str], metric: str = "accuracy",
                    signatures: dict | None = None) -> pd.DataFrame:
    """Generator randomness against the folds', per arm (and other axes' values): the replicate x fold table of
    the tested metric decomposed two ways (comparisons.replicate_components), and the arm against the real-only
    trials of its own axes' values pooled over the replicates (comparisons.pooled_replicates_t). `trials`: every
    variant's, with its axes' values as columns (a trial shared by variants is listed once per variant)."""
    column = METRIC_COLUMNS[metric]
    trials = with_arms(trials)
    is_real = np.array([a.is_real for a in trials["arm_"]])
    rows = []
    for point, group in trials.groupby([*axes, "arm_"], sort=False):
        values = dict(zip([*axes, "arm_"], point if isinstance(point, tuple) else (point,)))
        arm = values["arm_"]
        # Real only at this point of the other axes (a real_fraction axis: 0.30 at 25 %, 0.86 at 100 % in a
        # review's case; pooled over both, each arm's difference came out with the wrong sign).
        here = is_real & np.logical_and.reduce([trials[a].to_numpy() == values[a] for a in axes], initial=True)
        real = trials[here].drop_duplicates("trial_key")
        ratio = overlap_ratio(real) if len(real) else math.nan
        real_by_fold = real.groupby(real["fold"].map(signatures) if signatures else real["fold"])[column].mean()
        folds = group["fold"].map(signatures) if signatures else group["fold"]
        table = group.assign(fold_=folds).pivot_table(index="replicate", columns="fold_", values=column,
                                                      aggfunc="mean").sort_index()
        parts = replicate_components(table.to_numpy())
        row = {**{a: values[a] for a in axes}, "arm": arm.label, "arm_id": arm.id, "weight": arm.weight,
               "replicates": len(table), "folds": table.shape[1], f"{metric}_mean": float(table.to_numpy().mean()),
               **{k: parts[k] for k in ("var_generator", "var_fold", "var_resid", "share", "share_low",
                                        "share_high", "undefined")}}
        if not arm.is_real:
            pooled = pooled_replicates_t(table.to_numpy() - real_by_fold.reindex(table.columns).to_numpy(), ratio)
            row.update(pooled_diff=pooled["mean"], pooled_ci_low=pooled["ci_low"], pooled_ci_high=pooled["ci_high"],
                       pooled_df=pooled["df"], pooled_p=pooled["p"], pooled_undefined=pooled["undefined"])
        rows.append(row)
    return pd.DataFrame(rows)


def summarise_quality(quality: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds per (weight, class): the quality table the report shows. NaN where a fold has no value
    (k-NN measures of a class with at most quality.nn_k images there): a mean over the other folds is not the
    mean over folds the table says it is (the demo's 'bad' precision 1.0 was fold 0's alone)."""
    cols = ["kid", "kid_to_weight0", "lora_effect_p", "cas_recall", "cas_accuracy", "nn_distance_median",
            "memorised_fraction", "real_confidence_median", "fd", "precision", "recall", "density", "coverage",
            "vendi", "vendi_real"]
    cols = [c for c in cols if c in quality.columns]  # quality tables from before a measure existed lack it
    return quality.groupby(["weight", "label"], sort=False)[cols].agg(lambda v: v.mean(skipna=False)).reset_index()


def resolution(trials: pd.DataFrame) -> tuple[int, int]:
    """(fewest, most) held-out images of a fold: one image moves that fold's accuracy by 1 / n_test."""
    return int(trials["n_test"].min()), int(trials["n_test"].max())
