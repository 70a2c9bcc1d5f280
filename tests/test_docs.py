"""The documentation: the README's links and config, the generated configuration reference, the MkDocs site, and
the module layers docs/architecture.md states."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from ooc_ray.cli import main
from ooc_ray.config_reference import PAGE, reference_rows, render
from ooc_ray.demo_data import make_image
from ooc_ray.load import load_config


def test_the_configuration_reference_is_current_and_every_field_says_what_it_is():
    undocumented = [row[0] for row in reference_rows() if not row[4]]
    assert not undocumented, f"config fields without a comment in ooc_ray/config.py: {undocumented}"
    assert PAGE.read_text() == render(), "docs/config-reference.md is stale: python -m ooc_ray.config_reference"


def test_the_site_builds_strict_with_every_page_in_its_nav(repo, tmp_path):
    """`mkdocs build --strict`: a broken link or a page outside the nav fails the build."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.stem for p in (repo / "docs").glob("*.md")}
    site = tmp_path / "site"
    built = {"index" if p.parent == site else p.parent.name for p in site.rglob("index.html")}
    assert built >= pages, pages - built


def test_the_readme_links_name_files_that_exist_and_is_a_five_minute_read(repo):
    readme = (repo / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links and all((repo / link).exists() for link in links), [l for l in links if not (repo / l).exists()]
    assert len(readme.split()) < 1500  # ~5 minutes at 300 words a minute


def test_the_readme_cpu_config_for_your_own_images_runs_its_data_stage(repo, tmp_path, monkeypatch):
    """The README's YAML block, saved where it says (experiments/), extends the small CPU base and reads the
    folder-per-class layout the README shows (the base's demo group column once made it fail there)."""
    (block,) = re.findall(r"```yaml\n(.*?)```", (repo / "README.md").read_text(), re.S)
    shutil.copytree(repo / "experiments" / "base", tmp_path / "experiments" / "base")
    (tmp_path / "experiments" / "my_cells.yaml").write_text(block)
    cfg = load_config(tmp_path / "experiments" / "my_cells.yaml")
    assert (cfg.name, cfg.data.source, cfg.data.classes) == ("my_cells", "data/my_cells", ("good", "bad"))
    assert cfg.generator.base == "tiny" and cfg.classify.backbone == "SmallCNN"
    assert cfg.generator.pretrain.source == "data/my_cells_unlabeled"
    assert Path(cfg.results_dir) == Path("results")
    for label in ("good", "bad"):
        (tmp_path / "data" / "my_cells" / label).mkdir(parents=True)
        for i in range(cfg.folds.k + 1):
            make_image(label, i, 32, True, seed=i).save(tmp_path / "data" / "my_cells" / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)  # the README runs it from the repository's root: relative paths from there
    assert main(["data", "experiments/my_cells.yaml"]) == 0
    manifest = pd.read_parquet(tmp_path / "results" / "my_cells" / "manifest.parquet")
    assert sorted(manifest["label"].value_counts().items()) == [("bad", cfg.folds.k + 1), ("good", cfg.folds.k + 1)]


def _layers(repo: Path) -> dict[str, int]:
    """docs/architecture.md's table: module (`sampler`, `diffusion/base`, `classify/`) -> its layer."""
    table = re.findall(r"^\| (\d) \| ([^|]+) \|", (repo / "docs" / "architecture.md").read_text(), re.M)
    return {name.rstrip("/"): int(layer) for layer, cell in table for name in re.findall(r"`([^`]+)`", cell)}


def _project_imports(tree: ast.AST, modules: set[str]):
    """(node, imported ooc_ray module) for every import of the project in a parsed module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ooc_ray"):
            yield node, node.module
            yield from ((node, f"{node.module}.{a.name}") for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            yield from ((node, a.name) for a in node.names if a.name.startswith("ooc_ray"))


def test_every_module_is_in_the_architecture_table_and_imports_point_down_without_cycles(repo):
    """Each module imports only its own layer or below; a stage (layer 5) imports no other stage; no module imports
    the project inside a function (that hides an upward arrow); and the import graph has no cycle."""
    layers = _layers(repo)
    files = {".".join(p.relative_to(repo).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (repo / "ooc_ray").rglob("*.py")}

    def entry(module: str):
        parts = module.split(".")[1:]
        return next((("/".join(parts[:n]), layers["/".join(parts[:n])]) for n in (2, 1)
                     if "/".join(parts[:n]) in layers), (None, None))

    untabled = [m for m, p in files.items() if m != "ooc_ray" and entry(m)[0] is None
                and any(True for _ in _project_imports(ast.parse(p.read_text()), set(files)))]
    assert not untabled, f"modules missing from docs/architecture.md's table: {untabled}"
    wrong, inside, graph = [], [], {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_function = {id(n) for f in functions for n in ast.walk(f)}
        own, layer = entry(module)
        for node, target in _project_imports(tree, set(files)):
            if target in files and target != module:  # a package's own name in `from ooc_ray.report import x`
                graph[module].add(target)
            if id(node) in in_function:
                inside.append(f"{module} -> {target}")
            to, to_layer = entry(target)
            if own is not None and to not in (None, own) and (to_layer > layer or to_layer == layer == 5):
                wrong.append(f"{module} (layer {layer}) -> {target} (layer {to_layer})")
    assert not wrong and not inside, (wrong, inside)
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module not in done:
            path.append(module)
            for target in sorted(graph[module]):
                visit(target)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
