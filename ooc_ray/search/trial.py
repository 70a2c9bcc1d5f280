"""One LoRA-search trial: a point's LoRAs trained on each of its folds' training images, a small pool sampled from
them and scored against each fold's real held-out images, at checkpoints of the LoRA training.

A trial is the pipeline in miniature, composed from the stages' public functions (protocol.plan_loras,
finetune.LoraTraining, sample's planning and rendering, quality's features and measures). At each checkpoint
(every search.report_every epochs, and at the end) it saves the LoRAs as they stand: a LoRA trained e epochs is
exactly the LoRA of generator.epochs = e (finetune.LoraTraining), so it is keyed, stored and re-used like any
other. Every checkpoint's row (the objective's mean over the folds, its standard error, each fold's value) is
written to search/trials/<key>.parquet; the last one is marked complete. Objectives:
  cas       accuracy on real held-out images of a linear classifier trained on the synthetic images only (max)
  kid       mean per-class KID between synthetic and real training images (min)
  accuracy  held-out accuracy of a linear classifier on real subset + synthetic images (max)
  fd, precision, recall, density, coverage, vendi   quality's distribution measures, mean over classes
            (ooc_ray.distributions; fd min, the others max): the report's measure validity says which of them
            predicted the accuracy change on a run's data
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ooc_ray import keys
from ooc_ray.backbones import BackboneWeights
from ooc_ray.config import ExperimentConfig, SearchConfig
from ooc_ray.data import class_names, load_manifest
from ooc_ray.diffusion.base import BaseModel, task_threads
from ooc_ray.diffusion.lora_files import trained_table
from ooc_ray.fields import with_value
from ooc_ray.finetune import LoraTraining, base_pipeline, pending_jobs
from ooc_ray.folds import held_out_rows, train_rows
from ooc_ray.io import atomic_dir, parquet_problem, write_parquet
from ooc_ray.lock import claim
from ooc_ray.measure_validity import MEASURE_DIRECTION
from ooc_ray.measures import class_quality, linear_probe
from ooc_ray.paths import ExperimentPaths
from ooc_ray.protocol import LoraJob, plan_loras
from ooc_ray.quality import features_identity, quality_features
from ooc_ray.sample import consolidate, plan_images, render, start_images
from ooc_ray.search.space import point_config

DISTRIBUTION_OBJECTIVES = ("fd", "precision", "recall", "density", "coverage", "vendi")
OBJECTIVE_MODE = {"cas": "max", "kid": "min", "accuracy": "max",
                  **{name: "max" if MEASURE_DIRECTION[name] > 0 else "min" for name in DISTRIBUTION_OBJECTIVES}}


def better_sign(objective: str) -> float:
    """+1 where a higher objective is better (cas, accuracy), -1 where lower is (kid, fd): gains read > 0 as
    better."""
    return 1.0 if OBJECTIVE_MODE[objective] == "max" else -1.0


REPORTED = ("search_key", "score", "score_se", *OBJECTIVE_MODE, "epochs_trained", "complete")


@dataclass(frozen=True)
class FoldPart:
    """One fold of a trial: the LoRA training subset (at most images_per_class per class of the fold's training
    images) and the fold's real held-out images."""

    fold: int
    subset: pd.DataFrame
    test: pd.DataFrame

    @property
    def manifest(self) -> pd.DataFrame:
        return pd.concat([self.subset, self.test], ignore_index=True)


def fold_part(manifest: pd.DataFrame, fold: int, s: SearchConfig, fraction: float = 1.0) -> FoldPart:
    """The LoRA training subset of `fold` (search.images_per_class of each class of its training images, or of
    their classify.real_fraction) and its held-out images."""
    train = train_rows(manifest, fold, fraction)
    subset = pd.concat([rows.sample(min(len(rows), s.images_per_class), random_state=s.seed)
                        for _, rows in train.groupby("label")])
    return FoldPart(fold, subset.sort_values("id"), held_out_rows(manifest, fold))


def checkpoints(epochs: int, every: int) -> list[int]:
    """The epochs a trial reports at: every `every`, and its last (only the last with every = 0)."""
    return sorted({*range(every, epochs, every), epochs}) if every else [epochs]


def score(subset: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame, features: dict, classes: list[str],
          cfg: ExperimentConfig) -> dict:
    """Every objective on one fold: quality's CAS, KID and distribution measures (means over the classes that
    have a value), and a real + synthetic probe's accuracy."""
    table, _ = class_quality(subset, test, synthetic, features, classes, cfg.quality)
    index = {c: i for i, c in enumerate(classes)}
    both = pd.concat([subset, synthetic], ignore_index=True)
    probe = linear_probe(np.stack([features[d] for d in both["sha256"]]), both["label"].map(index).to_numpy(),
                         len(classes))
    predicted = probe(np.stack([features[d] for d in test["sha256"]])).argmax(1)
    accuracy = float((predicted == test["label"].map(index).to_numpy()).mean())
    measured = {name: float(table[name].mean()) for name in ("kid", *DISTRIBUTION_OBJECTIVES)}  # skips NaN classes
    return {"cas": float(table["cas_accuracy"].iloc[0]), "accuracy": accuracy, **measured}


class _Trainings:
    """The trial's LoRAs in training, one per final LoRA, created when a checkpoint first needs it."""

    def __init__(self, cfg: ExperimentConfig, base: BaseModel, lora_root: Path):
        self.cfg, self.base, self.root, self.open = cfg, base, lora_root, {}

    def save(self, final: LoraJob, job: LoraJob, ccfg: ExperimentConfig, wait: bool) -> bool:
        """Have `job` (the checkpoint's plan of `final`) on disk, training `final` on to its epochs if needed.
        Trials running at once in a space of sampling settings need the same LoRAs: each claims one before
        training it (search/lora/.claims/<key>), and with `wait` off leaves a LoRA another trial is training
        (returns False) to take the next."""
        with claim(self.root / ".claims" / job.key, wait) as held:
            if not held:
                return False
            if not pending_jobs([job], self.root):  # made before, or by the trial that held the claim
                return True
            if final.key not in self.open:
                self.open[final.key] = LoraTraining(base_pipeline(self.base.path, self.cfg.generator), final,
                                                    self.cfg.generator)
            training = self.open[final.key]
            training.train_to(ccfg.generator.epochs)
            with atomic_dir(self.root / job.key) as tmp:
                training.save(job, ccfg.generator, self.base, tmp)
        return True

    def close(self) -> None:
        for training in self.open.values():
            training.close()


def plan_part_loras(cfg: ExperimentConfig, parts: list[FoldPart], base: BaseModel) -> list[list[LoraJob]]:
    """The LoRAs of each fold part, trained on its whole subset: the subset is already of classify.real_fraction
    (fold_part), which plan_loras would otherwise take a second time (half of a half at 0.5)."""
    whole = with_value(cfg, "classify.real_fraction", 1.0)
    return [plan_loras(whole, part.manifest, base.identity, folds=[part.fold]) for part in parts]


def _save_checkpoint(trainings: _Trainings, final: list[list[LoraJob]], ccfg: ExperimentConfig,
                     parts: list[FoldPart], base: BaseModel) -> list[list[LoraJob]]:
    """Have every LoRA of the checkpoint `ccfg` (generator.epochs = the checkpoint's) on disk; its jobs per fold."""
    jobs = plan_part_loras(ccfg, parts, base)
    pairs = [(target, job) for fold_final, fold_jobs in zip(final, jobs) for target, job in zip(fold_final, fold_jobs)]
    # The LoRAs no other trial is training first, then wait for the rest (made meanwhile, or trained here after).
    # Measured on the bad-start search (2 CPUs, 2 trials at once, a sampling-only space): each trial spent 10 s
    # of its 14.5 s training the same 4 LoRAs as the other.
    for target, job in [pair for pair in pairs if not trainings.save(*pair, ccfg, wait=False)]:
        trainings.save(target, job, ccfg, wait=True)
    return jobs


def _pools(cfg: ExperimentConfig, parts: list[FoldPart], jobs: list[list[LoraJob]], base: BaseModel,
           paths: ExperimentPaths) -> pd.DataFrame:
    """search.images_per_class images per (fold, class), sampled in this process from the checkpoint's LoRAs."""
    flat = [job for fold_jobs in jobs for job in fold_jobs]
    starts = {}
    for part, fold_jobs in zip(parts, jobs):
        starts.update(start_images(fold_jobs, part.manifest))
    sizes = {target: cfg.search.images_per_class for target in starts}
    plan = plan_images(cfg, base, trained_table(flat, paths.search / "lora"), sizes, starts,
                       paths.search / "synthetic")
    return consolidate(plan, render(plan, cfg, base, use_ray=False))  # a Tune trial: its resources are this process's


def _scored(cfg: ExperimentConfig, parts: list[FoldPart], synthetic: pd.DataFrame, weights: BackboneWeights,
            manifest: pd.DataFrame, paths: ExperimentPaths) -> dict:
    """The objectives per fold and their mean over the folds, the objective's standard error, its resolution."""
    real = pd.concat([part.manifest for part in parts], ignore_index=True)
    images = pd.concat([real[["path", "sha256"]], synthetic[["path", "sha256"]]]).drop_duplicates("sha256")
    features = quality_features(cfg, weights, images, manifest, paths, use_ray=False)
    classes = class_names(manifest)
    per_fold = [score(p.subset, p.test, synthetic[synthetic["fold"] == p.fold], features, classes, cfg)
                for p in parts]
    values = np.array([m[cfg.search.objective] for m in per_fold])
    n_test = sum(len(p.test) for p in parts)
    return {**{name: float(np.mean([m[name] for m in per_fold])) for name in OBJECTIVE_MODE},
            "score": float(values.mean()),
            "score_se": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan"),
            "folds": [p.fold for p in parts], "fold_scores": values.tolist(), "n_test": n_test,
            # CAS and accuracy move in steps of one held-out image: 1 / n_test of the mean over equal folds
            "resolution": 1.0 / n_test}


def trial_reports(point: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
                  weights: BackboneWeights, folds: list[int], every: int) -> Iterator[dict]:
    """Run one search trial (also without Ray), yielding its row at each checkpoint; the last is complete. A
    trial finished before (the same key) yields its row at once."""
    start = time.perf_counter()
    tcfg = point_config(cfg, point)
    manifest = load_manifest(paths)
    parts = [fold_part(manifest, fold, cfg.search, cfg.classify.real_fraction) for fold in folds]
    final = plan_part_loras(tcfg, parts, base)
    key = keys.search_trial_key(tcfg, point, [job.key for fold_jobs in final for job in fold_jobs],
                                pd.concat([part.test for part in parts]),
                                features_identity(cfg, weights, paths, manifest))
    result_file = paths.search / "trials" / f"{key}.parquet"
    done = None if parquet_problem(result_file) else pd.read_parquet(result_file)
    # Optuna may propose a point again; a row from before an objective existed is scored again, never reported
    # without it.
    if done is not None and done["complete"].iloc[0] and set(REPORTED) <= set(done.columns):
        yield done.iloc[0].to_dict()
        return
    trainings = _Trainings(tcfg, base, paths.search / "lora")
    try:
        with task_threads(cfg.search.cpus_per_trial):  # the confirmation's task may run in any reused worker
            for epochs in checkpoints(tcfg.generator.epochs, every):
                ccfg = with_value(tcfg, "generator.epochs", epochs)
                jobs = _save_checkpoint(trainings, final, ccfg, parts, base)
                synthetic = _pools(ccfg, parts, jobs, base, paths)
                losses = trained_table([job for fold_jobs in jobs for job in fold_jobs], paths.search / "lora")
                row = {"search_key": key, **point, **_scored(ccfg, parts, synthetic, weights, manifest, paths),
                       "objective": cfg.search.objective, "epochs_trained": epochs,
                       "complete": epochs == tcfg.generator.epochs,
                       "final_loss_mean": float(losses["final_loss"].mean()),
                       "n_lora_images_per_class": cfg.search.images_per_class,
                       "duration_s": time.perf_counter() - start}
                write_parquet(pd.DataFrame([row]), result_file)
                yield row
    finally:
        trainings.close()


def final_row(point: dict, cfg: ExperimentConfig, paths: ExperimentPaths, base: BaseModel,
              weights: BackboneWeights, folds: list[int]) -> dict:
    """A whole trial without intermediate reports; its complete row."""
    *_, row = trial_reports(point, cfg, paths, base, weights, folds, every=0)
    return row
