"""Where each stage reads and writes, under results/<experiment>/. One place, so stages never guess."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ooc_ray.config import ExperimentConfig


REPORT_INDEX = ".ooc-ray-report.json"  # in a report's folder: what the last report wrote there, and its settings


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path
    # A variant of the grid's axes (config.Variant.tag): its own synthetic and quality tables under
    # variants/<tag>/; LoRAs, pools, features and trials stay shared, as their keys are their content.
    variant: str = ""
    report_dir: Path | None = None  # `ooc-ray report --out DIR`: the report of results one cannot write to

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> "ExperimentPaths":
        return cls(cfg.out_dir.resolve())  # absolute: Ray Tune trials chdir into their own folders

    def for_variant(self, tag: str) -> "ExperimentPaths":
        return replace(self, variant=tag)

    @property
    def tables(self) -> Path:
        """Where this variant's tables live: the root without axes (as before axes existed)."""
        return self.root / "variants" / self.variant if self.variant else self.root

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def run_record(self, started: str, command: str) -> Path:
        """runs/<UTC start>-<command>.yaml: what one command was asked (argv, overrides) and the config it resolved,
        kept for every command, failed ones included; config.yaml holds only the last that succeeded."""
        return self.root / "runs" / f"{started}-{command}.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".ooc-ray.lock"

    @property
    def demo_data(self) -> Path:
        return self.root / "demo_data"

    @property
    def pretrain_data(self) -> Path:
        return self.root / "pretrain_data"  # the demo's unlabeled images (generator.pretrain.source: demo)

    @property
    def pretrain_images(self) -> Path:
        return self.root / "pretrain_images.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def folds(self) -> Path:
        return self.root / "folds.parquet"

    @property
    def image_signatures(self) -> Path:
        return self.root / "image_signatures.npz"  # the data stage's near-copy signatures, by sha256 (a cache)

    @property
    def pretrain_signatures(self) -> Path:
        return self.root / "pretrain_signatures.npz"  # the same of the unlabeled pretraining images

    @property
    def models(self) -> Path:
        return self.root / "models"  # built bases (tiny SD) and classifier weights

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def lora_table(self) -> Path:
        return self.tables / "loras.parquet" if self.variant else self.lora / "loras.parquet"  # this config's LoRAs

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def synthetic_table(self) -> Path:
        return self.tables / "synthetic.parquet"  # the current config's pools; each pool keeps its own pool.parquet

    @property
    def augmented(self) -> Path:
        return self.root / "augmented"  # classic augmentations of real images (classify.controls: real_augmented)

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, key: str) -> Path:
        return self.trials / f"{key}.parquet"

    @property
    def history(self) -> Path:
        # Beside trials/, not inside: pd.read_parquet("trials/") recurses into sub-folders and would mix schemas.
        return self.root / "history"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def trial_history(self, key: str) -> Path:
        return self.history / f"{key}.parquet"

    def trial_predictions(self, key: str) -> Path:
        return self.predictions / f"{key}.parquet"

    @property
    def superseded(self) -> Path:
        # Trials of an earlier config or data, moved out of trials/ so a glob of trials/ is never stale; kept
        # (and moved back) for when that config and data come back.
        return self.root / "superseded"

    @property
    def synthetic_scores(self) -> Path:
        return self.tables / "synthetic_scores.parquet"

    @property
    def quality(self) -> Path:
        return self.tables / "quality.parquet"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def report(self) -> Path:
        return self.report_dir or self.root / "report"

    @property
    def report_index(self) -> Path:
        """What the last report wrote into its folder: {"files": [names], "settings": keys.settings_digest}."""
        return self.report / REPORT_INDEX

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"
