"""What every classifier trial of one grid shares, without Keras: the grid's driver plans, checks and collects
trials through this module (their files: ooc_ray.trial_files), and only the Tune worker that trains one imports
ooc_ray.classify.train (Keras and TensorFlow, ~4.4 s of CPU per process, measured)."""
from __future__ import annotations

from dataclasses import dataclass

from ooc_ray.backbones import BackboneWeights


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one grid shares, resolved once by the driver."""

    classes: tuple[str, ...]
    weights: BackboneWeights
    data_digest: str  # the manifest the trials were planned from (keys.data_digest)
    features_dir: str | None = None  # cached mode: the feature cache folder
