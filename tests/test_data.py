"""Data stage: scanning, validation errors that name the file, manifests on generated and real data."""
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ooc_ray.config import DemoDataConfig, FoldsConfig
from ooc_ray.load import from_dict
from ooc_ray.data import class_names, load_manifest, run_data, scan
from ooc_ray.images import load_image
from ooc_ray.errors import DataError
from ooc_ray.demo_data import CLASSES, write_demo_dataset
from ooc_ray.folds import assign_folds
from ooc_ray.paths import ExperimentPaths


@pytest.fixture
def tree(tmp_path):
    """A folder-per-class tree with mixed modes and sizes: grey 64x48, RGB 80x60, 16-bit grey; no two alike."""
    root = tmp_path / "images"
    for shade, label in enumerate(("good", "bad")):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (64, 48), 40 * i + shade).save(root / label / f"g{i}.png")
        Image.new("RGB", (80, 60), (10, 200, 30 + 100 * shade)).save(root / label / "rgb.jpg")
        Image.new("I;16", (32, 32), 4000 + shade).save(root / label / "deep.png")
    return root


def test_scan_folder_tree(tree):
    m = scan(tree)
    assert len(m) == 16 and m["id"].is_unique
    assert class_names(m) == ["bad", "good"]
    assert set(m["mode"]) >= {"L", "RGB"}
    assert {(64, 48), (80, 60), (32, 32)} <= set(zip(m["width"], m["height"]))
    assert (m["group"] == "").all()
    # ids, and each image's `file` (what predictions name it by), do not depend on where the tree lives
    assert (m["path"] == [str(tree / f) for f in m["file"]]).all() and "good/g0.png" in set(m["file"])
    moved = tree.parent / "moved"
    shutil.copytree(tree, moved)
    again = scan(moved)
    assert sorted(again["id"]) == sorted(m["id"]) and sorted(again["file"]) == sorted(m["file"])


def test_class_order_from_config(tree):
    m = scan(tree, classes=("good", "bad"))
    assert class_names(m) == ["good", "bad"]


def test_load_image_always_rgb_and_resized(tree):
    for path in [tree / "good" / "g1.png", tree / "good" / "rgb.jpg", tree / "good" / "deep.png"]:
        img = load_image(path, 40)
        assert img.mode == "RGB" and img.size == (40, 40)
    # 16-bit grey is scaled by its maximum, not clipped: a flat 4000 image becomes white, not 255-clipped noise
    assert load_image(tree / "good" / "deep.png").getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_image_named(tree):
    bad = tree / "good" / "broken.jpg"
    bad.write_bytes((tree / "good" / "rgb.jpg").read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match="broken.jpg"):
        scan(tree)


def test_every_bad_file_is_named_in_one_error_up_to_a_cap_with_the_count(tree, tmp_path):
    """A truncated JPEG, a text file named .png, an empty file and, through a CSV, a missing file: one error
    names all four; with 13 bad files the first 10 are named and the rest counted."""
    (tree / "good" / "broken.jpg").write_bytes((tree / "good" / "rgb.jpg").read_bytes()[:200])
    (tree / "bad" / "notes.png").write_text("this is not a png")
    (tree / "bad" / "empty.png").write_bytes(b"")
    csv = tmp_path / "set.csv"
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.*"))
    pd.DataFrame({"file": [f"images/{f}" for f in files] + ["images/good/gone.png"],
                  "label": [f.split("/")[0] for f in files] + ["good"]}).to_csv(csv, index=False)
    with pytest.raises(DataError) as caught:
        scan(csv)
    message = str(caught.value)
    assert "4 of 20 images cannot be used" in message and len(message.splitlines()) == 1
    for name in ("broken.jpg", "notes.png", "empty.png: file is empty", "gone.png: file not found"):
        assert name in message, name
    for i in range(10):
        (tree / "bad" / f"junk{i}.png").write_text("x")
    with pytest.raises(DataError, match=r"13 of 29 images cannot be used: .*; and 3 more$"):
        scan(tree)


def test_csv_lines_with_an_empty_file_or_label_are_named_together(tmp_path):
    csv = tmp_path / "set.csv"
    csv.write_text("file,label\na.png,good\n,good\nb.png,\nc.png,bad\n")
    with pytest.raises(DataError, match=r"2 empty or missing value\(s\): line 3: no file; line 4: no label$"):
        scan(csv)
    # What str() of pandas' missing float writes is no label either, nor an empty group ("none" can be a label)
    csv.write_text("file,label,well\na.png,good,w1\nb.png,NaN,w1\nc.png,bad,\nd.png,none,nan\n")
    with pytest.raises(DataError, match=r"3 empty or missing value\(s\): line 3: label 'NaN'; line 4: no well; "
                                       r"line 5: well 'nan'$"):
        scan(csv, group_column="well")


def test_copies_of_an_image_are_refused_naming_every_set(tree):
    """The same bytes twice would put one copy in training and its twin in the held-out fold; under two labels
    they cannot both be right. Every set is named, with its labels."""
    shutil.copy(tree / "good" / "g1.png", tree / "good" / "g1 copy.png")
    shutil.copy(tree / "good" / "g2.png", tree / "bad" / "from_good.png")
    with pytest.raises(DataError) as caught:
        scan(tree)
    message = str(caught.value)
    assert "2 set(s) of byte-identical images" in message and len(message.splitlines()) == 1
    assert "good/g1 copy.png (good), good/g1.png (good)" in message
    assert "bad/from_good.png (bad), good/g2.png (good)" in message


def test_hidden_files_are_skipped_at_any_depth_and_a_broken_link_is_named(tree):
    (tree / "good" / ".thumbs").mkdir()
    shutil.copy(tree / "good" / "g1.png", tree / "good" / ".thumbs" / "g1.png")  # a hidden copy: not listed
    (tree / "good" / "._g1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    assert len(scan(tree)) == 16
    (tree / "bad" / "moved.png").symlink_to(tree / "bad" / "gone.png")
    with pytest.raises(DataError, match=r"1 of 17 images cannot be used: .*bad/moved.png: file not found \(a link to "):
        scan(tree)


def test_a_stack_a_decompression_bomb_and_labels_apart_only_by_case_are_refused(tree):
    frames = [Image.new("L", (16, 16), v) for v in (1, 2, 3)]
    frames[0].save(tree / "good" / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"stack.tif: 3 frames \(a stack\); one image per file"):
        scan(tree)
    known = {hashlib.sha256((tree / "good" / "stack.tif").read_bytes()).hexdigest():  # from an older manifest
             {"size": 0, "width": 16, "height": 16, "mode": "L"}}
    with pytest.raises(DataError, match=r"stack.tif: 3 frames"):
        scan(tree, known=known)
    (tree / "good" / "stack.tif").unlink()
    Image.new("L", (20000, 10000), 0).save(tree / "good" / "huge.png")  # 2e8 pixels: past Pillow's bomb limit
    with pytest.raises(DataError, match=r"huge.png: unreadable or corrupt image \(Image size \(200000000 pixels\)"):
        scan(tree)
    (tree / "good" / "huge.png").unlink()
    (tree / "Good").mkdir()
    Image.new("L", (8, 8), 99).save(tree / "Good" / "x.png")
    with pytest.raises(DataError, match=r"labels that differ only in case, spaces or Unicode form: \['Good', 'good'\]"):
        scan(tree)


def test_not_an_image_named(tree):
    (tree / "bad" / "notes.png").write_text("this is not a png")
    with pytest.raises(DataError, match="notes.png"):
        scan(tree)


def test_zero_size_named(tree):
    (tree / "bad" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.png.*0 bytes"):
        scan(tree)


def test_unsupported_mode_named(tree):
    Image.new("CMYK", (8, 8)).save(tree / "bad" / "print.jpg")
    with pytest.raises(DataError, match=r"print.jpg.*CMYK"):
        scan(tree)


def test_empty_class_named(tree):
    (tree / "acceptable").mkdir()
    with pytest.raises(DataError, match="acceptable"):
        scan(tree)
    shutil.rmtree(tree / "acceptable")
    with pytest.raises(DataError, match="acceptable"):
        scan(tree, classes=("good", "acceptable", "bad"))


def test_unknown_label_named(tree):
    with pytest.raises(DataError, match=r"unknown label.*bad"):
        scan(tree, classes=("good",))
    (tree / "bad").rename(tree / "cafe\u0301")  # decomposed, as macOS names folders; the config's is composed
    with pytest.raises(DataError, match=r"as code points: \['cafe\\u0301'\] and \['good', 'caf\\xe9'\]"):
        scan(tree, classes=("good", "caf\u00e9"))


def test_csv_source_with_groups_and_errors(tree, tmp_path):
    csv = tmp_path / "labels.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name},site{i % 3}" for i, p in enumerate(sorted(tree.rglob("*.png")))]
    csv.write_text("file,label,site\n" + "\n".join(rows) + "\n")
    m = scan(csv, group_column="site")
    assert set(m["group"]) == {"site0", "site1", "site2"}
    assert sorted(m["file"]) == sorted(r.split(",")[0] for r in rows)  # the CSV's entries, as written
    with pytest.raises(DataError, match="well"):
        scan(csv, group_column="well")
    csv.write_text("file,label\nimages/good/missing.png,good\nimages/bad/g0.png,bad\n")
    with pytest.raises(DataError, match="missing.png"):
        scan(csv)
    csv.write_text("path,class\nx.png,good\n")
    with pytest.raises(DataError, match="missing column"):
        scan(csv)


def test_folds_stratified_deterministic():
    m = scan_demo_manifest()
    a = assign_folds(m, FoldsConfig(k=3, seed=1, strategy="stratified"))
    b = assign_folds(m.sample(frac=1.0, random_state=0), FoldsConfig(k=3, seed=1, strategy="stratified"))
    assert a.set_index("id")["fold"].sort_index().equals(b.set_index("id")["fold"].sort_index())
    merged = m.merge(a, on="id")
    per_fold = pd.crosstab(merged["fold"], merged["label"])
    assert (per_fold.max() - per_fold.min()).max() <= 1  # stratified: each class split as evenly as possible
    c = assign_folds(m, FoldsConfig(k=3, seed=2, strategy="stratified"))
    assert not a["fold"].equals(c["fold"])


def test_group_folds_keep_groups_together():
    m = scan_demo_manifest(groups=6)
    folds = assign_folds(m, FoldsConfig(k=3, seed=0, strategy="auto"))
    merged = m.merge(folds, on="id")
    assert (merged.groupby("group")["fold"].nunique() == 1).all()
    assert set(merged["fold"]) == {0, 1, 2}


def test_group_folds_errors():
    m = scan_demo_manifest()
    with pytest.raises(DataError, match="at least folds.k=5 groups"):
        assign_folds(m, FoldsConfig(k=5, strategy="group"))
    no_groups = m.assign(group="")
    with pytest.raises(DataError, match="group"):
        assign_folds(no_groups, FoldsConfig(k=3, strategy="group"))
    with pytest.raises(DataError, match=r"fewer images than folds.k=20 .*: 'acceptable' has \d+, 'bad' has \d+$"):
        assign_folds(m, FoldsConfig(k=20, strategy="stratified"))


_DEMO_CACHE = {}


def scan_demo_manifest(groups=3):
    if groups not in _DEMO_CACHE:
        import tempfile
        from pathlib import Path

        root = Path(tempfile.mkdtemp()) / "demo"
        csv = write_demo_dataset(root, DemoDataConfig(per_class=(24, 12, 12), size=32, groups=groups))
        _DEMO_CACHE[groups] = scan(csv, classes=CLASSES, group_column="cell_line")
    return _DEMO_CACHE[groups]


def test_demo_dataset_mixed_and_reused(tmp_path):
    cfg = DemoDataConfig(per_class=(8, 8, 8), size=32)
    csv = write_demo_dataset(tmp_path / "d", cfg)
    mtime = csv.stat().st_mtime_ns
    assert write_demo_dataset(tmp_path / "d", cfg).stat().st_mtime_ns == mtime  # same config: not rewritten
    m = scan(csv, classes=CLASSES, group_column="cell_line")
    assert set(m["mode"]) == {"L", "RGB"} and m["height"].nunique() == 2
    assert m.groupby("label").size().to_dict() == {"good": 8, "acceptable": 8, "bad": 8}


def test_run_data_writes_manifest_and_folds(tmp_path):
    cfg = from_dict({"name": "t", "results_dir": str(tmp_path),
                     "data": {"classes": list(CLASSES), "group_column": "cell_line",
                              "demo": {"per_class": [9, 6, 6], "size": 32}},
                     "folds": {"k": 3}})
    paths = ExperimentPaths.of(cfg)
    run_data(cfg, paths)
    m = load_manifest(paths)
    assert len(m) == 21 and set(m["fold"]) == {0, 1, 2}
    assert list(m.columns[:10]) == ["id", "path", "label", "label_index", "group", "sha256", "size", "width",
                                    "height", "mode"]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_bad_input_writes_nothing(tmp_path, tree):
    (tree / "bad" / "empty.png").write_bytes(b"")
    cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "data": {"source": str(tree)}})
    with pytest.raises(DataError):
        run_data(cfg, ExperimentPaths.of(cfg))
    assert not (tmp_path / "out" / "t" / "manifest.parquet").exists()


def test_real_pbc_manifest(shared_pbc, tmp_path):
    """../shared/data: 8 classes x 300 RGB JPGs at three sizes (SOURCE.md)."""
    cfg = from_dict({"name": "pbc", "results_dir": str(tmp_path), "data": {"source": str(shared_pbc)}})
    paths = ExperimentPaths.of(cfg)
    run_data(cfg, paths)
    m = load_manifest(paths)
    assert len(m) == 2400 and m["id"].is_unique and m["sha256"].is_unique
    assert m.groupby("label").size().eq(300).all() and len(class_names(m)) == 8
    assert set(m["mode"]) == {"RGB"}
    sizes = m.groupby(["width", "height"]).size().to_dict()
    assert sizes == {(360, 363): 2325, (366, 369): 46, (360, 360): 29}
    counts = pd.crosstab(m["fold"], m["label"])
    assert (counts == 60).all().all()  # 300 per class over 5 stratified folds


def test_run_data_skips_when_unchanged_and_reruns_on_change(tmp_path, tree):
    cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "data": {"source": str(tree)},
                     "folds": {"k": 2}})
    paths = ExperimentPaths.of(cfg)
    first = run_data(cfg, paths)
    mtime = paths.manifest.stat().st_mtime_ns
    assert run_data(cfg, paths)["id"].tolist() == first["id"].tolist()
    assert paths.manifest.stat().st_mtime_ns == mtime  # skipped: not rewritten
    Image.new("L", (64, 48), 7).save(tree / "good" / "new.png")
    assert len(run_data(cfg, paths)) == len(first) + 1  # a new file is picked up
    (tree / "good" / "late.png").write_bytes(b"")
    with pytest.raises(DataError, match="late.png"):
        run_data(cfg, paths)  # and validated: the old manifest is not silently reused


def test_bytes_replaced_in_place_are_seen_even_with_the_same_size_and_mtime(tmp_path, tree):
    """Content, not file stats: an image rewritten with other pixels, same size and mtime, gets its new sha256
    and keeps its id and fold (so only what it feeds re-runs)."""
    import hashlib
    import os

    cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "data": {"source": str(tree)},
                     "folds": {"k": 2}})
    paths = ExperimentPaths.of(cfg)
    first = run_data(cfg, paths).set_index("id")
    target = tree / "good" / "g1.png"
    st = target.stat()
    Image.new("L", (64, 48), 42).save(target)  # was 40: same dimensions, other pixels (41 is bad/g1.png)
    assert target.stat().st_size == st.st_size  # the old stat fingerprint could not tell the difference
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = run_data(cfg, paths).set_index("id")
    changed = second.index[second["sha256"] != first["sha256"]].tolist()
    assert len(changed) == 1 and second.loc[changed[0], "path"] == str(target.resolve())
    assert second.loc[changed[0], "sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert second["fold"].equals(first["fold"])


def test_only_new_bytes_are_decoded(tmp_path, tree, monkeypatch):
    """Checked once per content: a decode (inspect_image) and a near-copy signature (kept by sha256 in
    image_signatures.npz, made again when it is damaged)."""
    import ooc_ray.data as data
    import ooc_ray.near_copies as near_copies

    cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "data": {"source": str(tree)},
                     "folds": {"k": 2}})
    paths = ExperimentPaths.of(cfg)
    run_data(cfg, paths)
    decoded, signed = [], []
    real, real_signatures = data.inspect_image, near_copies.signatures
    monkeypatch.setattr(data, "inspect_image", lambda path, raw: decoded.append(path.name) or real(path, raw))
    monkeypatch.setattr(near_copies, "signatures", lambda path: signed.append(Path(path).name) or real_signatures(path))
    run_data(cfg, paths)
    assert decoded == [] and signed == []  # every sha256 was decoded and checked before
    Image.new("L", (64, 48), 99).save(tree / "bad" / "fresh.png")
    run_data(cfg, paths)
    assert decoded == ["fresh.png"] and signed == ["fresh.png"]
    paths.image_signatures.write_bytes(paths.image_signatures.read_bytes()[:200])
    run_data(cfg, paths)
    assert decoded == ["fresh.png"] and len(signed) == 1 + 17
    run_data(cfg, paths)
    assert len(signed) == 1 + 17


def test_repeated_folds_are_independent_partitions_and_repeat_0_is_plain_k_fold():
    from ooc_ray.folds import fold_ids, held_out_rows, train_rows

    m = scan_demo_manifest()
    once = assign_folds(m, FoldsConfig(k=3, seed=1, strategy="stratified"))
    thrice = assign_folds(m, FoldsConfig(k=3, seed=1, strategy="stratified", repeats=3))
    assert list(thrice.columns) == ["id", "fold", "fold_r1", "fold_r2"]
    assert thrice["fold"].equals(once["fold"])  # repeats=1 results (and their keys) stay what they were
    assert not thrice["fold_r1"].equals(thrice["fold"]) and not thrice["fold_r2"].equals(thrice["fold_r1"])
    merged = m.merge(thrice, on="id")
    assert fold_ids(merged) == list(range(9))
    for repeat in range(3):  # every repeat is a partition: each image held out exactly once, classes balanced
        held = [set(held_out_rows(merged, 3 * repeat + f)["id"]) for f in range(3)]
        assert sum(map(len, held)) == len(m) and set().union(*held) == set(m["id"])
        column = ["fold", "fold_r1", "fold_r2"][repeat]
        per_fold = pd.crosstab(merged[column], merged["label"])
        assert (per_fold.max() - per_fold.min()).max() <= 1
    # fold 4 = repeat 1, fold 1: trained on the images fold_r1 does not hold out in fold 1
    assert set(train_rows(merged, 4)["id"]) == set(merged.loc[merged["fold_r1"] != 1, "id"])
    with pytest.raises(DataError, match="repeat 3 is not in this manifest"):
        held_out_rows(merged, 9)


def test_repeated_group_folds_keep_groups_together_in_every_repeat():
    m = scan_demo_manifest(groups=6)
    merged = m.merge(assign_folds(m, FoldsConfig(k=3, seed=0, strategy="group", repeats=2)), on="id")
    for column in ("fold", "fold_r1"):
        assert (merged.groupby("group")[column].nunique() == 1).all()
    assert not merged["fold"].equals(merged["fold_r1"])


def test_repeats_that_cannot_differ_are_refused_and_duplicates_drawn_again():
    """5 groups in 5 folds: one partition exists, so repeats are refused, naming the groups and k. 6 groups in 5
    folds: scikit-learn's shuffles with seed 5 give 3 distinct partitions of 4 repeats; each repeat is now one no earlier
    repeat has."""
    from ooc_ray.folds import _assign_once, held_out_signatures

    five = scan_demo_manifest(groups=5)
    with pytest.raises(DataError, match=r"folds.repeats=4: 5 groups \(line0, line1, line2, line3, line4\) in "
                                         r"folds.k=5 folds can be split only one way"):
        assign_folds(five, FoldsConfig(k=5, seed=0, strategy="group", repeats=4))
    assert list(assign_folds(five, FoldsConfig(k=5, seed=0, strategy="group", repeats=1)).columns) == ["id", "fold"]
    six = scan_demo_manifest(groups=6)
    columns = ["fold", "fold_r1", "fold_r2", "fold_r3"]
    plain = pd.DataFrame({"id": six["id"]})
    for r, column in enumerate(columns):  # what each repeat's own seed alone gives: repeats that coincide
        plain[column] = _assign_once(six, FoldsConfig(k=5, strategy="group"), 5 + 1000 * r)

    def partitions(table):
        return {frozenset(frozenset(table.loc[table[c] == f, "id"]) for f in range(5)) for c in columns}
    assert len(partitions(plain)) < 4
    drawn = assign_folds(six, FoldsConfig(k=5, seed=5, strategy="group", repeats=4))
    assert len(partitions(drawn)) == 4 and drawn["fold"].equals(plain["fold"])  # repeat 0 as before
    # Distinct partitions can still share a fold (4 of 5 folds hold one group each): the report counts a held-out
    # set once, whichever repeats hold it out, as the signatures say.
    for table in (drawn, plain):
        held = {frozenset(table.loc[table[c] == f, "id"]) for c in columns for f in range(5)}
        assert len(set(held_out_signatures(six.merge(table, on="id")).values())) == len(held)


def test_a_stage_refuses_images_changed_since_the_data_stage(tmp_path, tree, monkeypatch):
    """A stage run on its own (finetune, report) after an image changed would key its results by the recorded
    bytes and read the new ones, and report and plan would show the old trials as current: load_manifest hashes
    every image again, once per process, and names what changed."""
    from ooc_ray import data

    cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "data": {"source": str(tree)},
                     "folds": {"k": 2}})
    paths = ExperimentPaths.of(cfg)
    run_data(cfg, paths)
    assert len(load_manifest(paths)) == 16
    Image.new("L", (64, 48), 43).save(tree / "good" / "g1.png")
    monkeypatch.setattr(data, "_CHECKED", set())  # the next command: a new process, which has hashed nothing
    with pytest.raises(DataError, match=r"manifest.parquet: 1 image\(s\) changed or gone since `ooc-ray data` ran, "
                                        r"e.g. .*good/g1.png; run `ooc-ray run`"):
        load_manifest(paths)
    run_data(cfg, paths)
    assert len(load_manifest(paths)) == 16


def test_near_copies_split_across_folds_or_classes_are_refused_and_grouped_ones_kept(shared_pbc, tmp_path):
    """Real PBC crops with some saved again: as quality-50 JPEGs, at half size (PNG), and one JPEG under another
    class. The data stage names every pair that k-fold splits (checked against the folds it would draw) and the
    one under two labels; the same copies each given their original's group pass (a group stays in one fold).
    The 2,400 distinct PBC images hold no pair (test_real_pbc_manifest runs the same check over them)."""
    originals = []  # copied in, so that the CSV's names (the images' ids, so their folds) are the same every run
    for label in ("eosinophil", "lymphocyte", "platelet"):
        (tmp_path / label).mkdir()
        first_eight = sorted((shared_pbc / label).glob("*.jpg"))[:8]
        originals.append([Path(shutil.copy(p, tmp_path / label)) for p in first_eight])
    rows = [(p.relative_to(tmp_path), p.parent.name, f"g{p.stem}") for files in originals for p in files]
    copies = tmp_path / "copies"
    copies.mkdir()
    for n, original in enumerate(files[n] for files in originals for n in (0, 1)):
        image = Image.open(original)
        copy = copies / (f"{original.stem}_q50.jpg" if n % 2 == 0 else f"{original.stem}_half.png")
        if n % 2 == 0:
            image.save(copy, quality=50)
        else:
            image.resize((image.width // 2, image.height // 2), Image.LANCZOS).save(copy)
        rows.append((copy.relative_to(tmp_path), original.parent.name, f"g{original.stem}"))
    mislabelled = copies / f"{originals[0][2].stem}_as_platelet.jpg"
    Image.open(originals[0][2]).save(mislabelled, quality=90)
    csv = tmp_path / "labels.csv"

    def run(with_rows, group_column="", near_copies="refuse", seed=0):
        csv.write_text("file,label,patient\n" + "".join(f"{f},{label},{g}\n" for f, label, g in with_rows))
        cfg = from_dict({"name": "t", "results_dir": str(tmp_path / "out"), "folds": {"k": 3, "repeats": 2, "seed": seed},
                         "data": {"source": str(csv), "group_column": group_column, "near_copies": near_copies}})
        return cfg, lambda: run_data(cfg, ExperimentPaths.of(cfg))

    with_mislabelled = rows + [(mislabelled.relative_to(tmp_path), "platelet", "gx")]
    run(with_mislabelled)
    manifest = scan(csv)
    original_of = {f: next(o for o in manifest["file"] if Path(o).stem == Path(f).stem.rsplit("_", 1)[0])
                   for f in manifest["file"] if f.endswith(("_q50.jpg", "_half.png"))}
    for seed in range(20):  # folds where some copy is with its original in both repeats, some only in the first
        folds = assign_folds(manifest, FoldsConfig(k=3, repeats=2, seed=seed)).set_index(manifest["file"])
        apart = {" ~ ".join(sorted(pair)): tuple(bool(folds.loc[pair[0], c] != folds.loc[pair[1], c])
                                                 for c in ("fold", "fold_r1")) for pair in original_of.items()}
        if {(False, False), (False, True)} <= set(apart.values()):
            break
    split = [pair for pair, where in apart.items() if any(where)]
    cfg, stage = run(with_mislabelled, seed=seed)
    with pytest.raises(DataError) as caught:
        stage()
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.endswith("(if they are distinct images, set data.near_copies: allow)")
    assert "1 picture(s) under two labels (one image re-encoded or resized): " + " ~ ".join(sorted(
        [f"{originals[0][2].relative_to(tmp_path)} (eosinophil)", f"{mislabelled.relative_to(tmp_path)} (platelet)"]))\
        + "; correct the label or keep one" in message
    assert f"{len(split)} pair(s) of near-identical images (one picture re-encoded or resized) in different folds" in message
    assert message.count(" ~ ") == len(split) + 1 and all(pair in message for pair in split)
    assert not (tmp_path / "out" / "t" / "manifest.parquet").exists()
    _, grouped = run(rows, group_column="patient", seed=seed)
    assert len(grouped()) == 24 + 6
    _, allowed = run(with_mislabelled, near_copies="allow", seed=seed)
    assert len(allowed()) == 24 + 7  # named in a warning (logs.warn), and the stage goes on


def _png_rgb16(path: Path, pixels) -> None:
    """A 16-bit-per-channel colour PNG (a colour microscope camera's), written by hand: Pillow writes none."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_colour_and_negative_pixels_are_refused_and_unsigned_deep_grey_kept(tree):
    """Pillow reads 16 bits per channel of colour (or of grey with alpha) as their high bytes: a 12-bit camera's
    frame, values up to 4000, came out with a maximum of 15; and negative pixels would wrap round to bright ones
    in the cast to 8 bits. Both are named at once (the first from the header), and load_image refuses negative
    pixels it is given anyway. A 32-bit integer TIFF (Pillow writes mode I as signed) with no negative pixel is
    an image like any 16-bit grey one."""
    import numpy as np

    cells = np.random.default_rng(0).integers(200, 4000, (16, 16, 3)).astype(np.uint16)
    _png_rgb16(tree / "good" / "colour16.png", cells)
    assert Image.open(tree / "good" / "colour16.png").mode == "RGB"  # what the mode check alone let through
    signed = np.full((16, 16), -50, np.int32)
    signed[4:8, 4:8] = 3000
    Image.fromarray(signed).save(tree / "bad" / "signed.tif")
    with pytest.raises(DataError) as caught:
        scan(tree)
    message = str(caught.value)
    assert "2 of 18 images cannot be used" in message and len(message.splitlines()) == 1
    assert "colour16.png: 16 bits per channel (RGB;16B), which Pillow reads as their high 8 bits" in message
    assert r"signed.tif: negative pixel values (down to -50)" in message
    with pytest.raises(DataError, match=r"signed.tif: negative pixel values \(down to -50\); shift them to 0"):
        load_image(tree / "bad" / "signed.tif")
    (tree / "good" / "colour16.png").unlink()
    Image.fromarray(np.clip(signed, 0, None)).save(tree / "bad" / "signed.tif")  # the same file type, no negative
    assert scan(tree).set_index("file").loc["bad/signed.tif", "mode"] == "I"
    assert np.asarray(load_image(tree / "bad" / "signed.tif"))[6, 6, 0] == 255


def test_distinct_fields_sharing_a_scale_bar_and_stamp_are_not_near_copies_and_a_resaved_one_is(tmp_path):
    """Sparse fields of one microscope agree mostly in what they share: a burned-in scale bar and time stamp (and
    vignetting, dust): most pairs of their raw signatures pass both thresholds. Less the set's shared pattern, distinct fields
    are no pair and a JPEG re-save of one is exactly one (the truth is known: the files are drawn here)."""
    import numpy as np
    from PIL import ImageDraw

    from ooc_ray.near_copies import DETAIL_MIN, THUMBNAIL_MIN, image_signatures, near_copy_pairs

    height, width = 240, 320
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for k in range(8):
        rng = np.random.default_rng(k)
        field = 8 + 30 * np.exp(-((yy - height / 2) ** 2 + (xx - width / 2) ** 2) / 2e5) + rng.normal(0, 2, yy.shape)
        for _ in range(3):  # three faint cells
            cy, cx, size = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, 10)
            field += 30 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * size ** 2))
        image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.rectangle([width - 100, height - 20, width - 20, height - 14], fill=255)
        draw.text((10, 10), "t=00:15:00  20x  100 um", fill=255)
        image.save(tmp_path / f"field{k}.png")
        paths.append(str(tmp_path / f"field{k}.png"))
    Image.open(paths[3]).save(tmp_path / "field3_again.jpg", quality=90)
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    thumbnails, details = image_signatures(paths, digests, tmp_path / "signatures.npz")
    upper = np.triu_indices(8, 1)
    # Their raw signatures: what a plain correlation at the thresholds would call copies.
    plainly = ((thumbnails @ thumbnails.T)[upper] >= THUMBNAIL_MIN) & ((details @ details.T)[upper] >= DETAIL_MIN)
    assert plainly.sum() >= 10, plainly.sum()
    assert near_copy_pairs((thumbnails, details)) == []
    again = paths + [str(tmp_path / "field3_again.jpg")]
    digests.append(hashlib.sha256((tmp_path / "field3_again.jpg").read_bytes()).hexdigest())
    assert near_copy_pairs(image_signatures(again, digests, tmp_path / "signatures.npz")) == [(3, 8)]
