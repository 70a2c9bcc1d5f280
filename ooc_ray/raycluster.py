"""Starting or joining Ray, the same way from every stage."""
from __future__ import annotations

import os

from ooc_ray.config import ExperimentConfig


def init_ray(cfg: ExperimentConfig):
    """Idempotent ray.init: local by default, a cluster when cfg.ray.address is set ("auto" or ray://...)."""
    import ray

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
