"""Every library the package and its tests import is declared in pyproject.toml (a dependency that only
arrives through another one, as jsonschema did through Ray, disappears when that one changes), the analysis
install (the base dependencies alone) reports and queries without the pipeline's frameworks, and the install
script refuses a device choice it does not know."""
import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"ooc_ray"} | {p.stem for p in (ROOT / "tests").glob("*.py")}  # the package, helpers, other test files


def imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - LOCAL - set(sys.stdlib_module_names)


def declared(*extras: str) -> set[str]:
    """Distribution names ooc-ray requires (with `extras`: also theirs, and those of the extras they name,
    such as pipeline's "ooc-ray[pipeline-torch]"), normalised."""
    out = set()
    for requirement in importlib.metadata.requires("ooc-ray"):
        name, _, marker = requirement.partition(";")
        if not marker or any(f'extra == "{extra}"' in marker for extra in extras):
            distribution = re.split(r"[\s\[<>=!~]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")
            if distribution == "ooc-ray":
                out |= declared(*re.search(r"\[(.*)\]", name).group(1).split(","))
            else:
                out.add(distribution)
    return out


def distributions(modules: set[str]) -> dict[str, set[str]]:
    owners = importlib.metadata.packages_distributions()
    # A module of an extra this environment lacks (jax) has no owner here: its distribution bears its name.
    return {m: {d.lower().replace("_", "-") for d in owners.get(m, [m])} for m in modules}


def test_the_package_imports_only_declared_libraries():
    """The base dependencies, the `pipeline` extra's frameworks, and mlflow from the optional `tracking` extra
    (imported only with tracking on)."""
    found = distributions(imported_modules(ROOT / "ooc_ray"))
    assert not {m: d for m, d in found.items() if not d & declared("pipeline", "tracking", "jax")}
    assert {m for m, d in found.items() if not d & declared("pipeline")} == {"mlflow", "jax"}
    assert "tensorflow" not in declared("pipeline-torch") and "keras" in declared("pipeline-torch")
    assert "packaging" in found and "scipy" in found  # the scan sees function-level imports
    assert not {"torch", "tensorflow", "diffusers", "ray", "keras"} & declared()  # the base is the analysis install


PIPELINE_FRAMEWORKS = ("torch", "tensorflow", "diffusers", "ray", "keras", "transformers", "peft", "mlflow")
QUERIES = r"""
import re, sys, duckdb
folder, page = sys.argv[1], open(sys.argv[2]).read()
for query in re.findall(r"```sql\n(.*?)```", page, re.S):
    print(len(duckdb.connect().execute(query.replace("results/demo/", folder + "/")).df()))
"""


@pytest.mark.slow
def test_the_analysis_install_reports_and_queries_without_the_pipeline_frameworks(tmp_path):
    """`pip install -e .[analysis]` alone in a clean venv: `ooc-ray report` writes the tables the full install
    writes, the SQL queries of docs/results.md give the rows they give here, none of torch, TensorFlow,
    diffusers, Ray or Keras is there, and a stage that needs them says which install it needs."""
    from test_report import example_trials, write_report

    from ooc_ray.fields import to_dict
    from ooc_ray.report import run_report

    cfg, paths, _, _ = write_report(tmp_path / "results", example_trials())
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    run_report(cfg, paths)  # this (full) install's report

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: byte-compiling every installed module was half the install (21.7 s vs 10.0 s, measured); the
    # commands below compile only what they import.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "-e", f"{ROOT}[analysis]"], check=True)
    python = str(venv / "bin" / "python")
    present = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                              f"{PIPELINE_FRAMEWORKS} if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert present.stdout.strip() == "[]"

    out = tmp_path / "analysis_report"
    done = subprocess.run([str(venv / "bin" / "ooc-ray"), "report", str(config), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tables = sorted(p.name for p in paths.report.glob("*.csv"))
    assert "summary.csv" in tables and sorted(p.name for p in out.glob("*.csv")) == tables
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(paths.report / table))
    assert (out / "report.html").stat().st_size > 0

    page = ROOT / "docs" / "results.md"
    there = subprocess.run([python, "-c", QUERIES, str(paths.root), str(page)], capture_output=True, text=True)
    here = subprocess.run([sys.executable, "-c", QUERIES, str(paths.root), str(page)], capture_output=True, text=True)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout and len(there.stdout.split()) == 3

    stage = subprocess.run([str(venv / "bin" / "ooc-ray"), "finetune", str(config)], capture_output=True, text=True)
    assert stage.returncode == 1
    assert "no module named 'torch': this command needs the pipeline install" in stage.stderr


def test_the_tests_and_benchmarks_import_only_declared_libraries():
    modules = imported_modules(ROOT / "tests") | imported_modules(ROOT / "benchmarks")
    found = distributions(modules)
    assert not {m: d for m, d in found.items() if not d & declared("pipeline", "test")}
    assert "jsonschema" in found


@pytest.mark.parametrize("setting, message", [("OOC_RAY_DEVICE=tpu", "choose cpu or gpu"),
                                              ("OOC_RAY_BACKEND=mxnet", "choose tensorflow, torch or jax")])
def test_the_install_script_refuses_an_unknown_choice_before_installing_anything(tmp_path, setting, message):
    variable, value = setting.split("=")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env={variable: value,
                            "OOC_RAY_DEVICE": "cpu" if variable != "OOC_RAY_DEVICE" else value,
                            "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{setting}: {message}" in result.stderr


def test_the_classify_quality_and_report_drivers_import_no_keras_until_a_trial_runs():
    """The classify stage's driver plans, checks and collects trials without Keras or TensorFlow (~4.4 s of CPU per
    process); ooc_ray.classify.run_trial, what a Tune worker runs, loads them on first use."""
    code = ("import sys, ooc_ray.classify, ooc_ray.classify.grid, ooc_ray.quality, ooc_ray.report\n"
            "from ooc_ray.classify import TrialContext, run_classify\n"
            "before = sorted(m for m in ('keras', 'tensorflow') if m in sys.modules)\n"
            "from ooc_ray.classify import run_trial\n"
            "print(before, sorted(m for m in ('keras', 'tensorflow') if m in sys.modules), run_trial.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[] ['keras', 'tensorflow'] ooc_ray.classify.train"
