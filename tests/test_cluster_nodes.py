"""Several nodes for real: a Ray cluster of separate raylets on this machine (ray.cluster_utils.Cluster), with a head
that offers no CPU for work (as cluster.yaml's) and worker nodes of one CPU each, every node with its own HOME,
TMPDIR and model caches, so that a file one node writes to its local disk and another reads fails the run.

small_cpu.yaml runs in tiny mode through the CLI against it, submitted with `ray job submit` as the README does:
once with every worker gone mid-finetune, then again with one worker node killed (raylet and workers, SIGKILL) in
the middle of finetune, sample and classify. The finished run's tables must equal the single-node run's
(conftest's trained state plus a local classify), key for key and metric for metric.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_tasks

from helpers import seed_trained_state
from ooc_ray.cli import main

# One cluster at a time (2 cores); the file sorts early so that its ~3 min group starts first under xdist.
pytestmark = [pytest.mark.xdist_group("multinode"), pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "base" / "small_cpu.yaml"
CLI = str(Path(sys.executable).parent / "ooc-ray")
NODE_DIRS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "KERAS_HOME", "TORCH_HOME")
VOLATILE = {"duration_s", "node_id", "node_host", "render_s"}  # facts of the run, not results
POLL_S = 0.05


def node_env(root: Path, name: str) -> dict[str, str]:
    env = {key: str(root / name / key.lower()) for key in NODE_DIRS}
    for path in env.values():
        Path(path).mkdir(parents=True)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """The cluster and its worker nodes, which a test kills (SIGKILL) and replaces."""

    def __init__(self, root: Path):
        self.root, self.count, self.ever = root, 0, set()
        self.dashboard = f"127.0.0.1:{free_port()}"
        host, port = self.dashboard.split(":")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "env_vars": node_env(root, "head"), "include_dashboard": True,
            "dashboard_host": host, "dashboard_port": int(port),
            # A killed node is declared dead after ~3 s, not Ray's default ~15 s (5 missed checks, 3 s apart).
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            # Not Ray's default 52365: the local Ray of the other tests in this process has its agent there, and a
            # job goes to the head's agent ("No available agent to submit job" when that port was taken).
            "dashboard_agent_listen_port": free_port()})
        self.head_id = self.cluster.head_node.node_id
        self.workers = [self.add() for _ in range(2)]

    def add(self):
        self.count += 1
        node = self.cluster.add_node(num_cpus=1, env_vars=node_env(self.root, f"worker{self.count}"))
        self.ever.add(node.node_id)
        return node

    def kill(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    nodes = Nodes(tmp_path_factory.mktemp("nodes"))
    yield nodes
    nodes.cluster.shutdown()
    # Cluster wrote its address to /tmp/ray/ray_current_cluster (for address="auto"); leave none behind.
    reset_ray_address()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def single_node(trained_small_cpu, tmp_path_factory) -> dict:
    """The single-node run's tables: conftest's trained state (data, pretrain, finetune, and sample by one-thread
    actors as the job samples: the thread count can change an image in its last bits, sampler.cpus_per_cpu_actor;
    1 of 18 PNGs differed from a two-thread actor's) and the rest of the pipeline run here."""
    out = tmp_path_factory.mktemp("single")
    seed_trained_state(trained_small_cpu, out / "small_cpu")
    assert main(["run", str(CONFIG), "--tiny", "-o", f"results_dir={out}"]) == 0
    return tables(out / "small_cpu")


def tables(exp: Path) -> dict[str, pd.DataFrame]:
    """Every result a run wrote, without the facts of where and how fast (node, seconds)."""
    def clean(frame: pd.DataFrame, by: str) -> pd.DataFrame:
        frame = frame.drop(columns=[c for c in frame.columns if c in VOLATILE or c in ("path", "dir", "init_path")])
        return frame.sort_values(by, ignore_index=True)

    trials = pd.concat([pd.read_parquet(p) for p in (exp / "trials").glob("*.parquet")], ignore_index=True)
    summary = pd.read_csv(exp / "report" / "summary.csv")
    return {
        # Not the LoRA files' own sha256: safetensors writes its metadata map in random order (see
        # diffusion.lora.weights_digest); the tensors' digest (weights_sha256), which keys hold, is compared.
        "loras": clean(pd.read_parquet(exp / "lora" / "loras.parquet").drop(columns=["sha256", "kohya_sha256"]),
                       "lora_key"),
        "synthetic": clean(pd.read_parquet(exp / "synthetic.parquet").drop(columns=["lora_sha256"]), "id"),
        "trials": clean(trials.astype({"per_class_recall": str, "confusion": str, "classes": str}), "trial_key"),
        "summary": summary.drop(columns=[c for c in summary.columns if c.startswith("cost_")]),
    }


def assert_same_tables(got: dict, want: dict) -> None:
    for name, frame in want.items():
        pd.testing.assert_frame_equal(got[name], frame, check_dtype=False, obj=name)


def made_on(exp: Path) -> dict[str, set[str]]:
    """The node ids each stage recorded: LoRA metadata, pool image rows, trial rows."""
    loras = {json.loads(p.read_text())["node_id"] for p in (exp / "lora").glob("*/metadata.json")}
    synthetic = set(pd.read_parquet(exp / "synthetic.parquet").node_id)
    trials = {pd.read_parquet(p).node_id.iloc[0] for p in (exp / "trials").glob("*.parquet")}
    return {"finetune": loras, "sample": synthetic, "classify": trials}


def done(exp: Path) -> dict[str, dict[Path, int]]:
    """The finished units of work of each stage, with their files' modification times."""
    globs = {"finetune": "lora/*/pytorch_lora_weights.safetensors", "sample": "synthetic/**/*.png",
             "classify": "trials/*.parquet"}
    # Not what sits in a write's temporary folder (".<name>.<random>.tmp", which pathlib's glob matches too): it is
    # not finished until it is renamed into place.
    return {stage: {p: p.stat().st_mtime_ns for p in exp.glob(pattern)
                    if not any(part.startswith(".") for part in p.relative_to(exp).parts)}
            for stage, pattern in globs.items()}


class Job:
    """A run of small_cpu.yaml submitted with `ray job submit --no-wait`, as the README's command (cd into the
    checkout, ray.address=auto, an absolute results path), then followed through Ray's job API."""

    def __init__(self, nodes: "Nodes", results: Path, *extra: str):
        url = f"http://{nodes.dashboard}"
        # Two sampling actors, one thread each, one per one-CPU worker node.
        command = (f"cd {REPO} && {CLI} run experiments/base/small_cpu.yaml --tiny -o ray.address=auto "
                   f"-o results_dir={results} -o sample.actors=2 {' '.join(extra)}")
        proc = subprocess.run([str(Path(CLI).parent / "ray"), "job", "submit", "--no-wait", "--address", url, "--",
                               "bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        self.id = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
        self.client = JobSubmissionClient(url)

    def poll(self) -> int | None:
        """None while it runs; then 0 when it succeeded, 1 otherwise."""
        status = self.client.get_job_status(self.id)
        return None if not status.is_terminal() else int(status != JobStatus.SUCCEEDED)

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while (code := self.poll()) is None:
            assert time.monotonic() < end, f"job {self.id} still running after {timeout:g} s:\n{self.logs()[-3000:]}"
            time.sleep(0.5)
        return code


def wait_for(condition, job: Job, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{job.logs()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} after {timeout:g} s")
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """One results folder for the module: the run that loses every worker leaves finished work the next resumes."""
    return tmp_path_factory.mktemp("cluster_results")


def test_with_every_worker_gone_a_stage_fails_within_the_bound_naming_the_request(nodes, results):
    """Both workers killed after the first LoRA: the job fails within ray.node_wait_s (plus Ray's detection of the
    dead nodes), one line naming the stage and the request; what finished stays for the re-run."""
    exp = results / "small_cpu"
    job = Job(nodes, results, "-o", "ray.node_wait_s=5")
    wait_for(lambda: len(done(exp)["finetune"]) >= 1, job, "a finished LoRA")
    for node in list(nodes.workers):
        nodes.kill(node)
    start = time.monotonic()
    assert job.wait(120) == 1
    waited = time.monotonic() - start
    failed = [line for line in job.logs().splitlines() if line.startswith("[ooc-ray] ") and " failed: " in line]
    assert len(failed) == 1 and failed[0].startswith("[ooc-ray] finetune failed: finetune: "), failed
    assert "no alive node can serve CPU 1" in failed[0] and "(ray.node_wait_s)" in failed[0], failed
    assert waited < 5 + 60, waited
    assert done(exp)["finetune"]  # kept
    nodes.workers.extend(nodes.add() for _ in range(2))  # nodes back for the re-run


def test_a_job_on_three_nodes_survives_a_node_killed_in_each_stage_and_makes_the_single_node_tables(
        nodes, results, single_node):
    """The job submitted again (it resumes what the previous test left, or starts afresh when run alone). One
    worker node is killed (SIGKILL: raylet and workers) after some of finetune's, sample's and classify's work has
    finished, each replaced by a fresh node, as an autoscaler would. The job finishes without a restart, nothing
    finished before a kill is made again, and the tables are the single-node run's. Pretraining, LoRAs, sampling
    actors and trials ran on the workers only: the head offers no CPU, and every Ray task and actor of the cluster
    is checked for its node."""
    exp = results / "small_cpu"
    figures = {"faults": 0, "survived": 0, "redone": 0}
    finished = done(exp)
    job = Job(nodes, results)
    for stage, total in (("finetune", len(single_node["loras"])), ("sample", len(single_node["synthetic"])),
                         ("classify", len(single_node["trials"]))):
        before = len(done(exp)[stage])
        wait_for(lambda: before < len(done(exp)[stage]), job, f"progress in {stage}")
        now = done(exp)[stage]
        nodes.kill(nodes.workers[0])
        figures["faults"] += 1
        assert len(done(exp)[stage]) < total, f"{stage} had finished before its node was killed"
        finished[stage].update(now)
        nodes.workers.append(nodes.add())  # its replacement
    assert job.wait(600) == 0, job.logs()[-3000:]
    figures["survived"] = figures["faults"]
    figures["sampling batches re-queued"] = job.logs().count("a worker was lost")  # tasks, trials: Ray's retries

    after = done(exp)
    for stage, files in finished.items():
        redone = [p.name for p, mtime in files.items() if after[stage].get(p) != mtime]
        figures["redone"] += len(redone)
        assert not redone, f"{stage}: finished before a kill, made again: {redone}"
    got = tables(exp)
    figures["rows lost"] = sum(len(frame) - len(got[name]) for name, frame in single_node.items())
    print("\nnode faults:", ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert_same_tables(got, single_node)

    recorded = made_on(exp)
    assert all(ids <= nodes.ever for ids in recorded.values()), recorded
    assert len(set().union(*recorded.values())) >= 2  # the work was spread over several workers
    address = f"http://{nodes.dashboard}"
    tasks = [t for t in list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
             if t.type == "NORMAL_TASK"]
    assert {"pretrain_task", "train_job"} <= {t.name.split(".")[-1] for t in tasks}  # pretraining a task too
    assert not [t.name for t in tasks if t.node_id == nodes.head_id], "model work ran on the head"
    actors = [a for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False)
              if a.class_name != "JobSupervisor"]
    assert "SamplingActor" in {a.class_name for a in actors}
    assert not [a.class_name for a in actors if a.node_id == nodes.head_id], "an actor ran on the head"
