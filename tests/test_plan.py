"""`ooc-ray plan`: its counts against what `run` then reports, before and after the trained state exists."""
import re

from helpers import seed_trained_state

from conftest import SMALL_CPU
from ooc_ray.cli import main


def plan_lines(capsys, results) -> dict[str, tuple]:
    assert main(["plan", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    out = capsys.readouterr().out
    counts = {}
    for stage, planned, rest in re.findall(r"^(pretrain|finetune|sample|classify): (\d+) [^,]*?(?:planned)?, (.*?);?$",
                                           out, re.M):
        numbers = re.findall(r"(\d+) (?:re-used|ready|new|to pretrain)", rest)
        counts[stage] = (int(planned), *map(int, numbers)) if numbers else (int(planned), "all new")
    return counts


def test_plan_counts_what_run_then_does_and_writes_nothing(tmp_path, capsys, trained_small_cpu):
    results = tmp_path / "results"
    assert main(["plan", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    assert "no manifest yet: run `ooc-ray data` first" in capsys.readouterr().out
    assert main(["data", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    capsys.readouterr()
    exp = results / "small_cpu"
    before = sorted(exp.rglob("*"))
    fresh = plan_lines(capsys, results)
    assert sorted(exp.rglob("*")) == before  # plan wrote nothing (not even the tiny base)
    assert fresh["pretrain"] == (1, 0, 1) and all(fresh[s][1] == "all new" for s in ("finetune", "sample", "classify"))

    # The trained state of the same config (base, LoRAs, pools): plan finds it by key, as run does.
    seed_trained_state(trained_small_cpu, exp)
    assert main(["pretrain", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    capsys.readouterr()
    trained = plan_lines(capsys, results)
    n_loras, n_images, n_trials = fresh["finetune"][0], fresh["sample"][0], fresh["classify"][0]
    assert trained["finetune"] == (n_loras, n_loras, 0) and trained["sample"] == (n_images, n_images, 0)
    assert trained["classify"][0] == n_trials
    assert main(["run", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    out = capsys.readouterr().out
    assert f"finetune: {n_loras} LoRAs planned, {n_loras} re-used, 0 trained" in out
    assert f"sample: {n_images} images planned, {n_images} re-used, 0 rendered" in out
    assert f"classify: {n_trials} trials planned, 0 re-used, {n_trials} to run" in out
    assert plan_lines(capsys, results)["classify"] == (n_trials, n_trials, 0)
    # status names the pretrained base the run used (models/pretrained/<key>), and no other.
    (key,) = [p.name for p in (exp / "models" / "pretrained").iterdir() if p.is_dir()]
    assert main(["status", str(SMALL_CPU), "--tiny", "-o", f"results_dir={results}"]) == 0
    assert f"pretrain: 1 pretrained base(s) ({key})" in capsys.readouterr().out
