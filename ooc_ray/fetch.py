"""`ooc-ray fetch`: download, once, the models an experiment names but does not ship (the hub base into
HF_HOME, ImageNet weights into KERAS_HOME), so a cluster's nodes read them from shared storage instead of
each downloading ~4 GB of SD v1.5 and several trials racing on one unlocked Keras download.

cluster.yaml runs it in the head's setup, with HF_HOME and KERAS_HOME on the shared file system."""
from __future__ import annotations

import os

from ooc_ray.backbones import build_backbone, setup_tf
from ooc_ray.config import ExperimentConfig
from ooc_ray.diffusion.base import resolve_base
from ooc_ray.io import note
from ooc_ray.paths import ExperimentPaths


def run_fetch(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[str]:
    """Resolve generator.base (downloading a hub id) and build the classifier with ImageNet weights when the
    config asks for them (Keras downloads them once); returns what is now local, one line each."""
    base = resolve_base(cfg.generator.base, paths.models)
    fetched = [f"generator.base {cfg.generator.base}: {base.path} ({base.identity})"]
    cc = cfg.classify
    if cc.weights == "imagenet":
        setup_tf()
        build_backbone(cc.backbone, "imagenet", cc.input_size)
        keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
        fetched.append(f"classify.weights imagenet for {cc.backbone}: under {keras_home}/models")
    for line in fetched:
        note(f"fetch: {line}")
    return fetched
