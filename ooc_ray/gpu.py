"""What a GPU request must find on the node that runs it.

A task, actor or trial that was given GPUs calls require_torch_cuda / require_keras_gpu first: torch, TensorFlow
and JAX all fall back to the CPU without a word when they see no usable device (a CPU-only wheel, a driver too old,
CUDA_VISIBLE_DEVICES empty), and SD LoRA training or B7 at 600 px on a CPU runs for days instead of minutes.
Each check imports the framework it checks inside it, on purpose: a node without one of them (a GPU node
without TensorFlow) runs the other check, and the CLI imports this module without paying for either.
"""
from __future__ import annotations

import os
import socket

from ooc_ray.errors import ResourceError


def node_name() -> str:
    return socket.gethostname()


def _visible() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def require_torch_cuda(what: str) -> None:
    """Raise ResourceError naming the node and the request (`what`, e.g. "sample: sample.gpus_per_actor=1")
    unless torch can allocate on a CUDA device here."""
    import torch

    where = (f"{what}: node {node_name()} was given a GPU but torch {torch.__version__} "
             f"(CUDA build {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={_visible()})")
    if not torch.cuda.is_available():
        raise ResourceError(f"{where} sees no usable CUDA device; install a CUDA build of torch on that node "
                            "or set the request to 0")
    try:  # is_available() can be true for a card this build has no kernels for; one allocation tells
        torch.zeros(1, device="cuda").add_(1).item()
    except RuntimeError as exc:
        raise ResourceError(f"{where} cannot run on {torch.cuda.get_device_name(0)}: {str(exc)[:200]}") from None


def require_tf_gpu(what: str) -> None:
    """Raise ResourceError naming the node and the request unless TensorFlow lists a GPU here. Plain
    `pip install tensorflow` has no CUDA libraries; `tensorflow[and-cuda]` brings them."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        raise ResourceError(
            f"{what}: node {node_name()} was given a GPU but TensorFlow {tf.__version__} sees none "
            f"(built with CUDA: {tf.test.is_built_with_cuda()}, CUDA_VISIBLE_DEVICES={_visible()}); "
            "install tensorflow[and-cuda] on that node or set the request to 0")


def require_jax_gpu(what: str) -> None:
    """Raise ResourceError naming the node and the request unless JAX lists a GPU here (`jax[cuda12]` brings
    its CUDA libraries)."""
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        raise ResourceError(f"{what}: node {node_name()} was given a GPU but JAX {jax.__version__} sees none "
                            f"(devices {jax.devices()}, CUDA_VISIBLE_DEVICES={_visible()}); install jax[cuda12] "
                            "on that node or set the request to 0")


def require_keras_gpu(backend: str, what: str) -> None:
    """The check of the framework classify.backend runs Keras on."""
    {"tensorflow": require_tf_gpu, "torch": require_torch_cuda, "jax": require_jax_gpu}[backend](what)


def check_node(argv: list[str] | None = None) -> int:
    """`python -m ooc_ray.gpu`: the setup check of a GPU node (cluster.yaml runs it). Prints what torch and
    TensorFlow see; exits 1 with one line per failure when either cannot use a GPU, so the node fails its
    setup instead of joining the cluster and running GPU work on its CPUs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ooc_ray.gpu", description=check_node.__doc__)
    parser.add_argument("--skip-tf", action="store_true", help="check torch only (a node without TensorFlow)")
    args = parser.parse_args(argv)
    failures = []
    checks = [("torch", require_torch_cuda)] + ([] if args.skip_tf else [("tensorflow", require_tf_gpu)])
    for name, check in checks:
        try:
            check("node setup check")
            print(f"ok: {name} sees a usable GPU on node {node_name()}")
        except ResourceError as exc:
            failures.append(f"{name}: {exc}")
        except ImportError as exc:
            failures.append(f"{name}: not importable on node {node_name()} ({exc})")
    for line in failures:
        print(f"FAILED {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(check_node())
