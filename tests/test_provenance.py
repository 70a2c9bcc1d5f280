"""A result is re-used only when everything it was computed from is byte-identical (docs/design.md: Provenance).

Real files through the real CLI: a folder-per-class image set, `ooc-ray run`, then one change at a time, and
what re-ran is compared with what an independent reading of the manifests says changed: which LoRA training
sets (fold, class), which pools, which trials. Keys are also checked against hard-coded golden values in fresh
processes with different PYTHONHASHSEEDs."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from ooc_ray.cli import main
from ooc_ray.demo_data import make_image

# One xdist worker for the whole file (--dist loadgroup): its module fixture, a whole tiny pipeline (~95 s),
# is then built once instead of once per worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("provenance")]

CONFIG = """\
name: prov
results_dir: {root}/results
data: {{source: {root}/images}}
folds: {{k: 2, strategy: stratified}}
generator: {{base: tiny, resolution: 32, epochs: 1, repeats: 1, batch_size: 4, rank: 2, alpha: 2.0}}
sample: {{weights: [1.0, 0.5], steps: 2, resolution: 32, batch_size: 4, actors: 1}}
classify: {{backbone: EfficientNetB0, weights: random, input_size: 32, epochs: 1, batch_size: 8, ratios: [0.0, 0.5],
           synthetic_only: false, augment: [], mode: cached, max_concurrent: 1}}
quality: {{enabled: false}}
ray: {{num_cpus: 2}}
"""


def draw(path: Path, label: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(label, seed % 3, 32, False, seed).save(path)


def run(root: Path, *overrides: str) -> None:
    assert main(["run", str(root / "exp.yaml"), *[a for o in overrides for a in ("-o", o)]]) == 0


def snapshot(root: Path) -> dict:
    """What a run left, with mtimes: LoRA folders, PNGs, trial files; and the manifest it ran on."""
    out = root / "results" / "prov"
    manifest = pd.read_parquet(out / "manifest.parquet").merge(pd.read_parquet(out / "folds.parquet"), on="id")
    trials = {p.stem: p.stat().st_mtime_ns for p in (out / "trials").glob("*.parquet")}
    return {"manifest": manifest, "trials": trials,
            "loras": {p.name: (p / "metadata.json").stat().st_mtime_ns for p in (out / "lora").iterdir() if p.is_dir()},
            "pngs": {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "synthetic").rglob("*.png")},
            "current": pd.read_parquet(out / "synthetic.parquet"),
            "rows": pd.concat([pd.read_parquet(out / "trials" / f"{k}.parquet") for k in trials], ignore_index=True),
            "report": (out / "report" / "report.md").read_text(), "summary": pd.read_csv(out / "report" / "summary.csv")}


def made(before: dict, after: dict, kind: str) -> set:
    """Names (re)made by the later run: new, or rewritten."""
    return {k for k, t in after[kind].items() if before[kind].get(k) != t}


def training_sets(manifest: pd.DataFrame) -> dict:
    """(fold, class) -> the (id, sha256) pairs a LoRA of that fold and class learns from (split "fold")."""
    return {(f, c): frozenset(manifest[(manifest.fold != f) & (manifest.label == c)][["id", "sha256"]]
                              .itertuples(index=False, name=None))
            for f in sorted(manifest.fold.unique()) for c in sorted(manifest.label.unique())}


def fold_sets(manifest: pd.DataFrame) -> dict:
    """fold -> (its training images with labels, its held-out images with labels)."""
    cols = ["id", "sha256", "label"]
    return {f: (frozenset(manifest[manifest.fold != f][cols].itertuples(index=False, name=None)),
                frozenset(manifest[manifest.fold == f][cols].itertuples(index=False, name=None)))
            for f in sorted(manifest.fold.unique())}


def check_exact_reruns(before: dict, after: dict) -> None:
    """What re-ran is exactly what an independent reading of the two manifests says changed."""
    old_sets, new_sets = training_sets(before["manifest"]), training_sets(after["manifest"])
    changed = {fc for fc in new_sets if old_sets.get(fc) != new_sets[fc]}
    retrained = {tuple(name.split("_")[:2]) for name in made(before, after, "loras")}
    assert retrained == {(f"fold{f}", c) for f, c in changed}
    assert 0 < len(changed) <= len(new_sets)
    # pools: a retrained LoRA's images are all new; an unchanged LoRA's existing images are all re-used
    new_loras = made(before, after, "loras")
    for path, lora in zip(after["current"]["path"], after["current"]["lora_key"]):
        rel = path.split("results/prov/", 1)[1]
        if lora in new_loras:
            assert rel not in before["pngs"], rel
        elif rel in before["pngs"]:
            assert after["pngs"][rel] == before["pngs"][rel], f"re-rendered an image of an unchanged LoRA: {rel}"
    # trials: in k-fold CV every trial reads every image (as training or held-out), so any change to the data
    # changes every trial's inputs: all 6 (2 folds x (real, +50 % at 2 weights)) run again, none is re-used
    rows = after["rows"].set_index("trial_key")
    again = made(before, after, "trials")
    assert len(again) == 6 and rows.loc[list(again), "data_digest"].nunique() == 1
    current = set(rows.index[rows["data_digest"] == rows.loc[list(again), "data_digest"].iloc[0]])
    assert current == again


def check_report_is_new(before: dict, after: dict) -> None:
    assert f"- data: {len(after['manifest'])} images" in after["report"]
    rows = after["rows"].set_index("trial_key").loc[list(made(before, after, "trials"))]
    shown = after["summary"]
    assert shown.loc[shown["arm"] == "real only", "accuracy_mean"].iloc[0] == \
        pytest.approx(rows.loc[rows["ratio"] == 0, "accuracy"].mean())
    assert shown.loc[shown["arm"] == "real only", "n_folds"].iloc[0] == 2


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    for label, count in (("good", 8), ("bad", 8)):
        for i in range(count):
            draw(root / "images" / label / f"{label}_{i:02d}.png", label, 100 * len(label) + i)
    (root / "exp.yaml").write_text(CONFIG.format(root=root))
    run(root)
    return root


@pytest.fixture
def copy(baseline, tmp_path):
    """The baseline's images and results in a fresh folder (mtimes kept), with its config re-pointed."""
    root = tmp_path / "copy"
    shutil.copytree(baseline, root, copy_function=shutil.copy2)
    (root / "exp.yaml").write_text(CONFIG.format(root=root))
    return root


def test_moved_folder_and_resource_changes_rerun_nothing(copy, capsys):
    before = snapshot(copy)
    run(copy, "sample.batch_size=3", "sample.actors=2", "classify.max_concurrent=2", "classify.cpus_per_trial=2",
        "generator.gpus=0", "ray.storage_path=" + str(copy / "elsewhere"))
    after = snapshot(copy)
    assert not made(before, after, "loras") and not made(before, after, "pngs") and not made(before, after, "trials")
    out = capsys.readouterr().out
    assert "0 trained" in out and "0 rendered" in out and "0 to run" in out
    # The moved pools keep their records (their rows name the old folder): each image's cost, node and libraries
    # as first rendered, and each pool.parquet its rows once (absolute paths lost all three, and appended the
    # pools again).
    synthetic = pd.read_parquet(copy / "results" / "prov" / "synthetic.parquet")
    assert synthetic["render_s"].notna().all() and (synthetic[["node_host", "versions"]] != "").all().all()
    pools = list((copy / "results" / "prov" / "synthetic").rglob("pool.parquet"))
    assert pools and not any(pd.read_parquet(pool)["index"].duplicated().any() for pool in pools)


def test_dropping_a_lora_weight_reruns_nothing_for_the_others(copy, capsys):
    before = snapshot(copy)
    run(copy, "sample.weights=[1.0]")
    after = snapshot(copy)
    assert not made(before, after, "loras") and not made(before, after, "pngs") and not made(before, after, "trials")
    assert set(after["current"]["weight"]) == {1.0}
    assert "LoRA weight 0.5" not in after["report"] and "LoRA weight 1" in after["report"]
    # trials/ holds exactly the current plan (a glob of it is never stale); the others wait in superseded/
    assert len(after["trials"]) == 4 and set(after["trials"]) < set(before["trials"])
    assert len(list((copy / "results" / "prov" / "superseded" / "trials").glob("*.parquet"))) == 2
    capsys.readouterr()
    run(copy)  # the weight comes back: its trials come back too, nothing runs
    assert snapshot(copy)["trials"] == before["trials"] and "0 to run" in capsys.readouterr().out


def test_bytes_replaced_in_place(copy):
    before = snapshot(copy)
    target = copy / "images" / "bad" / "bad_03.png"
    draw(target, "bad", 999)  # same path, other bytes
    run(copy)
    after = snapshot(copy)
    assert len(made(before, after, "loras")) == 1  # the one LoRA (other fold, same class) that learns from it
    check_exact_reruns(before, after)
    check_report_is_new(before, after)


CHANGES = {
    "add": lambda images: draw(images / "good" / "good_99.png", "good", 4242),
    "remove": lambda images: (images / "bad" / "bad_05.png").unlink(),
    "relabel": lambda images: shutil.move(images / "good" / "good_05.png", images / "bad" / "good_05.png"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_add_remove_relabel_retrain_exactly_the_loras_that_learn_from_it(copy, change):
    """Each kind of change alone, through `ooc-ray data` + `ooc-ray finetune` (seconds): exactly the LoRAs
    whose training set changed are trained again."""
    before = snapshot(copy)
    CHANGES[change](copy / "images")
    for stage in ("data", "finetune"):
        assert main([stage, str(copy / "exp.yaml")]) == 0
    after = snapshot(copy)
    assert len(after["manifest"]) == {"add": 17, "remove": 15, "relabel": 16}[change]
    old_sets, new_sets = training_sets(before["manifest"]), training_sets(after["manifest"])
    changed = {(f"fold{f}", c) for (f, c), images in new_sets.items() if old_sets.get((f, c)) != images}
    assert {tuple(name.split("_")[:2]) for name in made(before, after, "loras")} == changed != set()


def test_add_remove_relabel_together_through_the_whole_pipeline(copy):
    """All three at once through `ooc-ray run`: LoRAs, pools and trials re-run exactly where inputs changed."""
    before = snapshot(copy)
    for change in CHANGES.values():
        change(copy / "images")
    run(copy)
    after = snapshot(copy)
    assert len(after["manifest"]) == 16
    assert len(after["trials"]) == 6  # the 6 trials of the old data moved to superseded/
    check_exact_reruns(before, after)
    check_report_is_new(before, after)


GOLDEN = textwrap.dedent("""
    import pandas as pd
    from ooc_ray import keys
    from ooc_ray.config import ExperimentConfig
    cfg = ExperimentConfig()
    images = pd.DataFrame({"id": ["b", "a"], "sha256": ["2" * 64, "1" * 64], "label": ["bad", "good"],
                           "group": ["", ""], "source": ["real", "real"], "fold": [1, 0], "weight": [1.0, 1.0]})
    print(keys.data_digest(images))
    print(keys.lora_key(cfg, "tiny-abc", "a microscopy image of good cells", images))
    print(keys.pool_key(cfg, "tiny-abc", "f" * 64, None))
    print(keys.features_key(cfg.classify, "imagenet", 1))
    print(keys.trial_key(cfg, {"fold": 0, "ratio": 0.5, "weight": 0.8, "synthetic_only": False}, ["good", "bad"],
                         images, images.iloc[:1], "imagenet"))
    print(keys.search_run_key(cfg, "tiny-abc", "imagenet", images))
    print(keys.search_trial_key(cfg, {"generator.rank": 8, "sample.weights": 0.8}, ["l1"], images, "f"))
""")


@pytest.mark.parametrize("hashseed", ["0", "4242", "random"])
def test_keys_are_golden_in_any_process(hashseed):
    """Keys written by one process must be found by the next, on any machine. If this fails after a change to
    the config's result fields or to keys.py, every user's results re-run: make that change on purpose."""
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run([sys.executable, "-c", GOLDEN], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [
        "183fd7ab09dd968279101c52b30a25d5449a727a31a70ce003b0f43af58cccc3",  # data digest (full sha256)
        # lora, pool, features, trial. Features and trial changed on purpose with the default augmentation (now the
        # Keras EfficientNet example's: rotation, translation, flip, contrast; was flip, rotation, zoom, contrast).
        "c867ef86787949bd", "efa6896bae766234", "84d4c4c718aebf85", "63c26d9f1d281915",
        # a search run and trial whose space holds the weight, at real_fraction 1: as before 2026-12-06's keys
        # took the weight (where no dimension varies it) and a real_fraction below 1 (checked on 7dd4a4d's code)
        "62f3fb9b5be63f1a", "7c5707b779186d8a",
    ]


def test_this_file_runs_on_one_xdist_worker(request):
    """`--dist loadgroup` (CI) must keep this file on one worker, or each worker builds the ~100 s baseline: xdist
    groups by appending '@<group>' to node ids, which pytest 9.2 ignores (measured: two 100 s builds side by side;
    pyproject pins pytest below 9.2)."""
    if request.config.getoption("dist", "no") == "loadgroup":
        assert request.node.nodeid.endswith("@provenance"), f"xdist_group ignored by pytest {pytest.__version__}"
