"""Starting or joining Ray the same way from every stage, refusing resource requests no node can meet, and
waiting for remote work with a bound: when every node that could serve a request is gone, a stage fails after
ray.node_wait_s naming the request, instead of waiting for ever."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import RayActorError

from ooc_ray.config import ExperimentConfig
from ooc_ray.errors import ResourceError, StageError
from ooc_ray.logs import note, ray_logging_level
from ooc_ray.paths import ExperimentPaths

# Ray 2.60 leaves a node's CUDA_VISIBLE_DEVICES as it is for a task or actor that asks for no GPU (ray#54868): on a
# GPU node a 0-GPU LoRA task then trains on a GPU nobody reserved, a CPU sampling actor samples on GPU 0 in fp16
# (other images than the CPU run it asked for) and TensorFlow puts every cached-mode trial on GPU 0. Ray's switch
# back to hiding them, read by each worker (measured with Ray 2.60: CUDA_VISIBLE_DEVICES "0,1" without it, ""
# with it; tests/test_cluster.py).
HIDE_UNREQUESTED_GPUS = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


def init_ray(cfg: ExperimentConfig):
    """Idempotent ray.init: local by default, a cluster when cfg.ray.address is set ("auto" or ray://...)."""
    if ray.is_initialized():
        return ray
    # Trials chdir into their own folders by default; every path here is absolute, and keeping the
    # working directory stable makes relative user paths in configs keep working inside trials.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    kwargs: dict = {"log_to_driver": False, "include_dashboard": False, "logging_level": ray_logging_level()}
    # Inside a Ray job (`ray job submit`) RAY_ADDRESS names its cluster: join it even without ray.address.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        kwargs["address"] = address
        # A cluster started elsewhere: its workers inherit its raylets' environment, so the job's carries the switch.
        kwargs["runtime_env"] = {"env_vars": {HIDE_UNREQUESTED_GPUS: "1"}}
    else:
        # The raylet started here, and its workers, inherit this process's environment. (Not a job runtime env:
        # it costs each new worker ~0.3 s and the first task ~1.5 s more, measured on 2 cores.)
        os.environ.setdefault(HIDE_UNREQUESTED_GPUS, "1")
        # "local", not ray.init()'s default: with no address, ray.init joins the last cluster started on this
        # machine (/tmp/ray/ray_current_cluster, e.g. a `ray start` left running), which the config never named.
        kwargs["address"] = "local"
        # Ray 2.60 turns token auth on by default; a local single-machine run has nothing to protect.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.keep_workers:
            kwargs["_system_config"] = {"num_workers_soft_limit": cfg.ray.keep_workers}
    ray.init(**kwargs)
    return ray


def ray_task(fn: Callable, cpus: float, gpus: float, retries: int, **options):
    """`fn` as a Ray task reserving `cpus` and `gpus`, run again elsewhere up to `retries` times when its node dies.
    The request goes to ray.remote itself, not to .options(): only there does a GPU request make the worker exit
    after its task (Ray's max_calls=1; .options(num_gpus=1) leaves max_calls 0, Ray 2.60), so no reused worker keeps
    a CUDA context on a GPU its next task was not given, or GPU memory the sampling actors need."""
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries, **options)(fn)


def _wanted(request: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in request.items() if v and v > 0}


def can_serve(request: dict[str, float]) -> bool:
    """Whether an alive node of the cluster has the resources of one unit of `request` in all."""
    wanted = _wanted(request)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes)


def where() -> dict[str, str]:
    """The node this code runs on: Ray's node id ("" outside Ray) and its hostname. Recorded with each LoRA, pool
    image and trial (a resource fact: it enters no key)."""
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"node_id": node_id or "", "node_host": socket.gethostname()}


def require_resources(cfg: ExperimentConfig, request: dict[str, float], what: str) -> None:
    """Fail within seconds when no node of the cluster can ever run one unit of `request` ({"CPU": 1,
    "GPU": 1}) for `what` (e.g. "finetune: generator.gpus=1"), instead of letting Ray wait for ever.

    With ray.autoscaling the autoscaler may still add such a node: then say what is waited for."""
    ray = init_ray(cfg)
    wanted = _wanted(request)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if can_serve(request):
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


POLL_S = 2.0  # how often a waiting stage looks at its work and at the cluster


class _Watchdog:
    """Fails a stage whose work has not moved for ray.node_wait_s while no alive node can serve its request
    (every such node lost, none coming back): the one-line error names the request and what finished."""

    def __init__(self, cfg: ExperimentConfig, request: dict[str, float], what: str):
        self.cfg, self.request, self.what = cfg, request, what
        self.since: float | None = None

    def moved(self) -> None:
        self.since = None

    def check(self, done: int, total: int) -> None:
        if self.cfg.ray.autoscaling or can_serve(self.request):
            self.since = None
            return
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since > self.cfg.ray.node_wait_s:
            ask = ", ".join(f"{k} {v:g}" for k, v in _wanted(self.request).items())
            raise ResourceError(
                f"{self.what}: no alive node can serve {ask} (the nodes that could are gone) for "
                f"{self.cfg.ray.node_wait_s:g} s (ray.node_wait_s); {done} of {total} finished and are kept: "
                "re-run when a node is back")


def wait_all(cfg: ExperimentConfig, refs: list, request: dict[str, float], what: str) -> list:
    """ray.get of every task in `refs` (in order), under the watchdog: Ray retries a task whose node died
    (max_retries), elsewhere; when no node can serve `request` any more, the stage fails naming it."""
    watchdog, pending = _Watchdog(cfg, request, what), list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        if ready:
            ray.get(ready)  # raises a task's error now, not after the rest
            watchdog.moved()
        else:
            watchdog.check(len(refs) - len(pending), len(refs))
    return ray.get(refs)


def await_all(cfg: ExperimentConfig, request: dict[str, float], what: str, actors: list, items: list,
              submit: Callable, replace: Callable) -> list:
    """Every item through `submit(actor, item)` (an actor method's ObjectRef), one item per ready actor at a
    time; returns the results in item order. An actor lost with its node is replaced (`replace(i)` -> a new
    handle for slot i, placed by Ray where the request fits) and its item queued again, at most ray.max_retries
    times per item; under the watchdog."""
    queue, running, results = list(range(len(items))), {}, [None] * len(items)
    attempts = [0] * len(items)
    starting = {actor.__ray_ready__.remote(): slot for slot, actor in enumerate(actors)}
    idle: list[int] = []
    watchdog = _Watchdog(cfg, request, what)
    def lost(i: int, slot: int) -> None:
        attempts[i] += 1
        if attempts[i] > cfg.ray.max_retries:
            raise StageError(f"{what}: item {i} lost its worker {attempts[i]} times (ray.max_retries="
                             f"{cfg.ray.max_retries}); nodes keep dying: look at the cluster, then re-run")
        note(f"{what}: a worker was lost (its node is gone): its work goes to another one "
             f"(attempt {attempts[i] + 1} of {cfg.ray.max_retries + 1})")
        queue.insert(0, i)
        actors[slot] = replace(slot)
        starting[actors[slot].__ray_ready__.remote()] = slot

    while queue or running:
        while idle and queue:
            slot, i = idle.pop(0), queue.pop(0)
            try:
                running[submit(actors[slot], items[i])] = (i, slot)
            except Exception:  # noqa: BLE001 - Ray raises a bare Exception for an actor it cannot find
                lost(i, slot)
        ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_S)
        if not ready:
            watchdog.check(sum(r is not None for r in results), len(items))
            continue
        watchdog.moved()
        for ref in ready:
            if ref in starting:
                slot = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(slot)
                except RayActorError:  # died while starting: its node is gone
                    actors[slot] = replace(slot)
                    starting[actors[slot].__ray_ready__.remote()] = slot
                continue
            i, slot = running.pop(ref)
            try:
                results[i] = ray.get(ref)
                idle.append(slot)
            except RayActorError:
                lost(i, slot)
    return results
