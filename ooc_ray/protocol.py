"""The experiment's protocol as pure functions of the tables (docs/configuration.md: Exact semantics): which LoRAs exist, which
arms and trials the grid holds, and how large each synthetic pool must be. The sample and classify stages (and the
search) share this arithmetic, so pools always hold what trials draw; ooc_ray.trainsets builds each trial's sets.

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

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.config import SAME_STEPS_AS_REAL, ClassifyConfig, ExperimentConfig, GeneratorConfig
from ooc_ray.data import class_names
from ooc_ray.errors import ConfigError, DataError
from ooc_ray.folds import ALL_FOLDS, fold_ids, round_half_up, train_rows

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


def label_name(label: str) -> str:
    """A class label as a folder and id part: safe_name, and where that changed the label, a digest of the label
    too ("CD4+" and "CD4-" would both be "CD4": one data-set LoRA's two classes drawn into one folder)."""
    name = safe_name(label)
    return name if name == label else f"{name}-{keys.digest(label, length=6)}"


def weight_name(weight: float) -> str:
    """A LoRA weight as a folder and id part: its short form where that is exact (1, 0.8), else every digit
    (0.7000001 and 0.7000004 are both "0.7" in short form: a search's two points drawn into one folder)."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


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
        train = train_rows(manifest, fold, cfg.classify.real_fraction)
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


def with_arms(trials: pd.DataFrame) -> pd.DataFrame:
    """Trial rows with their Arm (column `arm_`) and `mixing` (trials from before that column: concat)."""
    mixing = trials["mixing"].fillna("concat") if "mixing" in trials.columns else "concat"
    return trials.assign(arm_=Arm.of_rows(trials), mixing=mixing)


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
        specs += [TrialSpec(fold, float(r), None, False, control) for control in controls_of(cc) for r in cc.ratios
                  if r > 0]
    return specs


def controls_of(cc: ClassifyConfig) -> tuple[str, ...]:
    """The matched controls a classify section runs: classify.controls, less real_steps under a strategy whose
    arm takes real only's steps (its table would show a control of concat's steps beside it)."""
    return tuple(c for c in cc.controls if not (c == "real_steps" and cc.mixing in SAME_STEPS_AS_REAL))


def max_ratio(cfg: ExperimentConfig) -> float:
    """Largest synthetic share the grid asks for (synthetic only needs 1x n_train)."""
    return max(max(cfg.classify.ratios, default=0.0), 1.0 if cfg.classify.synthetic_only else 0.0)


def synthetic_count(spec: TrialSpec, n_train: int) -> int:
    return n_train if spec.synthetic_only else round_half_up(spec.ratio * n_train)


def check_ratios(manifest: pd.DataFrame, cfg: ExperimentConfig) -> None:
    """Refuse ratios this data cannot tell apart: one that draws no synthetic image on a fold (its arm would be
    real only under another name, in the Holm family) or two that draw the same number (one training set in two
    rows). Named at the first fold where each happens."""
    found: dict[tuple, str] = {}
    ratios = sorted(r for r in cfg.classify.ratios if r > 0)
    for fold in fold_ids(manifest):
        n_train = len(train_rows(manifest, fold, cfg.classify.real_fraction))
        drawn: dict[int, list[float]] = {}
        for r in ratios:
            drawn.setdefault(round_half_up(r * n_train), []).append(r)
        for count, same in drawn.items():
            if count == 0:
                found.setdefault(tuple(same), f"classify.ratios: {same} of fold {fold}'s {n_train} real training "
                                 "images draw no synthetic image (an arm that is real only under another name)")
            elif len(same) > 1:
                found.setdefault(tuple(same), f"classify.ratios: {same} each draw {count} synthetic images on fold "
                                 f"{fold} ({n_train} real training images): one training set in {len(same)} rows")
    if found:
        raise ConfigError("; ".join(found.values()) + "; drop or change them for this data set")


# ---------------------------------------------------------------------------------------------- pools


def _most_drawn(manifest: pd.DataFrame, cfg: ExperimentConfig, fold: int, classes: list[str]) -> np.ndarray:
    """Per class, the most synthetic images any trial of fold `fold` draws (build_trainset's arithmetic)."""
    counts = np.bincount(train_rows(manifest, fold, cfg.classify.real_fraction)["label_index"],
                         minlength=len(classes))
    points = grid_points(cfg, [fold])
    totals = [synthetic_count(s, int(counts.sum())) for s in points if s.needs_synthetic]
    draws = [largest_remainder(t, counts) for t in totals]
    return np.max(draws, axis=0) if draws else np.zeros(len(classes), dtype=np.int64)


def pool_sizes(manifest: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Images to sample per (fold, label[, group]) and LoRA weight. Columns fold, label, [group,] n_train, n_pool.

    Per class: the largest draw of any trial of the fold. Per group (generator.per_group): ceil(max ratio x the
    group's training count), so the groups of a class together cover its draw up to rounding (docs/limits.md).
    For split "all" (fold ALL_FOLDS) the largest need over the folds, so the one shared pool serves every fold."""
    check_ratios(manifest, cfg)
    classes = class_names(manifest)
    by = ["label", "group"] if cfg.generator.per_group else ["label"]
    r = max_ratio(cfg)
    tables = []
    for fold in fold_ids(manifest):
        train = train_rows(manifest, fold, cfg.classify.real_fraction)
        table = train.groupby(by).size().rename("n_train").reset_index().assign(fold=fold)
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
