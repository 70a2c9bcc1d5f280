"""Report stage: Table I/II-style tables, plots and real-vs-synthetic grids from the trial Parquet files.

Orchestration only: which trials this config planned and which have finished (read-only: builds nothing), one
table set per variant of the axes, one multiplicity family for the whole report, then the files. The numbers are
ooc_ray.report.tables, their rendering ooc_ray.report.render, the statistics ooc_ray.comparisons.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from ooc_ray import keys
from ooc_ray.backbones import backbone_weights
from ooc_ray.comparisons import naive_baseline
from ooc_ray.config import ExperimentConfig
from ooc_ray.fields import format_value
from ooc_ray.data import load_manifest
from ooc_ray.diffusion.lora_files import read_metadata
from ooc_ray.errors import DataError, MissingInputError
from ooc_ray.folds import held_out_signatures, uses_groups
from ooc_ray.io import atomic_path, atomic_write_text, parquet_problem
from ooc_ray.lock import claim
from ooc_ray.logs import note, warn
from ooc_ray.measure_validity import measure_validity, usefulness_pairs
from ooc_ray.real_equivalence import FRACTION, equivalence_table, size_curves
from ooc_ray.paths import REPORT_INDEX, ExperimentPaths
from ooc_ray.protocol import PlannedTrial, safe_name, with_arms
from ooc_ray.trainsets import plan_grid
from ooc_ray.trial_files import summary_problem
from ooc_ray.variants import Variant
from ooc_ray.report import plots, render
from ooc_ray.report.tables import (add_costs, apply_family, design_sensitivity, overlap_ratio, reference_values,
                                   replicate_table, resolution, summarise_quality, summary_tables)

# What run_report writes into report/ besides report.md/html (which it always rewrites): a file of these
# patterns that a run did not write again is another config's (a LoRA weight or axis value since removed).
REPORT_OUTPUTS = ("table_*.csv", "table_*.md", "table_*.tex", "*accuracy_vs_ratio.png", "*confusion_matrices.png",
                  "*real_vs_synthetic.png", "axis_*.png", "replicates.md", "measure_validity.csv",
                  "real_equivalence.csv", "real_size.png")


INDEX = REPORT_INDEX  # the files the last report wrote into its folder, and its settings (paths.report_index)
PUBLISHING = ".ooc-ray-report.claim"  # held while a report moves its files in


def publish(staging: Path, out: Path, own_folder: bool, settings: str) -> list[Path]:
    """Move every file of a report written whole into `staging` to `out` (a failure before this left `out` as it
    was), then delete the files an earlier report wrote there that this one did not, so a glob of report/ never
    mixes this config's tables with an earlier config's. An earlier report's files are the ones its index names,
    and in results/<name>/report (`own_folder`) also every REPORT_OUTPUTS match: a folder given with --out may
    hold the user's own files. By name, not by time: on shared storage the file server's clock is not this
    node's. The index also records `settings` (keys.settings_digest of the config). Returns the files deleted."""
    written = sorted(f.name for f in staging.iterdir())
    with claim(out / PUBLISHING, wait=True):  # report takes no run lock: two reports publish one after the other
        earlier = _indexed(out) | ({f.name for pattern in REPORT_OUTPUTS for f in out.glob(pattern)} if own_folder
                                   else set())
        for name in written:
            os.replace(staging / name, out / name)
        atomic_write_text(out / INDEX, json.dumps({"files": written, "settings": settings}, indent=1))
        stale = sorted(out / name for name in earlier - set(written) if (out / name).is_file())
        for f in stale:
            f.unlink()
    if stale:
        note(f"report: removed {len(stale)} file(s) of an earlier config from {out}, e.g. {stale[0].name}")
    return stale


def _indexed(out: Path) -> set[str]:
    """The file names the index in `out` lists (plain names only: it never points outside the folder)."""
    try:
        names = json.loads((out / INDEX).read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        note(f"report: {out / INDEX} is unreadable ({exc}); no earlier report file is removed")
        return set()
    if isinstance(names, dict):  # {"files": [...], "settings": ...}; a plain list before settings were kept
        names = names.get("files")
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in (".", "..")} \
        if isinstance(names, list) else set()


def finished_trials(paths: ExperimentPaths, planned: list[PlannedTrial], manifest: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of the `planned` trials that have finished (trials/ keeps every config's trials: a changed
    setting or changed data adds files, never overwrites); empty when none has. A trial whose summary is damaged
    or not its own (trial_files) is an error naming every one: a table never silently drops or misreads it.
    Read-only: builds nothing."""
    problems = {t.key: summary_problem(paths, t.key) for t in planned}
    damaged = [p for p in problems.values() if p and p != "missing"]
    if damaged:
        raise DataError(f"{len(damaged)} trial summaries damaged or not their trial's: {'; '.join(damaged[:3])}"
                        f"{' ...' if len(damaged) > 3 else ''}; `ooc-ray classify` runs them again")
    files = [paths.trial(key) for key, problem in problems.items() if not problem]
    if not files:
        return pd.DataFrame()
    trials = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    digests, now = sorted(set(trials["data_digest"])), keys.data_digest(manifest)
    if digests != [now]:  # cannot happen through the keys; refuse rather than mix
        raise DataError(f"{paths.trials}: trials of data {', '.join(d[:12] for d in digests)} would share one table "
                        f"with the manifest's ({now[:12]}); run `ooc-ray run`, which re-makes what the data feeds")
    return trials


def _stack(recorded: pd.Series, unit: str) -> tuple[str, str]:
    """(what the items' library strings say, the mixture or ''): one string, or each with its count in bold when
    they differ. Items from before versions were recorded ("") are left out here and counted by the caller."""
    counts = recorded[recorded != ""].value_counts()
    if len(counts) <= 1:
        return (counts.index[0] if len(counts) else ""), ""
    mixed = "; ".join(f"{name}: {n} {unit}" for name, n in counts.items())
    return f"**different libraries**: {mixed}", mixed


def _versions_of(frame: pd.DataFrame | None, column: str = "versions") -> pd.Series:
    """frame[column] with "" for what was made before versions were recorded (no column, or None in it)."""
    if frame is None or column not in frame.columns:
        return pd.Series("", index=getattr(frame, "index", None), dtype=object)
    return frame[column].fillna("").astype(str)


def _classifier_libraries(trials: pd.DataFrame) -> tuple[str, list[str]]:
    """(the trials' libraries, per framework, with how many are from before versions were recorded; mixtures)."""
    recorded = _versions_of(trials)
    backends = trials["backend"] if "backend" in trials.columns else pd.Series(index=trials.index, dtype=object)
    parts, mixed = [], []
    for _, seen in recorded[recorded != ""].groupby(backends.fillna("tensorflow"), sort=True):
        text, mixture = _stack(seen, "trials")
        parts.append(text)
        mixed += [f"trials of one framework: {mixture}"] if mixture else []
    if not parts:
        return "not recorded (every trial is from before versions were)", mixed
    unrecorded = int((recorded == "").sum())
    return " | ".join(parts) + (f" ({unrecorded} trials from before versions were recorded)" if unrecorded
                                else " (every trial)"), mixed


def _generator_libraries(made: dict[str, pd.Series]) -> tuple[str, list[str]]:
    """(the libraries of the LoRAs and of the images, one text when they agree; mixtures within each)."""
    texts, mixed, whole = {}, [], True
    for unit, values in made.items():
        stack, mixture = _stack(values, unit)
        unrecorded = int((values == "").sum())
        whole = whole and bool(stack) and not unrecorded and not mixture
        texts[unit] = (stack + (f" ({unrecorded} {unit} from before versions were recorded)" if unrecorded else "")
                       if stack else "not recorded")
        mixed += [f"{unit}: {mixture}"] if mixture else []
    if whole and len(set(texts.values())) == 1:
        return f"{texts.popitem()[1]} (every {' and '.join(unit.removesuffix('s') for unit in made)})", mixed
    return ", ".join(f"{unit} {text}" for unit, text in texts.items()), mixed


def versions_line(trials: pd.DataFrame, loras: pd.Series | None = None, images: pd.Series | None = None) -> str:
    """The libraries the report's numbers come from, one line for the header: the trials' (their rows'
    `versions`), per framework (a classify.backend axis runs two stacks by design), then the generator's, of its
    LoRAs (their metadata) and synthetic images (pool rows). No key holds versions (an upgrade would re-run
    everything), so a run resumed after an upgrade re-uses the old beside the new: different versions within
    trials of one framework, within the LoRAs or within the images are said in bold, with a warning. What was
    made before versions were recorded is counted, not taken for another version."""
    line, mixed = _classifier_libraries(trials)
    made = {unit: values.fillna("").astype(str) for unit, values in (("LoRAs", loras), ("images", images))
            if values is not None and len(values)}
    if made:  # not real only
        generator, mixtures = _generator_libraries(made)
        line, mixed = f"{line}; generator: {generator}", mixed + mixtures
    if mixed:
        warn(f"report: made with different libraries ({' | '.join(mixed)}); delete the trials/ files, LoRA folders "
             "or pool folders of one set (their `versions` say which) and run `ooc-ray run`")
    return line


def generator_made(done: list[tuple], made_loras: list[pd.DataFrame]) -> tuple[pd.Series | None, pd.Series | None]:
    """The libraries each LoRA and each synthetic image of the report's variants was made with (versions_line),
    each once (variants share LoRAs and pools); None where the report has none (real only)."""
    def once(found: list[pd.Series]) -> pd.Series | None:
        joined = pd.concat(found) if found else None
        return None if joined is None else joined[~joined.index.duplicated()]

    return (once([records["versions"] for records in made_loras if len(records)]),
            once([_versions_of(synthetic).set_axis(synthetic["id"]) for *_, synthetic in done
                  if synthetic is not None and len(synthetic)]))


def planned_grid(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame
                 ) -> list[tuple[Variant, list[PlannedTrial]]]:
    """Every variant with its planned trials, as the classify stage plans them (weights resolved, not built)."""
    return plan_grid(cfg, paths, manifest,
                     lambda cc: backbone_weights(cc, paths.models, manifest).identity)


def trial_predictions(paths: ExperimentPaths, trials: pd.DataFrame) -> pd.DataFrame | None:
    """The per-image predictions of `trials` (for the bootstrap), or None where any trial's file is missing
    (trials from before predictions were stored): then the report says so rather than resample a subset."""
    files = [paths.trial_predictions(key) for key in trials["trial_key"]]
    if any(parquet_problem(f) for f in files):
        note("report: some trials have no predictions file: no bootstrap intervals")
        return None
    columns = ["trial_key", "id", "pred_index", "label_index"]
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


def lora_records(lora_root: Path, lora_keys) -> pd.DataFrame:
    """Each LoRA's training seconds and libraries, from its metadata (NaN and "" where it has none), by key."""
    metas = {key: read_metadata(Path(lora_root) / key) or {} for key in lora_keys}
    return pd.DataFrame({"seconds": [float(m.get("seconds", math.nan)) for m in metas.values()],
                         "versions": [m.get("versions") or "" for m in metas.values()]}, index=list(metas))


REFERENCE_COLUMNS = ("weight", "ratio", "synthetic_only")


def read_reference(path: str) -> pd.DataFrame | None:
    """report.reference: published values per arm, a CSV with columns weight (empty for real only), ratio,
    synthetic_only and any of accuracy, precision, recall, f1; lines starting with # are comments."""
    if not path:
        return None
    try:
        table = pd.read_csv(path, comment="#")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"report.reference {path}: cannot read it ({exc})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"report.reference {path}: missing column(s) {missing}; found {list(table.columns)}")
    return table.assign(synthetic_only=table["synthetic_only"].astype(str).str.lower().isin(["true", "1", "yes"]))


def real_size_section(everything: pd.DataFrame, others: list[str], metric: str, out: Path) -> list[str]:
    """With an axis over classify.real_fraction: accuracy against real-set size (real_size.png) and what a synthetic
    image is worth in real ones (real_equivalence.csv), one curve per value of every other axis."""
    tables, curves = [], []
    for point, trials in everything.groupby(others, sort=False) if others else [((), everything)]:
        point = dict(zip(others, point if isinstance(point, tuple) else (point,)))
        tables.append(equivalence_table(trials, metric).assign(**point))
        curves.append(size_curves(trials, metric).assign(curve=", ".join(f"{k} = {format_value(v)}"
                                                                         for k, v in point.items())))
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(out / "real_equivalence.csv") as tmp:
        table.to_csv(tmp, index=False)
    plots.plot_real_size(pd.concat(curves, ignore_index=True), metric, out / "real_size.png")
    return render.equivalence_section(table, others, metric) + ["![accuracy against real-set size](real_size.png)", ""]


def run_report(cfg: ExperimentConfig, paths: ExperimentPaths) -> Path:
    """report/: tables, plots and image grids of this config's finished trials, one set per variant of its axes,
    a plot per axis and, with generation replicates, what the generator's randomness contributes."""
    manifest = load_manifest(paths)
    grid = planned_grid(cfg, paths, manifest)
    rc = cfg.report
    signatures = held_out_signatures(manifest)
    grouped = uses_groups(manifest, cfg.folds)
    clusters = manifest.set_index("id")["group"] if grouped else None
    reference = read_reference(rc.reference)
    n_planned = len({t.key for _, planned in grid for t in planned})
    done = []  # (variant, its paths, trials, tables, synthetic table)
    made_loras = []  # lora_records of every variant's LoRAs: the generator's libraries
    for variant, planned in grid:
        vpaths = paths.for_variant(variant.tag)
        trials = finished_trials(paths, planned, manifest)
        if trials.empty:
            done.append((variant, vpaths, trials, {}, None))
            continue
        tables = summary_tables(trials, trial_predictions(paths, trials), rc.equivalence_margin, rc.metric,
                                clusters, signatures, family=False)
        synthetic = None if parquet_problem(vpaths.synthetic_table) else pd.read_parquet(vpaths.synthetic_table)
        loras = synthetic["lora_key"].unique() if synthetic is not None and len(synthetic) else []
        made_loras.append(lora_records(paths.lora, loras))
        add_costs(tables, trials, planned, synthetic, made_loras[-1]["seconds"].to_dict())
        done.append((variant, vpaths, trials, tables, synthetic))
    if not any(tables for _, _, _, tables, _ in done):
        raise MissingInputError(f"{paths.trials}: no trials of this config on this data; run `ooc-ray classify` first")
    family = apply_family([t for _, _, _, tables, _ in done for t in tables.values()], rc.equivalence_margin)
    everything = pd.concat([trials.assign(**dict(variant.point)) for variant, _, trials, _, _ in done
                            if not trials.empty], ignore_index=True)
    paths.report.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=paths.report) as staging:
        out = Path(staging)  # every file of the report is written here, then published whole
        naive = naive_baseline(manifest)
        body, combined = [], []
        pairs = []  # (pool's quality measures, its arms' accuracy changes) of every variant: measure validity
        for variant, vpaths, trials, tables, synthetic in done:
            heading = "##" if not variant.point else "###"
            if variant.point:
                body += [f"## {variant.label}", ""]
            if not tables:
                body += ["No trial of this variant has finished yet.", ""]
                continue
            prefix = f"{variant.tag}__" if variant.tag else ""
            # The variant's own n_test / n_train (a real_fraction axis: 0.52 at 100 %, 1.33 pooled with 25 %).
            real = trials[[arm.is_real for arm in with_arms(trials)["arm_"]]]
            ratio = overlap_ratio(real) if len(real) else math.nan
            sensitivity = {w: design_sensitivity(t, cfg.folds.k, cfg.folds.repeats, ratio)
                           for w, t in tables.items()}
            references = {w: reference_values(t, reference) for w, t in tables.items()}
            body += render.write_tables(tables, out, sensitivity, references, prefix)
            plots.plot_metric_vs_ratio(tables, naive["overall"], out / f"{prefix}accuracy_vs_ratio.png")
            plots.plot_confusions(trials, out / f"{prefix}confusion_matrices.png")
            body += [f"![accuracy vs ratio]({prefix}accuracy_vs_ratio.png)", "",
                     f"![confusion]({prefix}confusion_matrices.png)", ""]
            if synthetic is not None and len(synthetic):
                plots.image_grid(manifest, synthetic, out / f"{prefix}real_vs_synthetic.png")
                body += [f"![real vs synthetic]({prefix}real_vs_synthetic.png)", "", plots.GRID_CAPTION, ""]
            if not parquet_problem(vpaths.quality):
                quality = pd.read_parquet(vpaths.quality)
                body += render.quality_section(summarise_quality(quality), variant.cfg, heading)
                pairs.append(usefulness_pairs(trials, quality, rc.metric).assign(variant=variant.tag))
            point = {name: format_value(value) for name, value in variant.point}
            combined += [table.assign(variant=variant.tag, **point) for table in tables.values()]
        with atomic_path(out / "summary.csv") as tmp:
            pd.concat(combined, ignore_index=True).to_csv(tmp, index=False)
        extra = []
        for name, values in cfg.axes:
            file = f"axis_{safe_name(name)}.png"
            plots.plot_axis(everything, name, values, out / file)
            extra += [f"![accuracy against {name}]({file})", ""]
        if FRACTION in dict(cfg.axes):
            others = [name for name, _ in cfg.axes if name != FRACTION] + (
                ["replicate"] if cfg.sample.replicates > 1 else [])
            extra += real_size_section(everything, others, rc.metric, out)
        if pairs:
            validity = measure_validity(pd.concat(pairs, ignore_index=True))
            with atomic_path(out / "measure_validity.csv") as tmp:
                validity.to_csv(tmp, index=False)
            extra += render.validity_section(validity, rc.metric)
        if cfg.sample.replicates > 1:
            axes = [name for name, _ in cfg.axes]
            table = render.replicate_display(replicate_table(everything, axes, rc.metric, signatures), axes,
                                             rc.metric)
            atomic_write_text(out / "replicates.md", render.to_markdown(table) + "\n")
            extra += ["## Generator randomness (generation replicates)", "", render.REPLICATES_NOTE, "",
                      render.to_markdown(table), ""]
        facts = {"naive": naive, "n_trials": everything["trial_key"].nunique(), "n_planned": n_planned,
                 "n_test": resolution(everything), "family": family, "grouped": grouped,
                 "versions": versions_line(everything.drop_duplicates("trial_key"), *generator_made(done, made_loras))}
        if facts["n_trials"] < n_planned:
            warn(f"report: {n_planned - facts['n_trials']} of {n_planned} planned trials have not run; the tables "
                 "leave them out (`ooc-ray classify` runs them)")
        lines = (render.header(cfg, manifest, facts) + render.axes_lines(cfg) + ["", render.TESTS_NOTE, ""]
                 + (extra if cfg.axes else []) + body + ([] if cfg.axes else extra))
        text = "\n".join(lines)
        atomic_write_text(out / "report.html", render.html_report(text, out, f"ooc-ray report: {cfg.name}"))
        atomic_write_text(out / "report.md", text)
        publish(out, paths.report, own_folder=paths.report_dir is None, settings=keys.settings_digest(cfg))
    report = paths.report / "report.md"
    note(f"report: {report} (and report.html beside it: one file, images embedded)")
    return report

