"""Report numbers against hand-computed ones on a fixed trial table; report.html read back and opened in a
headless browser."""
import base64
import dataclasses
import html
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ooc_ray.comparisons import naive_baseline, paired_differences
from ooc_ray.report.render import display_table, to_markdown
from ooc_ray.report.tables import summary_tables

CLASSES = ["good", "acceptable", "bad"]


def _trial(fold, weight, ratio, acc, synthetic_only=False):
    return {"fold": fold, "weight": weight, "ratio": ratio, "synthetic_only": synthetic_only, "accuracy": acc,
            "n_train_real": 0 if synthetic_only else 12, "n_test": 6,
            "precision_macro": acc - 0.1, "recall_macro": acc - 0.2, "f1_macro": acc - 0.3,
            "classes": CLASSES, "confusion": [[2, 1, 0], [0, 3, 0], [0, 0, 1]]}


@pytest.fixture
def trials():
    return example_trials()


def example_trials() -> pd.DataFrame:
    """Three folds of four arms (real, +50 % at weights 1.0 and 0.8, synthetic only) with known accuracies."""
    rows = []
    real = [0.70, 0.72, 0.74]
    plus50_w1 = [0.71, 0.74, 0.74]
    plus50_w08 = [0.70, 0.72, 0.74]  # identical to real: no test possible
    syn_w1 = [0.60, 0.62, 0.61]
    for f in range(3):
        rows.append(_trial(f, float("nan"), 0.0, real[f]))
        rows.append(_trial(f, 1.0, 0.5, plus50_w1[f]))
        rows.append(_trial(f, 0.8, 0.5, plus50_w08[f]))
        rows.append(_trial(f, 1.0, 1.0, syn_w1[f], synthetic_only=True))
    return pd.DataFrame(rows)


def test_a_grid_without_real_only_says_so_rather_than_too_few_folds(trials):
    """classify.ratios without 0.0 runs no real-only trial: every row printed "undefined (fewer than 2 paired
    folds)", the wrong reason; now it names what is missing."""
    tables = summary_tables(trials[trials["ratio"] > 0])
    rows = pd.concat(tables.values())
    assert (rows["verdict"] == "undefined (no real-only trials)").all() and rows["undefined"].str.contains(
        "classify.ratios has no 0.0").all()


def test_summary_tables_by_hand(trials):
    tables = summary_tables(trials)
    assert list(tables) == [1.0, 0.8]  # weights high to low, like the paper's Table I then II
    t1 = tables[1.0]
    assert t1["arm"].tolist() == ["real only", "real + 50% synthetic", "synthetic only"]
    real, plus, syn = t1.iloc[0], t1.iloc[1], t1.iloc[2]
    assert real["accuracy_mean"] == pytest.approx(0.72) and real["accuracy_std"] == pytest.approx(0.02)
    assert real["recall_macro_mean"] == pytest.approx(0.52)
    assert math.isnan(real["paired_t_p"])  # real only is the reference row
    # differences (0.01, 0.02, 0.00): mean 0.01, sd 0.01, t = sqrt(3), df 2 -> p = 1 - t/sqrt(t^2 + 2)
    assert plus["accuracy_mean"] == pytest.approx(0.73)
    assert plus["accuracy_diff_vs_real"] == pytest.approx(0.01)
    assert plus["paired_t_p"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), abs=1e-9)
    assert syn["accuracy_mean"] == pytest.approx(0.61) and syn["accuracy_std"] == pytest.approx(0.01)
    assert syn["accuracy_diff_vs_real"] == pytest.approx(-0.11)
    t08 = tables[0.8]
    assert t08["arm"].tolist() == ["real only", "real + 50% synthetic"]
    assert t08.iloc[1]["accuracy_diff_vs_real"] == pytest.approx(0.0)
    assert math.isnan(t08.iloc[1]["paired_t_p"])  # all differences zero: no test


def test_corrected_t_and_holm_in_the_tables_by_hand(trials):
    """3 folds, n_test / n_train = 6 / 12 (real only's), so the variance factor is 1/3 + 1/2 = 5/6; df 2, where
    the two-sided p of t is 1 - |t| / sqrt(t^2 + 2)."""
    t1 = summary_tables(trials)[1.0]
    plus, syn = t1.iloc[1], t1.iloc[2]
    # +50 %: differences 0.01, 0.02, 0.00; variance 1e-4; se = sqrt(5/6 x 1e-4) = 0.0091287; t = 1.095445
    assert plus["corrected_p"] == pytest.approx(1 - 1.095445 / math.sqrt(1.095445 ** 2 + 2), abs=1e-6)
    half = 4.302653 * 0.0091287  # t_0.975,2 = 4.302653 (tables: 4.303)
    assert (plus["diff_ci_low"], plus["diff_ci_high"]) == pytest.approx((0.01 - half, 0.01 + half), abs=1e-6)
    # synthetic only: differences -0.10, -0.10, -0.13; variance 3e-4; se = 0.0158114; t = -6.957011
    assert syn["corrected_p"] == pytest.approx(1 - 6.957011 / math.sqrt(6.957011 ** 2 + 2), abs=1e-6)
    # Holm over the two arms: 0.020042 x 2 = 0.040084; then max(0.040084, 0.387628 x 1)
    assert syn["holm_p"] == pytest.approx(0.040084, abs=1e-5)
    assert plus["holm_p"] == pytest.approx(0.387628, abs=1e-5)
    assert math.isnan(t1.iloc[0]["holm_p"])  # real only is the reference, not a test
    assert plus["corrected_p"] > plus["paired_t_p"]  # the correction widens what the plain test claims


def test_display_and_markdown(trials):
    shown = display_table(summary_tables(trials)[1.0])
    assert shown.loc[0, "accuracy"] == "0.720 ± 0.020"
    assert shown.loc[1, "Δacc vs real"] == "+0.010"
    assert shown.loc[1, "95% CI (corrected t)"] == "[-0.029, +0.049]" and shown.loc[1, "p (Holm)"] == "0.388"
    assert shown.loc[0, "p (corrected t)"] == "" and shown.loc[1, "95% CI (bootstrap)"] == ""  # no predictions
    md = to_markdown(shown)
    assert md.splitlines()[0].startswith("| training set | folds | accuracy")
    assert "| real + 50% synthetic | 3 | 0.730 ± 0.017" in md


def test_paired_tests_pairs_by_fold():
    real = pd.Series([0.5, 0.6, 0.7], index=[0, 1, 2])
    other = pd.Series([0.8, 0.6], index=[2, 1])  # fold 0 missing, order shuffled
    out = paired_differences(real, other)
    assert out["n_pairs"] == 2 and out["mean_diff"] == pytest.approx(0.05)


def test_naive_baseline():
    from helpers import make_manifest

    m = make_manifest((6, 4), k=2, labels=("a", "b"))  # image j of a class held out in fold j % 2
    out = naive_baseline(m)
    assert out["overall"] == pytest.approx(0.6)
    # fold 0 test = 3 a + 2 b: train majority a -> 3/5; fold 1 the same
    assert out["per_fold_mean"] == pytest.approx(0.6)


def write_report(tmp_path, trials):
    """A demo data set, its synthetic table and the fixture's trials filed under this config's keys, plus one
    trial of another config; returns (cfg, paths, planned keys, data digest)."""
    from helpers import fake_synthetic

    from ooc_ray import keys
    from ooc_ray.load import from_dict
    from ooc_ray.data import run_data
    from ooc_ray.io import write_parquet
    from ooc_ray.paths import ExperimentPaths
    from ooc_ray.trainsets import plan_trials

    cfg = from_dict({"name": "r", "results_dir": str(tmp_path), "folds": {"k": 3},
                     "data": {"classes": CLASSES, "demo": {"per_class": [6, 6, 6], "size": 32}},
                     "generator": {"split": "fold"}, "sample": {"weights": [1.0, 0.8]},
                     "classify": {"ratios": [0.0, 0.5], "synthetic_only": True}})
    paths = ExperimentPaths.of(cfg)
    m = run_data(cfg, paths)
    synthetic = fake_synthetic(m, (1.0, 0.8), root=paths.root).assign(sample_settings=keys.sample_settings(cfg))
    write_parquet(synthetic, paths.synthetic_table)
    planned = {(t.spec.fold, -1.0 if t.spec.weight is None else t.spec.weight, t.spec.ratio, t.spec.synthetic_only):
               t.key for t in plan_trials(cfg, m, synthetic, "imagenet")}
    paths.trials.mkdir(parents=True)
    digest = keys.data_digest(m)
    paths.predictions.mkdir(parents=True)
    for i, row in trials.iterrows():
        key = planned[(row["fold"], -1.0 if pd.isna(row["weight"]) else row["weight"], row["ratio"],
                       row["synthetic_only"])]
        pd.DataFrame([{**row, "trial_key": key, "data_digest": digest}]).to_parquet(paths.trials / f"{key}.parquet")
        # Of the fold's 6 held-out images, the first round(20 x (accuracy - 0.55)) are predicted right: 3-4 for
        # real only, 1 for synthetic only (with 6 images, round(6 x accuracy) would be 4 for both).
        held = m[m["fold"] == row["fold"]].sort_values("id")
        right = np.arange(len(held)) < round(20 * (row["accuracy"] - 0.55))
        pd.DataFrame({"trial_key": key, "id": held["id"].to_numpy(), "file": held["file"].to_numpy(),
                      "label_index": held["label_index"].to_numpy(),
                      "pred_index": np.where(right, held["label_index"], (held["label_index"] + 1) % 3)}
                     ).to_parquet(paths.predictions / f"{key}.parquet")
    pd.DataFrame([{**trials.iloc[0], "trial_key": "other-config", "data_digest": "x"}]).to_parquet(
        paths.trials / "old.parquet")
    return cfg, paths, planned, digest


def test_run_report_writes_everything(tmp_path, trials):
    from ooc_ray.errors import DataError
    from ooc_ray.report import run_report

    cfg, paths, planned, digest = write_report(tmp_path, trials)
    text = run_report(cfg, paths).read_text()
    assert "- trials: 12" in text  # the other config's trial file is not reported
    assert f"manifest digest `{digest[:16]}`" in text and "18 images in 3 classes" in text
    assert "generator protocol: **fold**" in text and "naive (majority class) accuracy: 0.333" in text
    for name in ["table_w1.csv", "table_w1.md", "table_w1.tex", "table_w0.8.md", "summary.csv",
                 "accuracy_vs_ratio.png", "confusion_matrices.png", "real_vs_synthetic.png", "report.html"]:
        assert (paths.report / name).stat().st_size > 0, name
    tex = (paths.report / "table_w1.tex").read_text()
    # pdflatex stops at a raw Δ; the table's symbols come as LaTeX commands, and nothing else is outside ASCII
    assert "\\begin{tabular}" in tex and "$\\Delta$acc vs real" in tex and " $\\pm$ " in tex and tex.isascii()
    assert "Nadeau-Bengio corrected resampled t-test" in text and "Design sensitivity" in text
    assert "| TOST p (Holm) | verdict |" in text and "**TOST p (Holm)**: two one-sided" in text
    # The bootstrap CI over the images, checked against the difference counted straight from the files.
    table = pd.read_csv(paths.report / "table_w1.csv")
    syn = table[table["synthetic_only"]].iloc[0]
    preds = {k: pd.read_parquet(paths.predictions / f"{k}.parquet") for k in planned.values()
             if (paths.predictions / f"{k}.parquet").exists()}

    def hits(weight, ratio, only):
        return sum(int((preds[k]["pred_index"] == preds[k]["label_index"]).sum())
                   for (_, w, r, o), k in planned.items() if (w, r, o) == (weight, ratio, only))
    counted = (hits(1.0, 1.0, True) - hits(-1.0, 0.0, False)) / 18
    assert counted == (3 - 10) / 18  # 3 right of 18 vs 10 right of 18
    assert syn["bootstrap_ci_low"] <= counted <= syn["bootstrap_ci_high"] < 0
    # a trial file of other data under a current key (a copied folder, a bug): refused, never mixed
    key = next(iter(planned.values()))
    pd.DataFrame([{**trials.iloc[0], "trial_key": key, "data_digest": "0" * 64}]).to_parquet(paths.trial(key))
    with pytest.raises(DataError, match=r"trials of data 000000000000, \w{12} would share one table with the "
                                       r"manifest's \(\w{12}\); run `ooc-ray run`"):
        run_report(cfg, paths)


def test_the_report_says_which_quality_measure_predicted_the_accuracy_change(tmp_path, trials):
    """Pools of 3 folds x 2 weights: real + 50 % changes accuracy by +0.01, +0.02, 0 (weight 1.0) and 0, 0, 0
    (weight 0.8) over the fold's real only; a measure built to follow the change. Within folds (2 pools each)
    that leaves n_eff = 6 - 3 = 3, too few: the report's table says so for every measure rather than a rho over
    pools that share their fold's real-only trial; synthetic only (weight 1.0 only: one pool a fold) has none."""
    from ooc_ray.io import write_parquet
    from ooc_ray.report import run_report

    cfg, paths, _, _ = write_report(tmp_path, trials)
    precision = {(0, 1.0): 0.6, (1, 1.0): 0.9, (2, 1.0): 0.3, (0, 0.8): 0.2, (1, 0.8): 0.4, (2, 0.8): 0.1}
    write_parquet(pd.DataFrame([{"fold": f, "weight": w, "label": label, "precision": p + offset, "kid": 0.5}
                                for (f, w), p in precision.items() for label, offset in zip(CLASSES, (-0.1, 0, 0.1))]),
                  paths.quality)
    text = run_report(cfg, paths).read_text()
    assert "## Which quality measure predicted usefulness" in text and "both centred within the fold" in text
    validity = pd.read_csv(paths.report / "measure_validity.csv").set_index(["arm", "measure"])
    row = validity.loc[("real+50%", "precision")]
    assert row["n_eff"] == 3 and row["verdict"] == "not estimable"
    assert validity.loc[("real+50%", "kid"), "verdict"] == "not estimable"  # no spread
    assert validity.loc[("synthetic_only", "precision"), "n_eff"] == 0
    assert validity.loc[("synthetic_only", "precision"), "verdict"] == "not estimable"


def test_a_quality_cell_without_a_value_in_every_fold_is_empty_not_the_mean_of_the_others(tmp_path, trials):
    """k-NN measures have no value for a class with at most k images in a fold: the table's "mean over folds"
    is then left empty (the demo printed fold 0's precision alone as the mean), and the pool's mean over classes
    is not taken from the other classes (measure validity drops that pool)."""
    from ooc_ray.io import write_parquet
    from ooc_ray.report import run_report

    cfg, paths, _, _ = write_report(tmp_path, trials)
    rows = [{"fold": f, "weight": w, "label": label, "kid": 0.1 * f + i, "precision": 0.2 * i + 0.1 * f}
            for f in range(3) for w in (1.0, 0.8) for i, label in enumerate(CLASSES)]
    for row in rows:
        if row["label"] == CLASSES[2] and row["weight"] == 0.8 and row["fold"] > 0:
            row["precision"] = np.nan  # too few images of that class in folds 1 and 2
    write_parquet(pd.DataFrame(rows), paths.quality)
    text = run_report(cfg, paths).read_text()
    table = text[text.index("## Synthetic quality per class"):].split("\n\n")[2].splitlines()
    cells = {tuple(row[:2]): row[2:4] for row in ([c.strip() for c in line.strip("|").split("|")]
                                                 for line in table[2:])}
    assert cells[("0.8", CLASSES[2])] == ["2.1", ""]  # kid over 3 folds (2.0, 2.1, 2.2); precision: none
    assert cells[("0.8", CLASSES[1])] == ["1.1", "0.3"]
    validity = pd.read_csv(paths.report / "measure_validity.csv").set_index(["arm", "measure"])
    # pools (1, 0.8) and (2, 0.8) have no mean: folds 1 and 2 keep one pool each, which says nothing within a fold
    assert validity.loc[("real+50%", "precision"), "n_eff"] == 2 - 1


def test_equivalence_verdicts_are_holm_adjusted_over_the_family_as_better_and_worse_are():
    """Each TOST holds only its own level: 8 arms on the margin gave a false "equivalent" somewhere in 32 % of
    simulated reports. Two comparisons with TOST p 0.03 and 0.04: Holm 0.06 and 0.06, inconclusive both; the
    first alone (a family of one) stays equivalent."""
    from ooc_ray.report.tables import apply_family

    def table():
        return pd.DataFrame({"comparison": ["a", "b"], "corrected_p": [0.5, 0.6], "tost_p": [0.03, 0.04],
                             "accuracy_diff_vs_real": [0.001, -0.002], "undefined": ["", ""]})

    both = table()
    assert apply_family([both], 0.02) == 2
    assert both["tost_holm_p"].tolist() == [pytest.approx(0.06), pytest.approx(0.06)]
    assert both["verdict"].tolist() == ["inconclusive", "inconclusive"]
    alone = table().iloc[:1].copy()
    apply_family([alone], 0.02)
    assert alone["tost_holm_p"].tolist() == [pytest.approx(0.03)] and alone["verdict"].tolist() == ["equivalent (±0.02)"]


class PageParts(HTMLParser):
    """What a browser would fetch or show, read with the standard library's parser (not Markdown's)."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.tables, self.rows, self.text = [], [], 0, 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tables += tag == "table"
        self.rows += tag == "tr"
        if tag in ("img", "script", "iframe") and "src" in attrs:
            self.sources.append(attrs["src"])
        if tag == "link" and "href" in attrs:
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_is_one_file_with_the_markdown_tables_and_every_image_embedded(tmp_path, trials):
    from ooc_ray.report import run_report

    cfg, paths, _, digest = write_report(tmp_path, trials)
    markdown_text = run_report(cfg, paths).read_text()
    page = PageParts()
    page.feed((paths.report / "report.html").read_text())
    tables = [block for block in markdown_text.split("\n\n") if block.startswith("| ")]
    assert page.tables == len(tables) >= 2  # LoRA weight 1 and 0.8
    assert page.rows == sum(block.count("\n") for block in tables)  # header + body rows (the rule is no row)
    assert not page.links and all(src.startswith("data:image/png;base64,") for src in page.sources)
    shown = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown_text)
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.sources] == [
        (paths.report / name).read_bytes() for name in shown]
    text = " ".join(page.text)
    assert digest[:16] in text and "generator protocol" in text and "± 0.020" in text
    # Every table scrolls in its own box (a dozen statistics per arm are wider than the page).
    html_text = (paths.report / "report.html").read_text()
    assert html_text.count('<div class="table-scroll"><table>') == page.tables
    assert html_text.count("</table></div>") == page.tables and "position: sticky" in html_text


def test_the_image_grid_stretches_a_low_contrast_tile_for_display_only(tmp_path):
    """A phase-contrast-like image (grey levels 120-130 of 255) fills 0-255 in the report's grid, the file on disk
    unchanged; a flat image stays flat."""
    from PIL import Image

    from ooc_ray.report.plots import image_grid, stretch_contrast

    rng = np.random.default_rng(0)
    faint = tmp_path / "faint.png"
    Image.fromarray(rng.integers(120, 131, (32, 32, 3), dtype=np.uint8)).save(faint)
    before = faint.read_bytes()
    manifest = pd.DataFrame({"id": ["a"], "path": [str(faint)], "label": ["good"], "label_index": [0]})
    synthetic = pd.DataFrame({"path": [str(faint)], "label": ["good"], "weight": [1.0]})
    grid = np.asarray(Image.open(image_grid(manifest, synthetic, tmp_path / "grid.png", size=32)).convert("L"))
    tile = grid[:32, 130:162]  # the real row's first tile, right of the 130 px label column
    assert tile.min() <= 3 and tile.max() >= 252 and faint.read_bytes() == before
    low, high = np.percentile(np.asarray(Image.open(faint)), (1, 99))
    assert np.abs(np.asarray(stretch_contrast(Image.open(faint)), float)
                  - np.clip((np.asarray(Image.open(faint), float) - low) * 255 / (high - low), 0, 255)).max() <= 1
    flat = Image.new("RGB", (8, 8), (128, 128, 128))
    assert np.array_equal(np.asarray(stretch_contrast(flat)), np.asarray(flat))


def test_report_html_renders_in_headless_chromium(tmp_path, trials):
    """Debian's Chromium opens the page: every table and image is there, every image decodes, nothing errs.
    A screenshot lands in tmp_path (never in git). Skipped where Chromium is absent, except in CI (.ci/run
    installs it and sets OOC_RAY_REQUIRE_BROWSER=1)."""
    from ooc_ray.report import run_report

    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("OOC_RAY_REQUIRE_BROWSER"):
            pytest.fail("OOC_RAY_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    cfg, paths, _, _ = write_report(tmp_path, trials)
    run_report(cfg, paths)
    page = (paths.report / "report.html").read_text()
    # The probe, put in a copy: errors are caught from the first byte on; after load, the title carries the counts.
    probe = """<script>window.errs = []; addEventListener("error", e => errs.push(String(e.message || e.target.src)),
    true); addEventListener("load", () => { const imgs = [...document.images]; document.title = JSON.stringify({
    tables: document.querySelectorAll("table").length, cells: document.querySelectorAll("td").length,
    images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, errors: errs}); });
    </script>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + probe, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    seen = json.loads(html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1)))
    expected = PageParts()
    expected.feed(page)
    assert seen == {"tables": expected.tables, "cells": seen["cells"], "images": len(expected.sources),
                    "decoded": len(expected.sources), "errors": []}
    assert seen["images"] == 3 and seen["cells"] > 0
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", (paths.report /
                    "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


def test_real_only_grid_has_one_table(trials):
    real = trials[trials["weight"].isna()]
    tables = summary_tables(real)
    assert len(tables) == 1
    (table,) = tables.values()
    assert table["arm"].tolist() == ["real only"] and table["accuracy_mean"].iloc[0] == pytest.approx(0.72)


def test_cost_per_arm_sums_its_loras_images_and_trials(tmp_path):
    """An arm's cost: every LoRA its trials drew from (once), the render seconds of the images they drew (once),
    its trials' seconds; real only costs its trials alone, and images drawn at weight 0 (the base's) no LoRA.
    Counted here by hand from the made-up numbers."""
    import json

    from ooc_ray.protocol import PlannedTrial, TrialSpec
    from ooc_ray.report import lora_records
    from ooc_ray.report.tables import add_costs, summary_tables

    for key, seconds in (("loraA", 10.0), ("loraB", 20.0), ("loraC", 40.0)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "metadata.json").write_text(json.dumps({"seconds": seconds}))
    synthetic = pd.DataFrame({"id": [f"s{i}" for i in range(8)], "lora_key": ["loraA", "loraA", "loraB", "loraB",
                                                                              "loraC", "loraC", "loraA", "loraB"],
                              "weight": [1.0] * 6 + [0.0] * 2, "render_s": [0.5, 0.5, 0.25, 0.25, 9.0, 9.0, 0.1, 0.1]})

    def trainset(*ids):
        return pd.DataFrame({"id": ["r0", "r1", *ids], "source": ["real", "real"] + ["synthetic"] * len(ids)})

    planned, rows = [], []
    for fold, drawn in ((0, ("s0", "s1", "s2")), (1, ("s1", "s3"))):  # s1 drawn in both folds: counted once
        for spec, train, seconds in ((TrialSpec(fold, 0.0, None, False), trainset(), 3.0),
                                     (TrialSpec(fold, 1.0, 1.0, False), trainset(*drawn), 5.0 + fold),
                                     (TrialSpec(fold, 1.0, 0.0, False), trainset(f"s{6 + fold}"), 4.0)):
            key = f"t{fold}{spec.arm}{spec.weight}"
            planned.append(PlannedTrial(spec, key, train, pd.DataFrame()))
            rows.append({"trial_key": key, "fold": fold, "weight": np.nan if spec.weight is None else spec.weight,
                         "ratio": spec.ratio, "synthetic_only": False, "accuracy": 0.5 + 0.1 * fold,
                         "precision_macro": 0.5, "recall_macro": 0.5, "f1_macro": 0.5, "n_test": 4,
                         "n_train_real": 2, "duration_s": seconds})
    trials = pd.DataFrame(rows)
    tables = summary_tables(trials)
    seconds = lora_records(tmp_path, synthetic["lora_key"].unique())["seconds"].to_dict()
    add_costs(tables, trials, planned, synthetic, seconds)
    table = tables[1.0].set_index("arm")
    assert table.loc["real only", ["cost_lora_s", "cost_sampling_s", "cost_trials_s"]].tolist() == [0.0, 0.0, 6.0]
    # LoRAs A and B (not C, whose images no trial drew), images s0-s3 once each, trials 5 + 6
    assert table.loc["real + 100% synthetic", ["cost_lora_s", "cost_sampling_s", "cost_trials_s",
                                               "cost_total_s"]].tolist() == [30.0, 1.5, 11.0, 42.5]
    # At weight 0: s6 (LoRA A) and s7 (LoRA B) rendered by the base alone: no LoRA's training is their cost
    table = tables[0.0].set_index("arm")
    assert table.loc["real + 100% synthetic", ["cost_lora_s", "cost_sampling_s", "cost_trials_s",
                                               "cost_total_s"]].tolist() == [0.0, pytest.approx(0.2), 8.0, 8.2]


def test_a_re_run_report_removes_the_tables_of_an_earlier_config(tmp_path, trials):
    """Table files of an earlier config (a LoRA weight or axis value since dropped) leave report/ when the report
    is written again (a glob of report/table_*.csv is never stale); files the report does not make stay."""
    from ooc_ray.report import run_report

    cfg, paths, planned, digest = write_report(tmp_path, trials)
    run_report(cfg, paths)
    assert (paths.report / "table_w0.8.csv").exists()
    (paths.report / "my_notes.md").write_text("mine")
    (paths.report / "table_w0.5.md").write_text("left by an older config")
    run_report(cfg, paths)
    assert not (paths.report / "table_w0.5.md").exists() and (paths.report / "my_notes.md").exists()
    assert (paths.report / "table_w0.8.csv").exists() and (paths.report / "table_w1.md").exists()


def test_no_spread_gives_no_verdict_and_says_so():
    """5 folds of 18 held-out images, the arm one image better in every fold: identical differences. The old
    table read p = 0, a zero-width CI and "better"; now the row has its Δ and no test."""
    rows = []
    for f in range(5):
        real = (10 + f) / 18
        rows += [{**_trial(f, float("nan"), 0.0, real), "n_test": 18, "n_train_real": 72},
                 {**_trial(f, 1.0, 0.5, real + 1 / 18), "n_test": 18, "n_train_real": 72}]
    table = summary_tables(pd.DataFrame(rows))[1.0]
    arm = table.iloc[1]
    assert arm["accuracy_diff_vs_real"] == pytest.approx(1 / 18)
    assert math.isnan(arm["corrected_p"]) and math.isnan(arm["holm_p"]) and math.isnan(arm["tost_p"])
    assert arm["verdict"] == "undefined (no spread)" and arm["undefined"] == "no spread: test undefined"
    shown = display_table(table).iloc[1]
    assert shown["verdict"] == "undefined (no spread)" and shown["p (corrected t)"] == "" and shown[
        "95% CI (corrected t)"] == "" and shown["P(better / equiv. / worse)"] == ""


def test_one_holm_family_for_the_report_each_comparison_once():
    """A control appears in both weights' tables: one comparison, tested once, with one adjusted p and one
    verdict in both (each table its own family gave it "better" in one and "inconclusive" in the other). The
    family: every distinct comparison, adjusted by statsmodels' Holm as an independent check."""
    from statsmodels.stats.multitest import multipletests

    from ooc_ray.report.tables import apply_family

    rows = []
    real = [0.70, 0.72, 0.74, 0.71, 0.73]
    for f in range(5):
        rows.append(_trial(f, float("nan"), 0.0, real[f]))
        rows.append({**_trial(f, float("nan"), 1.0, real[f] + 0.05 + 0.002 * f), "control": "real_steps"})
        rows.append(_trial(f, 1.0, 1.0, real[f] + [0.01, -0.02, 0.03, 0.0, 0.02][f]))
        rows.append(_trial(f, 0.8, 1.0, real[f] + [0.04, 0.03, 0.06, 0.02, 0.05][f]))
    tables = summary_tables(pd.DataFrame(rows).assign(control=lambda t: t["control"].fillna("")))
    control = [t[t["control"] == "real_steps"].iloc[0] for t in tables.values()]
    assert control[0]["holm_p"] == control[1]["holm_p"] and control[0]["verdict"] == control[1]["verdict"]
    raw = [control[0]["corrected_p"], tables[1.0].iloc[2]["corrected_p"], tables[0.8].iloc[2]["corrected_p"]]
    expected = multipletests(raw, method="holm")[1]
    assert [control[0]["holm_p"], tables[1.0].iloc[2]["holm_p"], tables[0.8].iloc[2]["holm_p"]] == pytest.approx(
        list(expected))
    assert apply_family(list(tables.values()), 0.02) == 3


def test_verdict_follows_the_holm_adjusted_p_not_the_raw_one():
    """Two arms with raw corrected p 0.03 and 0.04: Holm makes them 0.06 and 0.06, so neither is "better"."""
    from ooc_ray.report.tables import apply_family

    table = pd.DataFrame({"comparison": ["a", "b"], "corrected_p": [0.03, 0.04], "tost_p": [0.5, 0.5],
                          "accuracy_diff_vs_real": [0.05, 0.04], "undefined": ["", ""]})
    apply_family([table], 0.02)
    assert table["holm_p"].tolist() == pytest.approx([0.06, 0.06])
    assert table["verdict"].tolist() == ["inconclusive", "inconclusive"]


def test_tested_metric_can_be_balanced_accuracy(trials):
    """report.metric balanced_accuracy: the differences, tests and column are the macro recall's (the fixture's
    recall is accuracy - 0.2, so Δ is the same and the p-values too, on other column names)."""
    by_accuracy = summary_tables(trials)[1.0]
    table = summary_tables(trials, metric="balanced_accuracy")[1.0]
    assert table["metric"].iloc[0] == "balanced_accuracy" and "accuracy_diff_vs_real" not in table.columns
    assert table["balanced_accuracy_diff_vs_real"].tolist()[1:] == pytest.approx(
        by_accuracy["accuracy_diff_vs_real"].tolist()[1:])
    assert display_table(table).columns.str.startswith("Δbal. acc vs real").any()


def test_reference_values_sit_beside_their_arms(trials, repo):
    from ooc_ray.report import read_reference
    from ooc_ray.report.tables import reference_values

    reference = read_reference(str(repo / "experiments" / "paper_reference.csv"))
    table = summary_tables(trials)[1.0]
    values = reference_values(table, reference)
    assert values["accuracy"].tolist() == [0.729, 0.710, 0.614]  # real only, +50 %, synthetic only (Table I)
    assert values.loc[0, "recall"] == 0.715 and math.isnan(values.loc[1, "recall"])
    shown = display_table(table, values)
    assert shown.loc[0, "paper (acc / prec / rec)"] == "0.729 / 0.731 / 0.715"
    assert shown.loc[1, "Δacc to paper"] == f"{0.73 - 0.71:+.3f}"


def test_report_header_states_resolution_metric_and_family(tmp_path, trials):
    from ooc_ray.report import run_report

    cfg, paths, _, _ = write_report(tmp_path, trials)
    text = run_report(cfg, paths).read_text()
    assert "held-out folds of 6 images: one image moves a fold's accuracy by 0.1667" in text
    assert "tested metric: **accuracy**" in text and "one Holm family of 2 comparisons" in text
    assert "| P(better / equiv. / worse) |" in text and "Bayesian correlated t-test" in text
    assert "Warning: this design is too small to say anything** (2 degrees of freedom)" in text
    assert ("- trials: 12 **of 15 planned**: the others have not run (or their files were removed); a row over "
            "fewer folds than real only is compared on its own folds") in text  # the fixture runs 12


def test_a_random_frozen_backbone_is_named_in_the_header_as_no_result():
    """weights: random (tiny mode's EfficientNetB0) trains a head on random features: the classifier line says, in
    bold, that the table tests the pipeline; imagenet's line is plain. (none on a frozen backbone is refused.)"""
    from ooc_ray.load import from_dict
    from ooc_ray.report.render import classifier_line, quality_section

    line = classifier_line(from_dict({"classify": {"backbone": "EfficientNetB0", "weights": "random"}}).classify)
    assert line.startswith("EfficientNetB0 (**random initialisation, frozen: the head learned from random features; "
                           "a test of the pipeline, not a result**)")
    assert classifier_line(from_dict({}).classify).startswith("EfficientNetB7 (imagenet, frozen), 600 px")
    trained = from_dict({"classify": {"backbone": "EfficientNetB0", "weights": "none", "train_backbone": 2,
                                      "mode": "exact"}, "quality": {"features": "image_statistics"}}).classify
    assert classifier_line(trained).startswith("EfficientNetB0 (none, top 2 blocks trained)")
    calibrated = from_dict({"classify": {"backbone": "EfficientNetB0", "weights": "calibrated"}})
    for text in (classifier_line(calibrated.classify), quality_section(pd.DataFrame({"kid": [0.1]}), calibrated)[2]):
        assert "**calibrated: a random initialisation whose BatchNorms saw 32 images, held-out ones among" in text
    random = from_dict({"classify": {"backbone": "EfficientNetB0", "weights": "random"}, "quality": {"enabled": True}})
    assert ("All measures on EfficientNetB0 features **of a random initialisation: a test of the pipeline, not a "
            "measurement**") in quality_section(pd.DataFrame({"kid": [0.1]}), random)[2]


def test_report_on_results_it_cannot_write_is_one_line_and_out_writes_elsewhere(tmp_path, trials, capsys):
    """A results folder the report cannot write into (here report/ is a file: as root, a chmod stops nothing)
    fails in one line naming the path; `report --out DIR` writes the same report there."""
    import yaml

    from ooc_ray.cli import main
    from ooc_ray.fields import to_dict

    cfg, paths, _, _ = write_report(tmp_path, trials)
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    paths.report.write_text("not a folder")
    assert main(["report", str(config)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"[ooc-ray] report failed: {paths.report}: File exists", err
    assert main(["report", str(config), "--out", str(tmp_path / "elsewhere")]) == 0
    assert "- trials: 12" in (tmp_path / "elsewhere" / "report.md").read_text()
    assert paths.report.read_text() == "not a folder"


def test_a_report_prints_only_its_own_lines_quiet_prints_only_warnings_and_verbose_shows_the_libraries(tmp_path, trials):
    """The CLI in a fresh process (the libraries' notices come once per process, some from C++ at import): by
    default every line is ooc-ray's; -q prints only warnings (a report imports neither torch nor TensorFlow: -v
    adds nothing here, see test_logs_levels)."""
    import subprocess
    import sys

    import yaml

    from ooc_ray.fields import to_dict

    cfg, paths, _, _ = write_report(tmp_path, trials)
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # conftest sets it for the tests
    lines = {}
    for flag in ("", "-q"):
        proc = subprocess.run([sys.executable, "-m", "ooc_ray.cli", "report", str(config), *([flag] if flag else [])],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines[flag] = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines[""] and all(line.startswith("[ooc-ray] ") for line in lines[""]), lines[""]
    # -q: only the warning that the tables leave out the 3 planned trials this fixture never ran
    assert lines["-q"] == ["[ooc-ray] report: 3 of 15 planned trials have not run; the tables leave them out "
                           "(`ooc-ray classify` runs them)"]


@pytest.mark.parametrize("verbosity", [-1, 0, 1])
def test_logs_levels_hide_the_libraries_below_verbose(verbosity, capfd, caplog):
    """A peft warning, a Tune INFO line, a C++ line on file descriptor 2 during a stage's import, and ooc-ray's own
    note: which of them each level lets through (library records reach the root logger, which -v prints)."""
    import logging

    from ooc_ray import logs

    caplog.set_level(logging.DEBUG, logger="")  # the root: where library records go when their level allows
    try:
        logs.configure(verbosity)
        logs.note("own line")
        logging.getLogger("peft.tuners").warning("a library warning")
        logging.getLogger("ray.tune").info("a Tune info line")
        with logs.native_lines_hidden():
            os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")
        out, err = capfd.readouterr()
        assert ("[ooc-ray] own line" in out) == (verbosity >= 0)
        assert ("oneDNN custom operations" in err) == (verbosity == 1)
        library = [r.getMessage() for r in caplog.records if r.name.startswith(("peft", "ray"))]
        assert library == (["a library warning", "a Tune info line"] if verbosity == 1 else []), library
    finally:
        logs.configure(logs.VERBOSE)  # the test process's own default: nothing hidden
        logging.getLogger("ooc_ray").setLevel(logging.INFO)
        logging.captureWarnings(False)


def test_a_trial_summary_that_is_not_its_own_or_cannot_be_a_result_is_refused_by_report_plan_and_status(
        tmp_path, trials):
    """A summary holding another trial's row (a copied file) or an accuracy outside [0, 1] (a hand edit) was
    averaged into the table, or broke it with a traceback: now report names each, classify runs it again, and
    plan and status count it as not finished."""
    from ooc_ray.errors import DataError
    from ooc_ray.report import run_report
    from ooc_ray.status import stage_lines
    from ooc_ray.trial_files import summary_problem

    cfg, paths, planned, _ = write_report(tmp_path, trials)
    one, other = sorted(paths.trial(key) for key in planned.values())[:2]
    shutil.copy(other, one)
    row = pd.read_parquet(other).assign(accuracy=1.5)
    row.to_parquet(other)
    with pytest.raises(DataError) as caught:
        run_report(cfg, paths)
    message = str(caught.value)
    assert message.startswith("2 trial summaries damaged or not their trial's: ") and len(message.splitlines()) == 1
    assert f"{one}: holds ['{other.stem}'], not trial {one.stem} alone" in message
    assert f"{other}: accuracy 1.5 outside [0, 1]" in message
    row.assign(accuracy=float("nan")).to_parquet(other)
    assert summary_problem(paths, other.stem) == f"{other}: accuracy nan outside [0, 1]"
    paths.history.mkdir(parents=True, exist_ok=True)
    files = sorted(paths.trials.glob("*.parquet"))
    for f in files:  # the fixture writes summaries and predictions: a trial's history too
        pd.DataFrame({"trial_key": [f.stem], "epoch": [1]}).to_parquet(paths.trial_history(f.stem))
    # the 2, and the fixture's old.parquet, which holds trial "other-config" and has no predictions
    assert f"classify: {len(files) - 3} trials finished; 3 damaged or not their trial's, e.g. " in \
        "\n".join(stage_lines(cfg, paths))


def test_a_report_that_fails_half_way_leaves_the_last_one_whole_and_out_keeps_the_users_files(
        tmp_path, trials, monkeypatch):
    """Files are written into a staging folder and published whole: a failure in the middle (here, the confusion
    plot) leaves report/ as the last report left it (tables were rewritten before). With --out, only files an
    earlier report wrote there are removed, never the user's own that merely look like report files."""
    from ooc_ray.report import plots, run_report

    cfg, paths, _, _ = write_report(tmp_path, trials)
    run_report(cfg, paths)
    before = {p.name: p.read_bytes() for p in paths.report.iterdir()}
    monkeypatch.setattr(plots, "plot_confusions", lambda *a: (_ for _ in ()).throw(RuntimeError("plot failed")))
    (paths.trial(sorted(paths.trials.glob("*.parquet"))[0].stem)).unlink()  # a table would change
    with pytest.raises(RuntimeError, match="plot failed"):
        run_report(cfg, paths)
    assert {p.name: p.read_bytes() for p in paths.report.iterdir()} == before  # no staging folder left either
    monkeypatch.undo()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table_main.tex").write_text("my thesis table")
    (mine / "axis_notes.png").write_bytes(b"my figure")
    run_report(cfg, dataclasses.replace(paths, report_dir=mine))
    assert (mine / "table_main.tex").read_text() == "my thesis table" and (mine / "axis_notes.png").exists()
    assert (mine / "report.md").exists()


def test_status_tells_a_report_of_this_configs_settings_from_one_of_earlier_settings(tmp_path, trials):
    """The report's index records the settings it was made with (every field but resources): status says when
    the config has changed since (a margin of the report itself, a setting that feeds the trials), not when only
    a resource has (more CPUs change no number), and that an index from before settings were kept cannot say."""
    import json

    from ooc_ray.fields import with_value
    from ooc_ray.report import run_report
    from ooc_ray.status import stage_lines

    cfg, paths, _, _ = write_report(tmp_path, trials)
    run_report(cfg, paths)

    def report_line(config):
        return next(line for line in stage_lines(config, paths) if line.startswith("report: "))
    assert report_line(cfg).startswith("report: written ") and "settings" not in report_line(cfg)
    assert "settings" not in report_line(with_value(cfg, "ray.num_cpus", 7))
    for changed in (with_value(cfg, "report.equivalence_margin", 0.05), with_value(cfg, "classify.epochs", 3)):
        assert report_line(changed).endswith("; with other settings than this config's (one changed since): run "
                                             "`ooc-ray report`")
    index = json.loads(paths.report_index.read_text())
    assert sorted(index) == ["files", "settings"] and "report.md" in index["files"]
    paths.report_index.write_text(json.dumps(index["files"]))  # as reports wrote it before
    assert report_line(cfg).endswith("; with settings it does not record: run `ooc-ray report` to be sure it is "
                                     "this config's")
    assert dataclasses.replace(cfg) == cfg


def test_the_replicate_table_compares_each_arm_with_real_only_at_its_own_axis_values():
    """Replicates under a classify.real_fraction axis: real only scores 0.30 at 25 % and 0.86 at 100 %, the arm
    +0.20 and -0.02 over it (known, to within 0.01 of noise). Pooled over both fractions, real only (0.58) gave
    each arm's difference the wrong sign; per fraction, the pooled differences are the truth."""
    from ooc_ray.report.tables import replicate_table

    rng = np.random.default_rng(0)
    real_acc, gain, n_train = {0.25: 0.30, 1.0: 0.86}, {0.25: 0.20, 1.0: -0.02}, {0.25: 7, 1.0: 29}
    variants = []
    for fraction in (0.25, 1.0):
        for replicate in (0, 1, 2):
            rows = []
            for fold in range(3):
                common = {"fold": fold, "control": "", "mixing": "concat", "n_test": 15,
                          "n_train_real": n_train[fraction]}
                rows.append({**common, "trial_key": f"real-{fraction}-{fold}", "weight": np.nan, "ratio": 0.0,
                             "synthetic_only": False, "accuracy": real_acc[fraction] + 0.01 * fold})
                rows.append({**common, "trial_key": f"arm-{fraction}-{replicate}-{fold}", "weight": 1.0, "ratio": 1.0,
                             "synthetic_only": False, "accuracy": real_acc[fraction] + 0.01 * fold + gain[fraction]
                             + rng.normal(0, 0.01)})
            variants.append(pd.DataFrame(rows).assign(**{"classify.real_fraction": fraction, "replicate": replicate}))
    table = replicate_table(pd.concat(variants, ignore_index=True), ["classify.real_fraction"])
    arms = table[table["arm"] != "real only"].set_index("classify.real_fraction")
    for fraction in (0.25, 1.0):
        assert arms.loc[fraction, "pooled_diff"] == pytest.approx(gain[fraction], abs=0.02)
        assert arms.loc[fraction, "pooled_ci_low"] < gain[fraction] < arms.loc[fraction, "pooled_ci_high"]


def test_the_header_names_the_libraries_its_trials_ran_with_and_warns_when_they_differ(tmp_path, trials, capsys):
    """No key holds library versions (an upgrade would re-run everything), so trials of two versions can stand
    side by side in one table: the header names what every trial ran with, or says they differ, with a warning."""
    from ooc_ray.report import run_report

    cfg, paths, planned, _ = write_report(tmp_path, trials)
    files = sorted(f for f in (paths.trial(key) for key in planned.values()) if f.exists())
    for f in files:
        pd.read_parquet(f).assign(versions="keras 3.1, tensorflow 2.20, numpy 2.3").to_parquet(f)
    run_report(cfg, paths)
    text = (paths.report / "report.md").read_text()
    # The fixture's pools and LoRAs are from before versions were recorded (no column, no metadata).
    assert ("- computed with: keras 3.1, tensorflow 2.20, numpy 2.3 (every trial); generator: LoRAs not recorded, "
            "images not recorded") in text
    pd.read_parquet(files[0]).assign(versions="keras 3.2, tensorflow 2.21, numpy 2.3").to_parquet(files[0])
    run_report(cfg, paths)
    text = (paths.report / "report.md").read_text()
    assert (f"- computed with: **different libraries**: keras 3.1, tensorflow 2.20, numpy 2.3: {len(files) - 1} "
            "trials; keras 3.2, tensorflow 2.21, numpy 2.3: 1 trials") in text
    assert "report: made with different libraries (trials of one framework: keras 3.1" in capsys.readouterr().err
    # Another framework's trials (a classify.backend axis) and trials from before versions were recorded are
    # no mixture: named, without a warning.
    pd.read_parquet(files[0]).assign(versions="keras 3.1, torch 2.13, numpy 2.3", backend="torch").to_parquet(files[0])
    pd.read_parquet(files[1]).drop(columns="versions").to_parquet(files[1])
    run_report(cfg, paths)
    text = (paths.report / "report.md").read_text()
    assert ("- computed with: keras 3.1, tensorflow 2.20, numpy 2.3 | keras 3.1, torch 2.13, numpy 2.3 (1 trials "
            "from before versions were recorded)") in text
    assert "different libraries" not in capsys.readouterr().err


def test_the_header_names_the_generators_libraries_and_warns_when_its_loras_or_images_differ(tmp_path, trials,
                                                                                           capsys):
    """A pool resumed after an upgrade holds images of two diffusers (whose schedulers have changed between
    versions), as LoRAs can be of two peft: the header names the libraries of every LoRA (metadata.json) and
    image (pool rows), and says in bold, with a warning, when either differs among themselves."""
    from ooc_ray.io import write_parquet
    from ooc_ray.report import run_report

    cfg, paths, _, _ = write_report(tmp_path, trials)
    synthetic = pd.read_parquet(paths.synthetic_table)
    old = "torch 2.12.0, diffusers 0.41.0, peft 0.17.0, transformers 5.0.0"
    new = "torch 2.13.0, diffusers 0.42.1, peft 0.18.0, transformers 5.23.0"
    loras = sorted(synthetic["lora_key"].unique())
    for key in loras:
        (paths.lora / key).mkdir(parents=True)
        (paths.lora / key / "metadata.json").write_text(json.dumps({"seconds": 2.0, "versions": new}))
    write_parquet(synthetic.assign(versions=new), paths.synthetic_table)
    run_report(cfg, paths)
    text = (paths.report / "report.md").read_text()
    assert f"; generator: {new} (every LoRA and image)\n" in text
    assert "different libraries" not in capsys.readouterr().err
    # Pools resumed after a downgrade: 3 images of the old stack; one LoRA from before versions were recorded.
    write_parquet(synthetic.assign(versions=[old] * 3 + [new] * (len(synthetic) - 3)), paths.synthetic_table)
    (paths.lora / loras[0] / "metadata.json").write_text(json.dumps({"seconds": 2.0}))
    run_report(cfg, paths)
    text = (paths.report / "report.md").read_text()
    assert (f"; generator: LoRAs {new} (1 LoRAs from before versions were recorded), images **different "
            f"libraries**: {new}: {len(synthetic) - 3} images; {old}: 3 images\n") in text
    assert f"report: made with different libraries (images: {new}: {len(synthetic) - 3} images; {old}: 3 images)" \
        in capsys.readouterr().err
