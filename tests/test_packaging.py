"""Every library the package and its tests import is declared in pyproject.toml (a dependency that only
arrives through another one, as jsonschema did through Ray, disappears when that one changes), and the
install script refuses a device choice it does not know."""
import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"ooc_ray", "helpers", "conftest"}


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
    """Distribution names ooc-ray requires (with `extras`: also theirs), normalised."""
    out = set()
    for requirement in importlib.metadata.requires("ooc-ray"):
        name, _, marker = requirement.partition(";")
        if not marker or any(f'extra == "{extra}"' in marker for extra in extras):
            out.add(re.split(r"[\s\[<>=!~]", name.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return out


def distributions(modules: set[str]) -> dict[str, set[str]]:
    owners = importlib.metadata.packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in owners.get(m, [])} for m in modules}


def test_the_package_imports_only_declared_libraries():
    """The base dependencies, and mlflow from the optional `tracking` extra (imported only with tracking on)."""
    found = distributions(imported_modules(ROOT / "ooc_ray"))
    assert not {m: d for m, d in found.items() if not d & declared("tracking")}
    assert {m for m, d in found.items() if not d & declared()} == {"mlflow"}
    assert "packaging" in found and "scipy" in found  # the scan sees function-level imports


def test_the_tests_and_benchmarks_import_only_declared_libraries():
    modules = imported_modules(ROOT / "tests") | imported_modules(ROOT / "benchmarks")
    found = distributions(modules)
    assert not {m: d for m, d in found.items() if not d & declared("test")}
    assert "jsonschema" in found


def test_the_install_script_refuses_an_unknown_device_before_installing_anything(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env={"OOC_RAY_DEVICE": "tpu",
                            "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "OOC_RAY_DEVICE=tpu: choose cpu or gpu" in result.stderr
