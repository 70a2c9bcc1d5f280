"""Several nodes for real: a Ray cluster of separate raylets on this machine (ray.cluster_utils.Cluster), with a head
that offers no CPU for work (as cluster.yaml's) and worker nodes of one CPU each, every node with its own HOME,
TMPDIR and model caches, so that a file one node writes to its local disk and another reads fails the run.

small_cpu.yaml runs in tiny mode through the CLI against it: once submitted with `ray job submit` as the README
does, once with worker nodes killed (raylet and workers, SIGKILL) in the middle of finetune, sample and classify,
once with every worker gone. Each finished run's tables must equal the single-node run's (conftest's trained
state plus a local classify), key for key and metric for metric.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from helpers import seed_trained_state
from ooc_ray.cli import main

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
        self.root, self.count = root, 0
        self.dashboard = f"127.0.0.1:{free_port()}"
        host, port = self.dashboard.split(":")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "env_vars": node_env(root, "head"), "include_dashboard": True,
            "dashboard_host": host, "dashboard_port": int(port),
            # Not Ray's default 52365: the local Ray of the other tests in this process has its agent there, and a
            # job goes to the head's agent ("No available agent to submit job" when that port was taken).
            "dashboard_agent_listen_port": free_port()})
        self.head_id = self.cluster.head_node.node_id
        self.workers = [self.add() for _ in range(2)]

    def add(self):
        self.count += 1
        node = self.cluster.add_node(num_cpus=1, env_vars=node_env(self.root, f"worker{self.count}"))
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
    """The single-node run's tables: conftest's trained state (data, pretrain, finetune, sample on a local Ray)
    and the rest of the pipeline run here."""
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


def cli(results: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([CLI, "run", str(CONFIG), "--tiny", "-o", f"results_dir={results}",
                             "-o", f"ray.address={address}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} after {timeout:g} s")
        time.sleep(POLL_S)


def test_a_job_submitted_to_three_nodes_makes_the_single_node_tables_on_both_workers(nodes, single_node, tmp_path):
    """`ray job submit` to the head's job server, as the README's command (cd into the checkout, ray.address=auto,
    an absolute results path). Pretraining, LoRAs, sampling actors and trials all run on the workers: the head
    offers no CPU, and every Ray task and actor of the job is checked for its node."""
    results = tmp_path / "results"
    command = (f"cd {REPO} && {CLI} run experiments/base/small_cpu.yaml --tiny -o ray.address=auto "
               f"-o results_dir={results}")
    proc = subprocess.run([str(Path(CLI).parent / "ray"), "job", "submit", "--address", f"http://{nodes.dashboard}",
                           "--", "bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = results / "small_cpu"
    assert_same_tables(tables(exp), single_node)

    workers = {node.node_id for node in nodes.workers}
    recorded = made_on(exp)
    assert all(ids <= workers for ids in recorded.values()), recorded
    assert set().union(*recorded.values()) == workers  # the work was spread over both workers
    address = f"http://{nodes.dashboard}"
    tasks = [t for t in list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
             if t.type == "NORMAL_TASK"]
    names = {t.name.split(".")[-1] for t in tasks}
    assert {"pretrain_task", "train_job"} <= names, names  # pretraining is a Ray task like the LoRAs
    assert not [t.name for t in tasks if t.node_id == nodes.head_id], "model work ran on the head"
    actors = [a for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False)
              if a.class_name != "JobSupervisor"]
    assert {"SamplingActor"} <= {a.class_name for a in actors}
    assert not [a.class_name for a in actors if a.node_id == nodes.head_id], "an actor ran on the head"


def test_worker_nodes_killed_in_each_stage_cost_no_row_and_redo_nothing_finished(nodes, single_node, tmp_path):
    """First every worker is killed mid-finetune: the stage fails within ray.node_wait_s naming the request. Two
    nodes come back and the run is started again: it resumes, and one worker node is killed (SIGKILL) after some
    of finetune's, sample's and classify's work has finished, each replaced by a fresh node, as an autoscaler
    would. The run finishes without a restart, nothing finished before a kill is made again, and the tables are
    the single-node run's."""
    exp = tmp_path / "small_cpu"
    figures = {"faults": 0, "survived": 0, "redone": 0}

    # Every worker gone: a bounded wait, one line naming the request, the finished LoRAs kept.
    proc = cli(tmp_path, nodes.cluster.address, "-o", "ray.node_wait_s=5")
    wait_for(lambda: len(done(exp)["finetune"]) >= 1, proc, "a finished LoRA")
    for node in list(nodes.workers):
        nodes.kill(node)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    waited = time.monotonic() - start
    failed = [line for line in out.splitlines() if line.startswith("[ooc-ray] ")and " failed: " in line]
    assert proc.returncode == 1 and len(failed) == 1, out[-3000:]
    assert failed[0].startswith("[ooc-ray] finetune failed: finetune: "), failed
    assert "no alive node can serve CPU 1" in failed[0] and "(ray.node_wait_s)" in failed[0], failed
    assert waited < 5 + 60, waited  # node_wait_s plus Ray's own detection of the dead nodes
    kept = done(exp)

    # Nodes back: the re-run resumes, and survives one node killed in each stage.
    nodes.workers.extend(nodes.add() for _ in range(2))
    proc = cli(tmp_path, nodes.cluster.address)
    finished = {stage: dict(files) for stage, files in kept.items()}
    for stage, total in (("finetune", len(single_node["loras"])), ("sample", len(single_node["synthetic"])),
                         ("classify", len(single_node["trials"]))):
        before = len(done(exp)[stage])
        wait_for(lambda: before < len(done(exp)[stage]), proc, f"progress in {stage}")
        now = done(exp)[stage]
        victim = nodes.workers[0]
        nodes.kill(victim)
        figures["faults"] += 1
        assert len(done(exp)[stage]) < total, f"{stage} had finished before its node was killed"
        finished[stage].update(now)
        nodes.workers.append(nodes.add())  # its replacement, as an autoscaler would start one
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    figures["survived"] = figures["faults"]
    figures["sampling batches re-queued"] = out.count("a worker was lost")  # tasks and trials: Ray's own retries

    after = done(exp)
    for stage, files in finished.items():
        redone = [p.name for p, mtime in files.items() if after[stage].get(p) != mtime]
        figures["redone"] += len(redone)
        assert not redone, f"{stage}: finished before a kill, made again: {redone}"
    got = tables(exp)
    figures["rows lost"] = sum(len(frame) - len(got[name]) for name, frame in single_node.items())
    print("\nnode faults:", ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert_same_tables(got, single_node)
