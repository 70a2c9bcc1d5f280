"""Fixtures shared by the test modules; builders of tiny data and configs are in helpers.py."""
import fcntl
import logging
import os
from pathlib import Path

import pytest

# Local Ray for tests: no token auth, no dashboard, trials keep the working directory.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Ray installs its log handler when first imported, bound to the sys.stderr of that moment (ray/_private/log.py:
# PlainRayHandler is a StreamHandler). Imported inside a test that captures stderr (capsys), the handler keeps that
# test's capture stream, closed when the test ends, and Ray's next log line (ray.init's "Started a local Ray
# instance") printed a logging traceback into a later test's stderr: test_cli.py's GPU test failed after the rest
# of test_cli.py in one process. Imported here, before any test, the handler holds the session's stream.
import ray  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "pbc_blood_cells"


def pytest_collection_modifyitems(items):
    """Heavy tests first: the `slow` end-to-end runs and the xdist groups (a module on one worker, 57-167 s each
    in CI). pytest-xdist hands out tests (a group as one unit) in this order, so the suite ends on short tests
    and neither worker idles while the other finishes a long one (CI at 97c0f28: the last ~2 minutes ran at 70 %
    of the 2 cores, with test_provenance.py and test_search.py's slowest test collected last)."""
    def heavy(item) -> bool:
        return item.get_closest_marker("slow") is not None or item.get_closest_marker("xdist_group") is not None

    # Tests that shut the worker's Ray down go last: a test after one starts a new Ray and cold workers (~4 s, then
    # the imports of each first task and actor again).
    items.sort(key=lambda item: (item.get_closest_marker("restarts_ray") is not None, not heavy(item)))  # stable


@pytest.fixture(autouse=True)
def ooc_ray_log_level():
    """The level of ooc-ray's own lines as it was before each test: a test that runs the CLI in its process with
    -q leaves them at WARNING, and a later test on the same xdist worker then captured none of its notes
    (test_finetune's "LoRA ... is damaged" after the bad-start search's refusal, in CI at 4135c2b)."""
    logger = logging.getLogger("ooc_ray")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_pbc() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spin-wait on cores
    other processes (Ray workers, other tests) hold: measured 0.7 images/s with 2 threads vs 15 with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def shared_ray():
    """One local Ray for the whole session (the CLI's init_ray joins it): its idle workers keep TensorFlow and
    torch imported between modules, saving ~5-8 s per Ray start and per feature-extraction task."""
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


# The CPU examples' shared base (experiments/base/small_cpu.yaml), trained once per session in tiny mode.
SMALL_CPU = REPO / "experiments" / "base" / "small_cpu.yaml"


@pytest.fixture(scope="session")
def trained_small_cpu(tmp_path_factory) -> Path:
    """The results folder of small_cpu.yaml run through data, pretrain, finetune and sample in tiny mode, built once
    for the whole session: under pytest-xdist the first worker builds it while the other waits on a file lock.
    Every key is content: a test that copies it into its own folder re-uses exactly the artifacts its own config
    would make (the same pretrained base, LoRAs and pools) and makes the rest."""
    from ooc_ray.cli import main

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained_small_cpu"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "built").exists():
            # Sampled by two one-thread actors, as the multi-node job samples them (one per one-CPU node): the
            # thread count can change an image's last bits (sampler.cpus_per_cpu_actor), and test_cluster_nodes
            # compares that job's pools with these.
            for stage in ("data", "pretrain", "finetune", "sample"):
                assert main([stage, str(SMALL_CPU), "--tiny", "-o", f"results_dir={shared}",
                             "-o", "sample.actors=2"]) == 0, stage
            (shared / "built").touch()
    return shared / "small_cpu"
