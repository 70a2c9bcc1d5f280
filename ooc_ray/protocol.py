"""The experiment's protocol as pure functions of the tables (DESIGN.md "Exact semantics"): which LoRAs exist,
how large each synthetic pool must be, which trials the grid holds and what each trains and tests on.
The sample and classify stages (and the search) share this arithmetic, so pools always hold what trials draw.

ratio r: the real training fold plus round(r x n_train) synthetic images, split over classes in the training
fold's class proportions (largest-remainder rounding, so the per-class counts sum exactly), drawn without
replacement from that fold's pool of that LoRA weight. "synthetic only": n_train synthetic images in the same
proportions and no real ones. The held-out fold is always real images only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.classic import augmented_identity, augmented_path
from ooc_ray.config import ClassifyConfig, ExperimentConfig, GeneratorConfig, Variant, variants
from ooc_ray.data import class_names
from ooc_ray.errors import ConfigError, DataError, MissingInputError, TrainsetError
from ooc_ray.folds import ALL_FOLDS, fold_ids, held_out_rows, train_rows
from ooc_ray.io import parquet_problem
from ooc_ray.paths import ExperimentPaths

TRAINSET_COLUMNS = ["id", "path", "sha256", "label", "label_index", "source"]


def round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(0.25 * 658) = 164); the paper's "x% more" reads as half-up.
    # The 1e-9 absorbs float error such as 0.1 * 30 = 3.0000000000000004 -> 3, 0.15 * 10 = 1.4999999999999998.
    return int(math.floor(x + 0.5 + 1e-9))


def largest_remainder(total: int, counts) -> np.ndarray:
    """Split `total` over classes proportionally to integer `counts`; the parts sum exactly to `total`.

    Each class gets floor(total * c / n); the leftover units go to the largest remainders (ties: lower
    class index). Integer arithmetic, so no float rounding can move a unit."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total < 0 or n <= 0:
        raise ValueError(f"largest_remainder: need total >= 0 and positive counts, got {total}, {counts.tolist()}")
    base = (total * counts) // n
    remainder = (total * counts) % n
    short = int(total - base.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder first, then class index
    base[order[:short]] += 1
    return base


# ---------------------------------------------------------------------------------------------- LoRAs


@dataclass(frozen=True)
class LoraJob:
    """One LoRA to train: its fold (ALL_FOLDS for split "all"), class, group, prompt and images. A LoRA of the whole
    data set (generator.scope: dataset) has no class (label ""), its prompt is the template, and each image is
    captioned with its own class's prompt (image_labels)."""

    key: str
    fold: int
    label: str
    group: str  # "" unless generator.per_group
    prompt: str
    image_ids: tuple[str, ...]
    image_paths: tuple[str, ...]
    image_sha256: tuple[str, ...]
    image_labels: tuple[str, ...] = ()  # generator.scope dataset only

    def labels(self) -> list[str]:
        """The classes this LoRA draws: its own, or every class it was trained on."""
        return sorted(set(self.image_labels)) if self.image_labels else [self.label]

    def captions(self) -> list[str]:
        """Each training image's caption."""
        if not self.image_labels:
            return [self.prompt] * len(self.image_ids)
        return [self.prompt.format(label=label, group="") for label in self.image_labels]


def safe_name(text: str) -> str:
    # Adapter names become torch ModuleDict keys (no dots) and folder names: keep [A-Za-z0-9_-].
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def lora_prompt(gcfg: GeneratorConfig, label: str, group: str) -> str:
    return (gcfg.group_prompt if gcfg.per_group else gcfg.prompt).format(label=label, group=group)


def generator_folds(manifest: pd.DataFrame, gcfg: GeneratorConfig) -> list[int]:
    return [ALL_FOLDS] if gcfg.split == "all" else fold_ids(manifest)


def plan_loras(cfg: ExperimentConfig, manifest: pd.DataFrame, base_id: str,
               folds: list[int] | None = None) -> list[LoraJob]:
    """Every LoRA the config asks for (of `folds`, default all the generator protocol has), with its images
    and its content key; raises DataError for a class with no training images."""
    gcfg = cfg.generator
    if gcfg.per_group and (manifest["group"] == "").any():
        raise ConfigError("generator.per_group: the manifest has no group column (set data.group_column)")
    jobs = []
    for fold in generator_folds(manifest, gcfg) if folds is None else folds:
        train = train_rows(manifest, fold)
        tag = "all" if fold == ALL_FOLDS else f"fold{fold}"
        for label in class_names(manifest):
            rows = train[train["label"] == label]
            if rows.empty:
                where = "the data set" if fold == ALL_FOLDS else f"fold {fold}'s training images"
                raise DataError(f"class {label!r} has no images in {where}: cannot train its LoRA")
        if gcfg.scope == "dataset":
            key = f"{tag}_dataset_{keys.lora_key(cfg, base_id, gcfg.prompt, train, labelled=True)}"
            jobs.append(LoraJob(key, fold, "", "", gcfg.prompt, tuple(train["id"]), tuple(train["path"]),
                                tuple(train["sha256"]), tuple(train["label"])))
            continue
        for label in class_names(manifest):
            rows = train[train["label"] == label]
            for group in sorted(rows["group"].unique()) if gcfg.per_group else [""]:
                sub = rows[rows["group"] == group] if gcfg.per_group else rows
                prompt = lora_prompt(gcfg, label, group)
                name = "_".join([tag, safe_name(label)] + ([safe_name(group)] if gcfg.per_group else []))
                key = f"{name}_{keys.lora_key(cfg, base_id, prompt, sub)}"
                jobs.append(LoraJob(key, fold, label, group, prompt, tuple(sub["id"]), tuple(sub["path"]),
                                    tuple(sub["sha256"])))
    return jobs


# ---------------------------------------------------------------------------------------------- grid


CONTROL_LABELS = {"real_steps": "real only, steps of + {}%", "real_augmented": "real + {}% classic augmentation"}


@dataclass(frozen=True)
class Arm:
    """One row of a report table: what a training set holds beside the real images of its fold. Real only and
    the matched controls (classify.controls) have no LoRA weight (None): they run once per fold and appear in
    every weight's table. The one owner of an arm's names: its label (tables), its name (trial rows' `arm`),
    its id (name and weight), its key fragment (trial keys) and its order in a table."""

    ratio: float
    synthetic_only: bool = False
    control: str = ""  # "" or a classify.controls name: real_steps, real_augmented
    weight: float | None = None

    @classmethod
    def of(cls, ratio, synthetic_only, control, weight) -> "Arm":
        """An arm from trial-row values (a missing weight is NaN there; trials from before controls: None)."""
        missing = weight is None or (isinstance(weight, float) and math.isnan(weight)) or pd.isna(weight)
        return cls(float(ratio), bool(synthetic_only), control if isinstance(control, str) else "",
                   None if missing else float(weight))

    @classmethod
    def of_rows(cls, trials: pd.DataFrame) -> list["Arm"]:
        """The arm of every row of a trial table."""
        control = trials["control"] if "control" in trials.columns else [""] * len(trials)
        return [cls.of(*row) for row in zip(trials["ratio"], trials["synthetic_only"], control, trials["weight"])]

    @property
    def is_real(self) -> bool:
        return self.ratio == 0 and not self.synthetic_only and not self.control

    @property
    def has_weight(self) -> bool:
        return self.weight is not None

    @property
    def needs_synthetic(self) -> bool:
        return not self.control and (self.synthetic_only or self.ratio > 0)

    @property
    def mixes(self) -> bool:
        """Real and synthetic images in one training set: the only arms classify.mixing acts on."""
        return not self.control and not self.synthetic_only and self.ratio > 0

    @property
    def name(self) -> str:
        """Without the weight: "real", "real+50%", "synthetic_only", "real_steps+100%"."""
        if self.control:
            return f"{self.control}+{self.ratio * 100:g}%"
        if self.synthetic_only:
            return "synthetic_only"
        return "real" if self.ratio == 0 else f"real+{self.ratio * 100:g}%"

    @property
    def id(self) -> str:
        """The name and, for arms with synthetic images, the LoRA weight: "real+50%@w0.8"."""
        return self.name + (f"@w{self.weight:g}" if self.has_weight else "")

    @property
    def label(self) -> str:
        """As a table shows it: "real only", "real + 50% synthetic", "synthetic only", a control's label."""
        if self.control:
            return CONTROL_LABELS[self.control].format(f"{self.ratio * 100:g}")
        if self.synthetic_only:
            return "synthetic only"
        return "real only" if self.ratio == 0 else f"real + {self.ratio * 100:g}% synthetic"

    @property
    def label_with_weight(self) -> str:
        return self.label + (f", w={self.weight:g}" if self.has_weight else "")

    @property
    def order(self) -> tuple:
        """Real only, then by ratio each synthetic arm followed by its matched controls, synthetic only last."""
        control = sorted(CONTROL_LABELS).index(self.control) + 1 if self.control else 0
        return (math.inf if self.synthetic_only else self.ratio, control)

    @property
    def key_fragment(self) -> str:
        """What a trial key's readable prefix says of its arm (r0.5, synthetic, real_steps1): keys of every
        earlier run depend on it, so it never changes."""
        fragment = self.control or ("synthetic" if self.synthetic_only else "r")
        return fragment + ("" if self.synthetic_only else f"{self.ratio:g}")


@dataclass(frozen=True)
class TrialSpec:
    """One point of the classifier grid: a fold and an arm. weight is None for real only (it does not depend on
    the LoRA) and for the matched controls (classify.controls), which add no synthetic image."""

    fold: int
    ratio: float
    weight: float | None
    synthetic_only: bool
    control: str = ""  # "" or a classify.controls name: real_steps, real_augmented

    @property
    def as_arm(self) -> Arm:
        return Arm(self.ratio, self.synthetic_only, self.control, self.weight)

    @property
    def arm(self) -> str:
        return self.as_arm.name

    @property
    def needs_synthetic(self) -> bool:
        return self.as_arm.needs_synthetic

    @property
    def mixes(self) -> bool:
        return self.as_arm.mixes

    def point(self) -> dict:
        point = {"fold": self.fold, "ratio": self.ratio, "weight": self.weight, "synthetic_only": self.synthetic_only}
        return {**point, "control": self.control} if self.control else point  # keys of earlier grids unchanged


def trial_config(cfg: ExperimentConfig, spec: TrialSpec) -> ExperimentConfig:
    """The config a trial computes with: classify.mixing acts only on trials that mix real and synthetic images,
    so real-only, synthetic-only and control trials run (and are keyed) as concat, and every mixing strategy
    shares them."""
    if spec.mixes or cfg.classify.mixing == "concat":
        return cfg
    return dataclasses.replace(cfg, classify=dataclasses.replace(cfg.classify, mixing="concat"))


@dataclass(frozen=True, eq=False)
class PlannedTrial:
    """A grid point with its exact training and held-out sets, and the key derived from them."""

    spec: TrialSpec
    key: str
    train: pd.DataFrame = field(repr=False)
    test: pd.DataFrame = field(repr=False)


def grid_points(cfg: ExperimentConfig, folds: list[int]) -> list[TrialSpec]:
    """Per fold: real only once (no LoRA weight), then each ratio > 0 and synthetic only for each LoRA weight.
    The paper's grid: 5 x (1 + 2 x 5 + 2) = 65 trials."""
    cc = cfg.classify
    specs = []
    for fold in folds:
        if any(r == 0 for r in cc.ratios):
            specs.append(TrialSpec(fold, 0.0, None, False))
        for weight in cfg.sample.weights:
            specs += [TrialSpec(fold, float(r), float(weight), False) for r in cc.ratios if r > 0]
            if cc.synthetic_only:
                specs.append(TrialSpec(fold, 1.0, float(weight), True))  # n_train synthetic images, no real
        specs += [TrialSpec(fold, float(r), None, False, control) for control in cc.controls for r in cc.ratios if r > 0]
    return specs


def max_ratio(cfg: ExperimentConfig) -> float:
    """Largest synthetic share the grid asks for (synthetic only needs 1x n_train)."""
    return max(max(cfg.classify.ratios, default=0.0), 1.0 if cfg.classify.synthetic_only else 0.0)


def synthetic_count(spec: TrialSpec, n_train: int) -> int:
    return n_train if spec.synthetic_only else round_half_up(spec.ratio * n_train)


# ---------------------------------------------------------------------------------------------- training sets


class PoolIndex:
    """Row positions of a synthetic table per (fold, LoRA weight), found on first use, so that a grid does not
    scan the whole table once per trial: the table and the trials both grow with the LoRA weights, and the scans
    made plan_trials quadratic (200 weights, 6,005 trials over 660,600 rows: 40 s of scans, 5 s with the index;
    benchmarks/bench_scale.py)."""

    def __init__(self, synthetic: pd.DataFrame):
        self.synthetic = synthetic
        self._by_fold: dict | None = None

    def _build(self) -> dict:
        by = [self.synthetic["fold"].to_numpy(), self.synthetic["weight"].astype(float).to_numpy()]
        groups = self.synthetic.groupby(by, sort=False).indices  # positions per (fold, weight); NaN dropped
        by_fold: dict = {}
        for (fold, weight), positions in groups.items():
            by_fold.setdefault(fold, ([], []))
            by_fold[fold][0].append(weight)
            by_fold[fold][1].append(positions)
        return {fold: (np.array(ws, dtype=float), parts) for fold, (ws, parts) in by_fold.items()}

    def rows(self, fold: int, weight: float) -> pd.DataFrame:
        """synthetic[(fold == `fold`) & isclose(weight, `weight`)]: the same rows, order and index."""
        if self._by_fold is None:
            self._by_fold = self._build()
        weights, parts = self._by_fold.get(fold, (np.zeros(0), []))
        hits = [parts[i] for i in np.flatnonzero(np.isclose(weights, float(weight)))]
        positions = np.sort(np.concatenate(hits)) if hits else np.zeros(0, dtype=np.int64)
        return self.synthetic.iloc[positions]


def synthetic_pool(synthetic: pd.DataFrame, fold: int, weight: float, classes: list[str], split: str,
                   index: PoolIndex | None = None) -> pd.DataFrame:
    """Rows of the synthetic table that fold `fold`'s trials may draw from at `weight`, with label_index.

    split "fold": the pool of fold `fold`'s LoRAs (they never saw the held-out images); "all": the one pool of
    the LoRAs trained on every image (fold ALL_FOLDS, the paper's protocol). `index`: a PoolIndex of
    `synthetic`, kept across calls (plan_trials)."""
    missing = [c for c in ("id", "path", "sha256", "label", "fold", "weight") if c not in synthetic.columns]
    if missing:
        raise TrainsetError(f"synthetic table lacks column(s) {missing}; found {list(synthetic.columns)}")
    wanted = ALL_FOLDS if split == "all" else fold
    index = index if index is not None and index.synthetic is synthetic else PoolIndex(synthetic)
    rows = index.rows(wanted, weight)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise TrainsetError(f"synthetic table: label(s) {unknown} are not classes of the manifest {classes}")
    class_index = {c: i for i, c in enumerate(classes)}
    return rows.assign(label_index=rows["label"].map(class_index).astype(int))


def _draw(pool: pd.DataFrame, label_index: int, take: int, spec: TrialSpec, label: str, seed: int) -> pd.DataFrame:
    candidates = pool[pool["label_index"] == label_index].sort_values("id", kind="stable")
    if len(candidates) < take:
        raise TrainsetError(
            f"fold {spec.fold}, class '{label}', LoRA weight {spec.weight:g}: need {take} synthetic images, "
            f"the pool has {len(candidates)} (sample more images per class, or lower classify.ratios)")
    # One fixed permutation per (seed, fold, class), cut at `take`: the images of ratio 0.1 are a subset of
    # those of 0.25, and so on, so arms differ only by the added images (less noise in paired comparisons).
    order = np.random.default_rng([seed, spec.fold, label_index]).permutation(len(candidates))
    return candidates.iloc[order[:take]]


CONTROL_STREAM = 7  # seeds the controls' draws apart from the synthetic draws of the same (seed, fold, class)
AUGMENTED_MARK = "~aug"  # id of copy c of real image i: f"{i}~aug{c}"


def augmented_source(image_id: str) -> tuple[str, int]:
    """(the real image's id, the copy number) of a real_augmented row's id."""
    source, copy = image_id.rsplit(AUGMENTED_MARK, 1)
    return source, int(copy)


def control_rows(real: pd.DataFrame, spec: TrialSpec, n_extra: int, n_classes: int, seed: int,
                 augmented_dir: Path | None) -> pd.DataFrame:
    """The `n_extra` rows a control adds to the real training set, split over classes as synthetic images
    would be. Per class, real images in one seeded order, cycled: copy c of an image is its (c + 1)-th use.
    real_steps: the real rows again (more steps on the same images); real_augmented: classic augmentations
    (ooc_ray.classic), each with its identity as its digest, under `augmented_dir`."""
    if spec.control == "real_augmented" and augmented_dir is None:
        raise TrainsetError(f"fold {spec.fold}: the real_augmented control needs a folder for its images")
    per_class = largest_remainder(n_extra, np.bincount(real["label_index"], minlength=n_classes))
    parts = []
    for c, take in enumerate(per_class):
        candidates = real[real["label_index"] == c]  # sorted by id (train_rows)
        if not take:
            continue
        order = np.random.default_rng([seed, spec.fold, c, CONTROL_STREAM]).permutation(len(candidates))
        uses = np.arange(int(take))
        rows = candidates.iloc[order[uses % len(candidates)]]
        if spec.control == "real_steps":
            parts.append(rows.assign(source="real")[TRAINSET_COLUMNS])
            continue
        copies = uses // len(candidates)
        identity = [augmented_identity(sha, copy) for sha, copy in zip(rows["sha256"], copies)]
        parts.append(rows.assign(id=[f"{i}{AUGMENTED_MARK}{c}" for i, c in zip(rows["id"], copies)], sha256=identity,
                                 path=[augmented_path(augmented_dir, i) for i in identity],
                                 source="augmented")[TRAINSET_COLUMNS])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TRAINSET_COLUMNS)


def build_testset(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The held-out fold: real images only, sorted by id (stable predictions file order)."""
    test = held_out_rows(manifest, fold)
    if test.empty:
        raise TrainsetError(f"fold {fold}: no held-out images (folds present: {fold_ids(manifest)})")
    return test.assign(source="real")[TRAINSET_COLUMNS].reset_index(drop=True)


def build_trainset(manifest: pd.DataFrame, synthetic: pd.DataFrame | None, spec: TrialSpec, *, seed: int = 0,
                   split: str = "fold", classes: list[str] | None = None, pools: PoolIndex | None = None,
                   augmented_dir: Path | None = None) -> pd.DataFrame:
    """Training rows (TRAINSET_COLUMNS, source "real", "synthetic" or "augmented") of one trial. Deterministic for
    equal inputs; the row order of the inputs does not matter (pools are sorted by id). `pools`: a PoolIndex of
    `synthetic`, for a loop over trials (as plan_trials): without it each call indexes the whole table.
    `augmented_dir`: where the real_augmented control's images live."""
    classes = classes if classes is not None else class_names(manifest)
    real = train_rows(manifest, spec.fold)
    if real.empty:
        raise TrainsetError(f"fold {spec.fold}: no training images")
    if spec.ratio < 0:
        raise TrainsetError(f"fold {spec.fold}: ratio {spec.ratio} < 0")
    n_synth = synthetic_count(spec, len(real))
    parts = [] if spec.synthetic_only else [real.assign(source="real")[TRAINSET_COLUMNS]]
    if spec.control:
        parts.append(control_rows(real, spec, n_synth, len(classes), seed, augmented_dir))
    elif n_synth > 0:
        if spec.weight is None or math.isnan(spec.weight):
            raise TrainsetError(f"fold {spec.fold}, ratio {spec.ratio:g}: synthetic images need a LoRA weight")
        if synthetic is None or synthetic.empty:
            raise TrainsetError(f"fold {spec.fold}, ratio {spec.ratio:g}, weight {spec.weight:g}: "
                                "the synthetic table is empty")
        pool = synthetic_pool(synthetic, spec.fold, spec.weight, classes, split, index=pools)
        per_class = largest_remainder(n_synth, np.bincount(real["label_index"], minlength=len(classes)))
        for c, take in enumerate(per_class):
            if take:
                drawn = _draw(pool, c, int(take), spec, classes[c], seed)
                parts.append(drawn.assign(source="synthetic")[TRAINSET_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    out["label_index"] = out["label_index"].astype(int)
    return out


def plan_trials(cfg: ExperimentConfig, manifest: pd.DataFrame, synthetic: pd.DataFrame | None,
                weights_id: str, augmented_dir: Path | None = None) -> list[PlannedTrial]:
    """Every trial of the grid with its sets and key. Building every training set here (pandas only) also
    makes a pool that is too small fail before any trial starts, naming the fold, class and weight.
    `augmented_dir`: where the real_augmented control's images are (ExperimentPaths.augmented)."""
    classes = class_names(manifest)
    pools = PoolIndex(synthetic) if synthetic is not None else None  # indexes on first use only
    planned = []
    for spec in grid_points(cfg, fold_ids(manifest)):
        train = build_trainset(manifest, synthetic if spec.needs_synthetic else None, spec,
                               seed=cfg.classify.seed, split=cfg.generator.split, classes=classes, pools=pools,
                               augmented_dir=augmented_dir)
        test = build_testset(manifest, spec.fold)
        wtag = "w-" if spec.weight is None else f"w{spec.weight:g}"
        tcfg = trial_config(cfg, spec)
        digest = keys.trial_key(tcfg, spec.point(), classes, train, test, weights_id)
        key = f"fold{spec.fold}-{spec.as_arm.key_fragment}-{wtag}-{digest}"
        planned.append(PlannedTrial(spec, key, train, test))
    return planned


# ---------------------------------------------------------------------------------------------- pools


def _most_drawn(manifest: pd.DataFrame, cfg: ExperimentConfig, fold: int, classes: list[str]) -> np.ndarray:
    """Per class, the most synthetic images any trial of fold `fold` draws (build_trainset's arithmetic)."""
    counts = np.bincount(train_rows(manifest, fold)["label_index"], minlength=len(classes))
    points = grid_points(cfg, [fold])
    totals = [synthetic_count(s, int(counts.sum())) for s in points if s.needs_synthetic]
    draws = [largest_remainder(t, counts) for t in totals]
    return np.max(draws, axis=0) if draws else np.zeros(len(classes), dtype=np.int64)


def pool_sizes(manifest: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Images to sample per (fold, label[, group]) and LoRA weight. Columns fold, label, [group,] n_train, n_pool.

    Per class: the largest draw of any trial of the fold. Per group (generator.per_group): ceil(max ratio x the
    group's training count), so the groups of a class together cover its draw up to rounding (README: limits).
    For split "all" (fold ALL_FOLDS) the largest need over the folds, so the one shared pool serves every fold."""
    classes = class_names(manifest)
    by = ["label", "group"] if cfg.generator.per_group else ["label"]
    r = max_ratio(cfg)
    tables = []
    for fold in fold_ids(manifest):
        table = train_rows(manifest, fold).groupby(by).size().rename("n_train").reset_index().assign(fold=fold)
        if cfg.generator.per_group:
            # round() first: 0.1 * 30 is 3.0000000000000004 in floating point and must not become 4.
            table["n_pool"] = [math.ceil(round(r * n, 9)) for n in table["n_train"]]
        else:
            most = dict(zip(classes, _most_drawn(manifest, cfg, fold, classes)))
            table["n_pool"] = [int(most[label]) for label in table["label"]]
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    if cfg.generator.split == "all":
        table = table.groupby(by, as_index=False)[["n_train", "n_pool"]].max().assign(fold=ALL_FOLDS)
    return table[["fold", *by, "n_train", "n_pool"]].sort_values(["fold", *by], ignore_index=True)


def usable_synthetic(synthetic: pd.DataFrame, scores: pd.DataFrame | None, min_confidence: float) -> pd.DataFrame:
    """The synthetic table less the images the quality filter drops (real-classifier confidence below
    quality.filter_min_confidence); applied here, not read from a stored flag, so a new threshold needs no
    quality re-run."""
    if min_confidence <= 0:
        return synthetic
    if scores is None:
        raise TrainsetError("quality.filter_min_confidence is set but there are no synthetic scores: "
                            "run the quality stage first")
    keep = set(scores.loc[scores["real_confidence"] >= min_confidence, "id"])
    return synthetic[synthetic["id"].isin(keep)].reset_index(drop=True)


def draw_table(cfg: ExperimentConfig, paths: ExperimentPaths) -> pd.DataFrame | None:
    """The synthetic images the grid's trials may draw from (synthetic.parquet less what the quality filter
    drops), or None when the grid has no synthetic arm."""
    if not any(spec.needs_synthetic for spec in grid_points(cfg, [0])):
        return None
    problem = parquet_problem(paths.synthetic_table)
    if problem:
        raise MissingInputError(f"{paths.synthetic_table}: {problem}; run the sample stage first")
    synthetic = pd.read_parquet(paths.synthetic_table)
    if cfg.quality.filter_min_confidence <= 0:
        return synthetic
    if parquet_problem(paths.synthetic_scores):
        raise MissingInputError(f"quality.filter_min_confidence is set but {paths.synthetic_scores} is missing: "
                                "run the quality stage first")
    return usable_synthetic(synthetic, pd.read_parquet(paths.synthetic_scores), cfg.quality.filter_min_confidence)


def plan_grid(cfg: ExperimentConfig, paths: ExperimentPaths, manifest: pd.DataFrame,
              weights_id: Callable[[ClassifyConfig], str]) -> list[tuple[Variant, list[PlannedTrial]]]:
    """Every variant of the config's axes (config.variants) with its planned trials, each drawing from that
    variant's synthetic table. A trial two variants share (real only across sampling settings) has one key and
    appears in both lists. `weights_id`: the identity of the classifier weights a classify section uses."""
    out = []
    for variant in variants(cfg):
        table = draw_table(variant.cfg, paths.for_variant(variant.tag))
        out.append((variant, plan_trials(variant.cfg, manifest, table, weights_id(variant.cfg.classify),
                                         paths.augmented)))
    return out
