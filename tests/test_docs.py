"""The documentation: the README's links and config, the generated configuration reference, the MkDocs site."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ooc_ray.config_reference import PAGE, reference_rows, render
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


def test_the_readme_cpu_config_for_your_own_images_loads(repo, tmp_path):
    """The README's YAML block, saved where it says (experiments/), extends the small CPU base."""
    (block,) = re.findall(r"```yaml\n(.*?)```", (repo / "README.md").read_text(), re.S)
    shutil.copytree(repo / "experiments" / "base", tmp_path / "base")
    (tmp_path / "my_cells.yaml").write_text(block)
    cfg = load_config(tmp_path / "my_cells.yaml")
    assert (cfg.name, cfg.data.source, cfg.data.classes) == ("my_cells", "data/my_cells", ("good", "bad"))
    assert cfg.generator.base == "tiny" and cfg.classify.backbone == "SmallCNN"
    assert cfg.generator.pretrain.source == "data/my_cells_unlabeled"
    assert Path(cfg.results_dir) == Path("results")
