"""cluster.yaml passes Ray's own cluster-config validation (the launcher's JSON schema + checks), and each of its
commands that can run here does what it says: the shared-storage guard, the node's GPU check, the head's model
fetch and the job-submit command's config; and on a node with GPUs, what a task or actor that asked for none sees."""
import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture
def cluster(repo):
    return yaml.safe_load((repo / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(cluster):
    full = prepare_config(copy.deepcopy(cluster))  # (it prepends setup_commands to the head's and workers')
    validate_config(full)
    assert full["head_node_type"] in full["available_node_types"]
    assert full["docker"]["image"].startswith("rayproject/ray:")
    setup = " ".join(full["setup_commands"])
    assert "torch==2.13.0" in setup and "torchvision" not in setup
    assert '"tensorflow[and-cuda]==2.21.0"' in setup  # plain tensorflow has no CUDA libraries
    assert full["file_mounts"]["/home/ray/ooc-ray"] == "."  # this checkout, synced to every node
    # Model caches on the shared mount, created by the setup, fetched once by the head, checked by each worker.
    options = " ".join(full["docker"]["run_options"])
    assert "-v /mnt/shared:/mnt/shared" in options
    for var in ("HF_HOME", "KERAS_HOME"):
        cache = options.split(f"-e {var}=")[1].split()[0]
        assert cache.startswith("/mnt/shared/") and cache in setup
    assert cluster["head_setup_commands"] == ["cd /home/ray/ooc-ray && ooc-ray fetch experiments/paper.yaml "
                                           "-o results_dir=/mnt/shared/results"]
    assert cluster["worker_setup_commands"] == ["cd /home/ray/ooc-ray && python -m ooc_ray.gpu"]


def test_validation_catches_a_typo(cluster):
    cluster["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(cluster))


def test_the_node_setup_check_fails_cleanly_without_a_gpu(repo):
    """cluster.yaml's worker setup runs `python -m ooc_ray.gpu`; on this CPU machine both frameworks must fail
    it, one line each naming the node, and the exit status must fail the node's setup."""
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ooc_ray.gpu"], capture_output=True, text=True, cwd=repo,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    assert [line.split(":")[0] for line in failed] == ["FAILED torch", "FAILED tensorflow"], proc.stdout
    assert all(f"node {socket.gethostname()} was given a GPU" in line for line in failed), failed


def test_the_shared_storage_guard_stops_ray_up_until_it_is_set(cluster, tmp_path):
    """The first initialization command refuses the placeholder with one line naming what to set; with a real
    server name it records it for the mount command."""
    import subprocess

    guard = cluster["initialization_commands"][0].replace("/tmp/ooc_shared_nfs", str(tmp_path / "nfs"))
    mount = cluster["initialization_commands"][1]
    assert "/tmp/ooc_shared_nfs" in mount and "/mnt/shared" in mount
    proc = subprocess.run(["bash", "-c", guard], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "cluster.yaml: set OOC_SHARED_NFS (initialization_commands) to your EFS/NFS server first")
    mine = guard.replace("CHANGE-ME.efs", "fs-0123.efs")
    assert subprocess.run(["bash", "-c", mine]).returncode == 0
    assert (tmp_path / "nfs").read_text().strip() == "fs-0123.efs.us-west-2.amazonaws.com"


def test_the_readme_job_submit_runs_the_synced_checkout_with_absolute_paths(cluster, repo):
    """The README's `ray job submit` changes into the synced checkout and passes absolute data and results
    paths; its config and overrides load."""
    import shlex

    from ooc_ray.load import load_config

    readme = (repo / "README.md").read_text()
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if "ray job submit" in line)
    end = start
    while lines[end].endswith("\\"):  # continued on the next line
        end += 1
    block = " ".join(line.rstrip("\\").strip() for line in lines[start:end + 1])
    inner = " ".join(shlex.split(block)[-1].split())  # bash -c '<this>'
    assert inner.startswith("cd /home/ray/ooc-ray && ooc-ray run experiments/paper.yaml")
    assert "/home/ray/ooc-ray" in cluster["file_mounts"]
    words = shlex.split(inner)
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "-o"]
    values = dict(o.split("=", 1) for o in overrides)
    assert values["data.source"].startswith("/mnt/shared/") and values["results_dir"].startswith("/mnt/shared/")
    cfg = load_config(repo / "experiments" / "paper.yaml", overrides)
    assert cfg.ray.address == "auto" and cfg.ray.autoscaling


def test_fetch_builds_what_the_config_names_and_fails_in_one_line_offline(repo, tmp_path, capsys, monkeypatch):
    """`ooc-ray fetch`, which the head's setup runs: the demo's tiny base is built; the paper's hub base cannot
    be downloaded here (no internet), which must be one line naming the key, exit 1."""
    from ooc_ray.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", str(repo / "experiments" / "demo.yaml"), "-o", f"results_dir={tmp_path}"]) == 0
    assert (tmp_path / "demo" / "models" / "tiny_sd" / "model_index.json").is_file()
    assert "fetch: generator.base tiny" in capsys.readouterr().out
    assert main(["fetch", str(repo / "experiments" / "paper.yaml"), "-o", f"results_dir={tmp_path}"]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[ooc-ray]")]
    assert len(ours) == 1 and "fetch failed: generator.base 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in ours[0]


GPU_NODE_PROBE = """
import json, os
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster
from ooc_ray.config import ExperimentConfig
from ooc_ray.fields import with_value
from ooc_ray.raycluster import init_ray, ray_task

def seen():
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

class Actor:
    def seen(self):
        return seen()

# A local Ray started by the run, on a machine whose processes see CUDA_VISIBLE_DEVICES=0,1.
os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
ray = init_ray(ExperimentConfig())
local = ray.get(ray_task(seen, 1, 0, 0).remote())
ray.shutdown()
for name in ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "CUDA_VISIBLE_DEVICES"):  # the cluster's environment is its own
    os.environ.pop(name, None)
# A node with two (Ray-declared) GPUs whose processes all start with CUDA_VISIBLE_DEVICES=0,1, as a GPU node's do
# when nothing hides them; the run joins it.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2,
                                                        "env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}})
try:
    ray = init_ray(with_value(ExperimentConfig(), "ray.address", cluster.address))
    cpu, gpu = ray_task(seen, 1, 0, 0), ray_task(seen, 1, 1, 0)
    print(json.dumps({"local": local, "cpu": ray.get([cpu.remote() for _ in range(2)]),
                      "actor": ray.get(ray.remote(num_cpus=1)(Actor).remote().seen.remote()),
                      "gpu": [ray.get(gpu.remote()) for _ in range(3)]}))
finally:
    ray.shutdown()
    cluster.shutdown()
    reset_ray_address()
"""


def test_on_a_gpu_node_work_that_asked_for_no_gpu_sees_none_and_a_gpu_task_gets_a_fresh_worker(repo):
    """Ray 2.60 no longer hides a node's GPUs from a task or actor that asked for none: a CPU LoRA task, a CPU
    sampling actor or a cached-mode trial would run on GPU 0 unreserved (the sampler in fp16: other images). The
    run asks Ray to hide them (raycluster.init_ray), on a local Ray it starts and on a cluster it joins. A GPU task (raycluster.ray_task) runs in a
    worker of its own: a reused one would keep its CUDA context on its first task's card."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", GPU_NODE_PROBE], capture_output=True, text=True, cwd=repo, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["local"][1] == "" and [visible for _, visible in seen["cpu"]] == ["", ""] and seen["actor"][1] == ""
    assert all(visible in ("0", "1") for _, visible in seen["gpu"])
    assert len({pid for pid, _ in seen["gpu"]}) == 3  # one worker per GPU task
