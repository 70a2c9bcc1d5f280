"""`ooc-ray fetch`: download, once, the models an experiment names but does not ship (the hub base into
HF_HOME, ImageNet weights into KERAS_HOME), so a cluster's nodes read them from shared storage instead of
each downloading ~4 GB of SD v1.5 and several trials racing on one unlocked Keras download.

cluster.yaml runs it in the head's setup, with HF_HOME and KERAS_HOME on the shared file system."""
from __future__ import annotations

import os

from ooc_ray.backend import keras_side
from ooc_ray.config import ExperimentConfig
from ooc_ray.diffusion.base import resolve_base
from ooc_ray.logs import note
from ooc_ray.paths import ExperimentPaths
from ooc_ray.variants import each_variant


def run_fetch(cfg: ExperimentConfig, paths: ExperimentPaths) -> list[str]:
    """Resolve every generator.base the variants of the axes name (downloading a hub id) and build each
    classifier backbone with ImageNet weights a variant asks for (Keras downloads them once); returns what is
    now local, one line each."""
    configs = [variant.cfg for variant, _ in each_variant(cfg, paths)]
    fetched = []
    for name in dict.fromkeys(c.generator.base for c in configs):
        base = resolve_base(name, paths.models)
        fetched.append(f"generator.base {name}: {base.path} ({base.identity})")
    for backbone, size, backend in dict.fromkeys((c.classify.backbone, c.classify.input_size, c.classify.backend)
                                                 for c in configs if c.classify.weights == "imagenet"):
        # On the experiment's framework: a node without TensorFlow fetches too (the weights files are the same).
        networks = keras_side("ooc_ray.networks", backend)
        networks.framework().setup()
        networks.build_backbone(backbone, "imagenet", size)
        keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
        fetched.append(f"classify.weights imagenet for {backbone}: under {keras_home}/models")
    for line in fetched:
        note(f"fetch: {line}")
    return fetched
