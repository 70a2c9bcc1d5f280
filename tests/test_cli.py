"""The CLI: dispatch, one-line errors through the one error base class, the run lock, resource checks."""
import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from ooc_ray.cli import main
from ooc_ray.lock import RunLock


def data_config(tmp_path, extra: str = "") -> str:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"results_dir: {tmp_path}\ndata:\n  demo:\n    per_class: [6, 6, 6]\n    size: 32\nfolds:\n  k: 3\n"
                   + extra)
    return str(cfg)


def test_cli_data_stage(tmp_path, capsys):
    assert main(["data", data_config(tmp_path)]) == 0
    out = tmp_path / "exp"
    assert len(pd.read_parquet(out / "manifest.parquet")) == 18
    assert (out / "config.yaml").exists()  # resolved config saved beside the outputs
    assert not (out / ".ooc-ray.lock").exists()  # released


def test_cli_config_error_names_key(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data:\n  sorce: x\n")
    assert main(["data", str(cfg)]) == 2
    assert "data.sorce" in capsys.readouterr().err


def test_cli_overrides_that_are_not_yaml_and_values_past_a_float_are_one_line_errors(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"generator: {{unet_lr: {10**400}}}\n")  # YAML reads it as an int no float can hold
    assert main(["plan", str(cfg), "-o", "classify.epochs=[", "-o", "classify.lr"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "override 'classify.epochs=[': the value is not YAML" in err and "override 'classify.lr'" in err
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "generator.unet_lr: expected a finite number, got 10000000000" in err


def test_cli_data_error_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"results_dir: {tmp_path}\ndata:\n  source: {tmp_path / 'nowhere'}\n")
    assert main(["data", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_yaml_is_written_only_by_a_command_that_succeeds_and_every_command_is_recorded(tmp_path, capsys):
    """config.yaml sits beside results made from it; runs/ keeps each command's argv, overrides and resolved
    config, the failed ones too."""
    out = tmp_path / "exp"
    cfg = data_config(tmp_path)
    assert main(["finetune", cfg, "-o", "generator.rank=4"]) == 1  # no manifest yet
    assert not (out / "config.yaml").exists()
    (failed,) = (out / "runs").glob("*-finetune.yaml")
    record = yaml.safe_load(failed.read_text())
    assert record["argv"] == ["finetune", cfg, "-o", "generator.rank=4"] and record["overrides"] == ["generator.rank=4"]
    assert record["config"]["generator"]["rank"] == 4
    time.sleep(1.1)  # records are named by the second they started
    assert main(["data", cfg]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["generator"]["rank"] == 8  # the data run's own
    assert sorted(p.name.split("-", 1)[1] for p in (out / "runs").iterdir()) == ["data.yaml", "finetune.yaml"]


@pytest.mark.parametrize("stage", ["finetune", "classify", "report"])
def test_missing_inputs_are_one_line(tmp_path, capsys, stage):
    assert main([stage, data_config(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "manifest.parquet" in err and "ooc-ray data" in err and "Traceback" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "ooc_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ["data", "finetune", "sample", "classify", "report", "run", "search"]:
        assert stage in out.stdout


def test_version_and_each_stage_says_what_it_reads_and_writes(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ooc-ray {version('ooc-ray')}"
    helps = {}
    for stage in ["data", "finetune", "sample", "classify", "report"]:
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        helps[stage] = " ".join(capsys.readouterr().out.split())
    assert "Writes manifest.parquet" in helps["data"] and "Writes lora/" in helps["finetune"]
    assert "synthetic.parquet" in helps["sample"] and "trials/" in helps["classify"] and "report/" in helps["report"]
    assert len(set(helps.values())) == len(helps)  # no two stages share one help text


HOLD = """
import sys, time
from ooc_ray.lock import RunLock
RunLock(sys.argv[1], "ooc-ray run experiments/demo.yaml").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    config = data_config(tmp_path)
    lock = tmp_path / "exp" / ".ooc-ray.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        assert main(["data", config]) == 1
        assert time.perf_counter() - start < 5
        err = capsys.readouterr().err
        for part in [socket.gethostname(), f"pid {holder.pid}", "`ooc-ray run experiments/demo.yaml`", "since 20"]:
            assert part in err, (part, err)
        assert not (tmp_path / "exp" / "manifest.parquet").exists()  # nothing written
        # reading finished results needs no lock
        assert main(["report", config]) == 1 and "lock" not in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is taken over, naming it
    assert main(["data", config]) == 0
    assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, pid {holder.pid}" in \
        capsys.readouterr().out


def test_status_reads_the_lock_each_stages_files_and_the_last_commands(tmp_path, capsys):
    """status before anything ran, after a failed finetune and a data run, while another process holds the lock,
    and after that process was killed; it takes no lock and writes nothing."""
    config = data_config(tmp_path)
    out = tmp_path / "exp"
    assert main(["status", config]) == 0
    assert "does not exist yet" in capsys.readouterr().out and not out.exists()
    assert main(["finetune", config]) == 1
    time.sleep(1.1)  # records are named by the second they started
    assert main(["data", config]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["status", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lock: free (no run is writing)" in lines and "data: 18 images in manifest.parquet" in lines
    assert "finetune: 0 LoRAs trained" in lines and "classify: 0 trials finished" in lines
    assert "report: not written" in lines
    runs = lines[lines.index("last commands:") + 1:]
    assert f"`ooc-ray data {config}`: succeeded (20" in runs[0]
    assert f"`ooc-ray finetune {config}`: failed: finetune failed: " in runs[1] and "manifest.parquet" in runs[1]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # status wrote nothing
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".ooc-ray.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["status", config]) == 0
        assert f"lock: held by host {socket.gethostname()}, pid {holder.pid}, `ooc-ray run experiments/demo.yaml`" \
            in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert main(["status", config]) == 0
    assert f"lock: left by a run that is gone (host {socket.gethostname()}, pid {holder.pid}" in capsys.readouterr().out
    manifest = out / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:100])  # a damaged manifest is not "not run"
    assert main(["status", config]) == 0
    assert f"data: {manifest} is unreadable Parquet (" in capsys.readouterr().out


def test_lock_of_a_dead_node_is_stale_after_its_heartbeat(tmp_path, monkeypatch):
    import ooc_ray.lock as lock_module

    path = tmp_path / ".ooc-ray.lock"
    path.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "command": "ooc-ray run x", "since": "then"}))
    with pytest.raises(lock_module.LockError, match="gpu-node-7"):
        RunLock(path, "me").acquire()  # another host, fresh heartbeat: alive
    old = time.time() - lock_module.STALE_S - 1
    os.utime(path, (old, old))
    held = RunLock(path, "me").acquire()  # heartbeat too old: the node is gone
    assert json.loads(path.read_text())["pid"] == os.getpid()
    held.release()
    assert not path.exists()


def test_gpus_no_node_has_fail_within_seconds(repo, tmp_path, capsys):
    """No GPU node and no autoscaler: the request is named at once instead of waiting for ever."""
    start = time.perf_counter()
    # No pretraining (a random tiny base): only the data stage and Ray's start-up come before the check.
    code = main(["run", str(repo / "experiments" / "demo.yaml"), "--tiny", "-o", f"results_dir={tmp_path}",
                 "-o", "generator.gpus=1", "-o", "data.demo.per_class=[4, 4, 4]", "-o", "generator.pretrain.source=''"])
    assert code == 1
    # Not a speed goal: Ray's own wait for a GPU never ends. The bound is loose because CI's 2 cores may be busy
    # (with pretraining included this run once took 84 s on a machine under a load of 13).
    assert time.perf_counter() - start < 300
    out, err = capsys.readouterr()
    assert "pretrain: generator.pretrain.source is empty" in out and "finetune ..." in out
    (line,) = [line for line in err.splitlines() if "failed" in line]  # progress bars and warnings aside
    assert "finetune failed" in line and "generator.gpus=1" in line and "GPU 1" in line and "no node" in line
    assert "Traceback" not in err


def test_file_progress_counts_items_as_they_are_written(tmp_path, capsys):
    """New files and a re-made (damaged) one count; a file left as it was does not; the bar ends at the total."""
    import os
    import threading

    from ooc_ray.progress import FileProgress

    kept, damaged = tmp_path / "kept.png", tmp_path / "damaged.png"
    kept.write_bytes(b"x")
    damaged.write_bytes(b"x")
    os.utime(damaged, (1, 1))
    new = [tmp_path / "sub" / f"{i}.png" for i in range(3)]

    def write():
        (tmp_path / "sub").mkdir()
        for path in new:
            path.write_bytes(b"png")
        damaged.write_bytes(b"fixed")

    with FileProgress([*new, damaged, kept], "sample", "image", poll_s=0.05) as progress:
        writer = threading.Thread(target=write)
        writer.start()
        writer.join()
    assert progress.bar.n == 4 and progress.bar.total == 5
    assert "sample:  80%" in capsys.readouterr().err


UNREADABLE = {  # a lock file's content -> why it is unreadable
    json.dumps({"host": socket.gethostname(), "pid": "abc", "command": "ooc-ray run x", "since": "then"}):
        "pid 'abc' is not a process id",
    "[1, 2]": "not a JSON object",
    "garbage{": "not JSON",
    "": "empty",
}


@pytest.mark.parametrize("content", UNREADABLE, ids=["pid abc", "a list", "not JSON", "empty"])
def test_an_unreadable_lock_is_named_by_status_and_writers_at_once_and_left_in_place(tmp_path, capsys, content):
    """No traceback, no "lock: free", no retries nor a wait for a heartbeat: it names no holder, so the user is told
    how to clear it, and the lock stays (taking it over could put two writers in one folder)."""
    config = data_config(tmp_path)
    lock = tmp_path / "exp" / ".ooc-ray.lock"
    lock.parent.mkdir()
    lock.write_text(content)
    message = (f"{lock}: the results lock is unreadable ({UNREADABLE[content]}), so whether a run writes here "
               "cannot be told; if no ooc-ray run uses these results, delete it and run again")
    assert main(["status", config]) == 0  # its other lines still show: status is how one finds out what is wrong
    out, err = capsys.readouterr()
    assert f"lock: {message}\n" in out and "lock: free" not in out and err == ""
    start = time.perf_counter()
    assert main(["data", config]) == 1
    assert time.perf_counter() - start < 5
    assert capsys.readouterr().err == f"[ooc-ray] {message}\n"
    assert lock.read_text() == content and sorted(p.name for p in lock.parent.iterdir()) == [".ooc-ray.lock"]
    lock.unlink()  # what the message says to do
    assert main(["data", config]) == 0


def test_an_override_given_twice_is_named_with_both_values_beside_the_other_bad_overrides(tmp_path, capsys):
    cfg = data_config(tmp_path)
    assert main(["plan", cfg, "-o", "classify.epochs=5", "-o", "classify.lr", "-o", " classify.epochs=20"]) == 2
    assert capsys.readouterr().err == (f"config error: {cfg}: override 'classify.lr': expected key=value; override "
                                       "classify.epochs: given 2 times ('5', '20'); give it once (2 problems)\n")


def test_a_config_path_that_is_a_folder_or_not_text_is_named_as_such(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"config error: {tmp_path}: is a directory, not a config file (name an " \
                                      "experiment YAML in it)\n"
    binary = tmp_path / "exp.yaml"
    binary.write_bytes(b"name: x\xff\n")
    assert main(["plan", str(binary)]) == 2
    assert capsys.readouterr().err == f"config error: {binary}: not a text file (invalid start byte at byte 7)\n"


def test_report_names_the_folder_it_wrote_into_out_included(tmp_path, capsys):
    from test_report import example_trials, write_report

    from ooc_ray.fields import to_dict

    cfg, paths, _, _ = write_report(tmp_path, example_trials())
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert main(["report", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"[ooc-ray] outputs in {paths.root / 'report'}"
    assert main(["report", str(config), "--out", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"[ooc-ray] outputs in {tmp_path / 'elsewhere'}"
    assert (tmp_path / "elsewhere" / "report.md").exists()
