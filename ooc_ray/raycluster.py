"""Starting or joining Ray the same way from every stage, and refusing resource requests no node can meet."""
from __future__ import annotations

import os
from pathlib import Path

import ray

from ooc_ray.config import ExperimentConfig
from ooc_ray.errors import ResourceError
from ooc_ray.io import note
from ooc_ray.paths import ExperimentPaths


def init_ray(cfg: ExperimentConfig):
    """Idempotent ray.init: local by default, a cluster when cfg.ray.address is set ("auto" or ray://...)."""
    if ray.is_initialized():
        return ray
    # Trials chdir into their own folders by default; every path here is absolute, and keeping the
    # working directory stable makes relative user paths in configs keep working inside trials.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    kwargs: dict = {"log_to_driver": False, "include_dashboard": False}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    else:
        # Ray 2.60 turns token auth on by default; a local single-machine run has nothing to protect.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)
    return ray


def require_resources(cfg: ExperimentConfig, request: dict[str, float], what: str) -> None:
    """Fail within seconds when no node of the cluster can ever run one unit of `request` ({"CPU": 1,
    "GPU": 1}) for `what` (e.g. "finetune: generator.gpus=1"), instead of letting Ray wait for ever.

    With ray.autoscaling the autoscaler may still add such a node: then say what is waited for."""
    ray = init_ray(cfg)
    wanted = {k: float(v) for k, v in request.items() if v and v > 0}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes):
        return
    largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in wanted}
    ask = ", ".join(f"{k} {v:g}" for k, v in wanted.items())
    have = ", ".join(f"{k} {v:g}" for k, v in largest.items())
    if cfg.ray.autoscaling:
        note(f"{what}: waiting for the autoscaler to add a node with {ask} (largest node now: {have})")
        return
    raise ResourceError(
        f"{what} asks for {ask} per task, but no node of this Ray cluster has that (largest: {have}) and "
        f"ray.autoscaling is off; lower the request (0 = CPU only) or run on a cluster that has such nodes")


def tune_storage(cfg: ExperimentConfig, paths: ExperimentPaths) -> str:
    """Where Ray Tune keeps its experiments: ray.storage_path (URIs such as s3:// as they are, local paths made
    absolute: trials may chdir), else results/<name>/ray."""
    if cfg.ray.storage_path:
        return cfg.ray.storage_path if "://" in cfg.ray.storage_path else str(Path(cfg.ray.storage_path).resolve())
    return str(paths.ray_storage)
