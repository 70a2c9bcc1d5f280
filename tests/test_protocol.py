"""The protocol's arithmetic (docs/design.md "Exact semantics"): training sets, pool sizes, grid shape, metrics.
Pandas only, no TF or Ray."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import fake_synthetic, make_manifest

from ooc_ray.classify.metrics import compute_metrics
from ooc_ray.load import from_dict
from ooc_ray.errors import TrainsetError
from ooc_ray.folds import ALL_FOLDS
from ooc_ray.protocol import TrialSpec, grid_points, largest_remainder, plan_loras, pool_sizes, round_half_up
from ooc_ray.trainsets import PoolIndex, build_testset, build_trainset, plan_trials

CLASSES = ("good", "acceptable", "bad")


def paper_manifest():
    return make_manifest((50, 21, 11), k=5, labels=CLASSES, fold_seed=0).sample(frac=1.0, random_state=0)


@pytest.fixture(scope="module")
def tables():
    m = paper_manifest()
    return m, fake_synthetic(m, weights=(1.0, 0.8), extra=3)


def spec(fold, ratio, weight, synthetic_only=False):
    return TrialSpec(fold, ratio, weight, synthetic_only)


def test_round_half_up():
    assert round_half_up(0.25 * 658) == 165  # 164.5: half up, not banker's 164
    assert round_half_up(0.1 * 30) == 3
    assert round_half_up(0.15 * 10) == 2
    assert round_half_up(0.0) == 0


@pytest.mark.parametrize("total", [0, 1, 2, 7, 65, 66, 164, 658, 1000])
def test_largest_remainder_sums_and_is_proportional(total):
    counts = [400, 170, 88]
    parts = largest_remainder(total, counts)
    assert parts.sum() == total
    exact = total * np.array(counts) / sum(counts)
    assert np.all(np.abs(parts - exact) < 1.0)


def test_largest_remainder_ties_go_to_lower_class_index():
    assert largest_remainder(1, [1, 1, 1]).tolist() == [1, 0, 0]
    assert largest_remainder(2, [1, 1, 1]).tolist() == [1, 1, 0]
    with pytest.raises(ValueError):
        largest_remainder(3, [0, 0])


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_trainset_counts_and_proportions(tables, ratio):
    m, s = tables
    for fold in range(5):
        train = build_trainset(m, s, spec(fold, ratio, 1.0), seed=0)
        real = train[train["source"] == "real"]
        syn = train[train["source"] == "synthetic"]
        n_train = int((m["fold"] != fold).sum())
        assert len(real) == n_train
        assert len(syn) == round_half_up(ratio * n_train)
        real_counts = np.bincount(real["label_index"], minlength=3)
        assert np.bincount(syn["label_index"], minlength=3).tolist() == \
            largest_remainder(len(syn), real_counts).tolist()
        # drawn from this fold's pool of this weight, without replacement
        pool = s[(s["fold"] == fold) & (s["weight"] == 1.0)]
        assert set(syn["id"]) <= set(pool["id"])
        assert not syn["id"].duplicated().any()
        assert not train["path"].duplicated().any()


def test_pool_index_selects_what_the_filter_selects(tables):
    """plan_trials' PoolIndex picks the rows, order and index of (fold == f) & isclose(weight, w) on the whole
    table, also with float folds, weights off by float noise or missing, shuffled rows and duplicate labels."""
    _, s = tables
    rng = np.random.default_rng(0)
    weights = (s["weight"] + np.where(rng.random(len(s)) < 0.3, 1e-9, 0.0)).to_numpy(copy=True)
    weights[:10] = np.nan
    s = s.assign(fold=s["fold"].astype(float), weight=weights).sample(frac=1, random_state=0)
    s = s.set_axis(rng.integers(0, 20, len(s)))
    index = PoolIndex(s)
    for fold in (ALL_FOLDS, 0, 3, 7):
        for weight in (1.0, 0.8, 0.5, 1.0 + 1e-7):
            expected = s[(s["fold"] == fold) & np.isclose(s["weight"].astype(float), weight)]
            pd.testing.assert_frame_equal(index.rows(fold, weight), expected)


def test_no_overlap_with_held_out_fold(tables):
    m, s = tables
    for fold in range(5):
        test = build_testset(m, fold)
        assert (test["source"] == "real").all()
        assert len(test) == int((m["fold"] == fold).sum())
        for ratio, synth in [(0.0, False), (0.5, False), (1.0, True)]:
            train = build_trainset(m, s, spec(fold, ratio, 0.8, synth))
            assert not set(train["id"]) & set(test["id"])
            assert not set(train["path"]) & set(test["path"])


def test_synthetic_only(tables):
    m, s = tables
    train = build_trainset(m, s, spec(2, 1.0, 0.8, True))
    n_train = int((m["fold"] != 2).sum())
    assert (train["source"] == "synthetic").all() and len(train) == n_train
    real_counts = np.bincount(m.loc[m["fold"] != 2, "label_index"], minlength=3)
    assert np.bincount(train["label_index"], minlength=3).tolist() == real_counts.tolist()
    assert set(train["id"]) <= set(s[(s["fold"] == 2) & (s["weight"] == 0.8)]["id"])


def test_ratio_zero_ignores_weight_and_synthetic_table(tables):
    m, s = tables
    a = build_trainset(m, s, spec(1, 0.0, None))
    b = build_trainset(m, None, spec(1, 0.0, float("nan")))
    pd.testing.assert_frame_equal(a, b)
    assert (a["source"] == "real").all()


def test_deterministic_and_independent_of_row_order(tables):
    m, s = tables
    a = build_trainset(m, s, spec(0, 0.5, 1.0), seed=3)
    b = build_trainset(m.sample(frac=1, random_state=1), s.sample(frac=1, random_state=2), spec(0, 0.5, 1.0), seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = build_trainset(m, s, spec(0, 0.5, 1.0), seed=4)
    assert set(a["id"]) != set(c["id"])  # the seed matters


def test_ratios_draw_nested_subsets(tables):
    m, s = tables
    previous = set()
    for ratio in [0.1, 0.25, 0.5, 0.75, 1.0]:
        syn = build_trainset(m, s, spec(3, ratio, 1.0))
        ids = set(syn.loc[syn["source"] == "synthetic", "id"])
        assert previous <= ids
        previous = ids


def test_pool_too_small_names_fold_class_weight_counts(tables):
    m, _ = tables
    small = fake_synthetic(m, weights=(1.0,), extra=0)
    small = small[~((small["label"] == "bad") & (small["fold"] == 1) & small["id"].str.endswith(("0000", "0001")))]
    build_trainset(m, small, spec(1, 0.5, 1.0))  # enough for half
    with pytest.raises(TrainsetError) as err:
        build_trainset(m, small, spec(1, 1.0, 1.0, True))
    msg = str(err.value)
    n_bad = int(((m["fold"] != 1) & (m["label"] == "bad")).sum())
    for part in ["fold 1", "'bad'", "weight 1", f"need {n_bad}", f"has {n_bad - 2}"]:
        assert part in msg, (part, msg)


def test_missing_weight_or_table_errors(tables):
    m, s = tables
    with pytest.raises(TrainsetError, match="LoRA weight"):
        build_trainset(m, s, spec(0, 0.5, None))
    with pytest.raises(TrainsetError, match="empty"):
        build_trainset(m, None, spec(0, 0.5, 1.0))
    with pytest.raises(TrainsetError, match="need"):  # no pool of weight 0.5 at all
        build_trainset(m, s, spec(0, 0.5, 0.5))
    bad = s.assign(label=s["label"].replace({"bad": "awful"}))
    with pytest.raises(TrainsetError, match="awful"):
        build_trainset(m, bad, spec(0, 0.5, 1.0))


def test_generator_split_all_uses_all_rows():
    m = paper_manifest()
    s = fake_synthetic(m, split="all", extra=3)
    assert (s["fold"] == ALL_FOLDS).all()
    for fold in range(5):
        train = build_trainset(m, s, spec(fold, 1.0, 1.0), split="all")
        assert (train.loc[train["source"] == "synthetic", "id"].str.startswith(f"syn-{ALL_FOLDS}-")).all()
    with pytest.raises(TrainsetError):  # the per-fold protocol finds no pool of fold 0
        build_trainset(m, s, spec(0, 0.5, 1.0), split="fold")


def cfg_of(**classify):
    return from_dict({"folds": {"k": 5}, "sample": {"weights": [1.0, 0.8]}, "classify": classify})


def test_paper_grid_shape():
    specs = grid_points(cfg_of(), list(range(5)))
    assert len(specs) == 65  # 5 folds x (real + 2 weights x (5 ratios + synthetic only))
    real = [s for s in specs if s.arm == "real"]
    assert len(real) == 5 and all(s.weight is None for s in real)
    synth = [s for s in specs if s.synthetic_only]
    assert len(synth) == 10 and {s.arm for s in synth} == {"synthetic_only"}
    assert {s.arm for s in specs} == {"real", "real+10%", "real+25%", "real+50%", "real+75%", "real+100%",
                                     "synthetic_only"}
    assert len(grid_points(cfg_of(synthetic_only=False, ratios=[0.5]), list(range(5)))) == 10


def test_planned_trials_have_unique_stable_keys(tables):
    m, s = tables
    planned = plan_trials(cfg_of(), m, s, "none")
    keys = [t.key for t in planned]
    assert len(set(keys)) == 65 and keys == [t.key for t in plan_trials(cfg_of(), m, s, "none")]
    assert keys[0].startswith("fold0-r0-w-")
    # resources leave keys alone; a result field and the backbone weights move every key
    assert [t.key for t in plan_trials(cfg_of(gpus_per_trial=1.0, cpus_per_trial=4.0, max_failures=5), m, s,
                                       "none")] == keys
    assert not set(t.key for t in plan_trials(cfg_of(epochs=3), m, s, "none")) & set(keys)
    assert not set(t.key for t in plan_trials(cfg_of(), m, s, "imagenet")) & set(keys)
    # the grid's shape does not move the trials it keeps
    smaller = plan_trials(cfg_of(ratios=[0.0, 0.5]), m, s, "none")
    assert {t.key for t in smaller} < set(keys)


def test_arm_names():
    assert spec(0, 0.0, None).arm == "real"
    assert spec(0, 0.1, 1.0).arm == "real+10%"
    assert spec(0, 0.125, 1.0).arm == "real+12.5%"
    assert spec(0, 1.0, 1.0, True).arm == "synthetic_only"


def test_pool_sizes():
    # 30 good + 10 bad over 3 folds: each fold trains on 20 good, 6-7 bad.
    m = make_manifest((30, 10), k=3, labels=("good", "bad"), groups=("a", "b"))
    cfg = from_dict({"classify": {"ratios": [0.0, 0.1, 0.5], "synthetic_only": False}})
    got = pool_sizes(m, cfg)
    assert list(got.columns) == ["fold", "label", "n_train", "n_pool"]
    n_train = got.set_index(["fold", "label"]).n_train.to_dict()
    assert n_train == {(0, "bad"): 6, (0, "good"): 20, (1, "bad"): 7, (1, "good"): 20, (2, "bad"): 7,
                       (2, "good"): 20}
    assert got.set_index(["fold", "label"]).n_pool.to_dict() == {
        (0, "bad"): 3, (0, "good"): 10, (1, "bad"): 4, (1, "good"): 10, (2, "bad"): 4, (2, "good"): 10}
    # synthetic-only needs a full n_train pool even when the largest ratio is smaller
    only = pool_sizes(m, from_dict({"classify": {"ratios": [0.5], "synthetic_only": True}}))
    assert (only.n_pool == only.n_train).all()
    # 0.1 x 30 = 3.0000000000000004 in floating point: still 3, not 4
    ten = make_manifest((60, 2), k=2, labels=("good", "bad"))
    tens = pool_sizes(ten, from_dict({"classify": {"ratios": [0.1], "synthetic_only": False}}))
    assert tens[tens.label == "good"].n_pool.tolist() == [3, 3]
    # split "all": one pool per class, big enough for the largest training fold
    alls = pool_sizes(m, from_dict({"generator": {"split": "all"}, "classify": {"ratios": [1.0]}}))
    assert alls.to_dict("records") == [{"fold": ALL_FOLDS, "label": "bad", "n_train": 7, "n_pool": 7},
                                       {"fold": ALL_FOLDS, "label": "good", "n_train": 20, "n_pool": 20}]
    grp = pool_sizes(m, from_dict({"data": {"group_column": "cell_line"}, "generator": {"per_group": True},
                                   "classify": {"ratios": [1.0]}}))
    assert list(grp.columns) == ["fold", "label", "group", "n_train", "n_pool"]
    assert grp.groupby(["fold", "label"]).n_train.sum().to_dict() == n_train


def test_pools_cover_every_draw():
    """Pools hold at least what build_trainset draws for every arm, also when the largest ratio is not 1:
    rounding the fold's total first can give a class one image more than ceil(r x n_class)."""
    m = make_manifest((20, 2, 2, 2, 2, 2), k=2, labels=("a", "b", "c", "d", "e", "f"))
    cfg = from_dict({"classify": {"ratios": [0.1], "synthetic_only": False}})
    pools = pool_sizes(m, cfg).set_index(["fold", "label"])["n_pool"]
    # each fold trains on 10 a + one of b..f: 0.1 x 15 = 1.5 -> 2 images; quotas 1.33 (a) and 0.13 (b..f):
    # a gets both, but ceil(0.1 x 10) = 1
    draw = largest_remainder(round_half_up(0.1 * 15), [10, 1, 1, 1, 1, 1])
    assert draw.tolist() == [2, 0, 0, 0, 0, 0]
    assert pools[(0, "a")] == 2 and pools[(1, "a")] == 2


def test_metrics_macro_and_confusion():
    out = compute_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 1], 3)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["per_class_recall"] == [0.5, 1.0, 0.0]
    assert out["recall_macro"] == pytest.approx(0.5)
    assert out["precision_macro"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # class 2 never predicted: 0
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert not math.isnan(out["f1_macro"])


def test_matched_controls_train_on_as_many_real_images_as_their_arm(tmp_path):
    """real_steps: the real set plus round(r x n) more real rows, per class as synthetic ones would be (so as many
    steps as the real + r arm); real_augmented: as many classic augmentations, each named by its identity."""
    from ooc_ray.classic import augmented_identity
    from ooc_ray.trainsets import augmented_source

    m = make_manifest(per_class=(9, 5, 3), k=3)
    s = fake_synthetic(m, weights=(1.0, 0.8), extra=20)
    cfg = cfg_of(ratios=[0.0, 0.5, 2.0], controls=["real_steps", "real_augmented"])
    planned = {(t.spec.fold, t.spec.ratio, t.spec.control, t.spec.weight): t
               for t in plan_trials(cfg, m, s, "none", augmented_dir=tmp_path / "aug")}
    # per fold: real, 2 weights x (2 ratios + synthetic only), 2 controls x 2 ratios (once, not per weight)
    assert len(planned) == 3 * (1 + 2 * 3 + 2 * 2)
    for fold in range(3):
        real = planned[(fold, 0.0, "", None)].train
        for ratio in (0.5, 2.0):
            arm = planned[(fold, ratio, "", 1.0)].train
            steps = planned[(fold, ratio, "real_steps", None)].train
            augmented = planned[(fold, ratio, "real_augmented", None)].train
            for control in (steps, augmented):
                assert len(control) == len(arm)
                assert (control["label"].value_counts() == arm["label"].value_counts()).all()
            assert set(steps["source"]) == {"real"} and set(steps["id"]) <= set(real["id"])
            extra = augmented[augmented["source"] == "augmented"]
            assert len(extra) == (arm["source"] == "synthetic").sum() and not set(extra["id"]) & set(real["id"])
            source = m.set_index("id")
            for row in extra.itertuples():
                image_id, copy = augmented_source(row.id)
                assert source.loc[image_id, "label"] == row.label  # a copy keeps its image's class
                assert row.sha256 == augmented_identity(source.loc[image_id, "sha256"], int(copy))
                assert row.path.startswith(str(tmp_path / "aug"))
            assert extra["id"].is_unique
    # Controls do not depend on the LoRA weight, and their keys are their own.
    keys = [t.key for t in planned.values()]
    assert len(set(keys)) == len(keys)
    with pytest.raises(TrainsetError, match="real_augmented control needs a folder"):
        plan_trials(cfg, m, s, "none")


def test_classic_augmentation_is_a_pure_function_of_image_and_copy(tmp_path):
    import numpy as np
    from PIL import Image

    from ooc_ray.classic import augment, augmented_identity, augmented_path, write_missing

    m = make_manifest(per_class=(2,), k=2, root=tmp_path, size=32)
    src = m.iloc[0]
    first, second = augmented_identity(src["sha256"], 0), augmented_identity(src["sha256"], 1)
    image = Image.open(src["path"]).convert("RGB")
    a, b = np.asarray(augment(image, first)), np.asarray(augment(image, first))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)  # the same copy, the same pixels
    assert not np.array_equal(a, np.asarray(augment(image, second)))  # another copy, other pixels
    assert not np.array_equal(a, np.asarray(image))
    rows = pd.DataFrame({"path": [augmented_path(tmp_path / "aug", i) for i in (first, second)], "sha256": [first, second]})
    assert write_missing(rows, {first: src["path"], second: src["path"]}) == 2
    assert np.array_equal(np.asarray(Image.open(rows["path"][0])), a)
    Path(rows["path"][1]).write_bytes(b"half a png")  # damaged: written again, the rest kept
    assert write_missing(rows, {first: src["path"], second: src["path"]}) == 1


def test_one_lora_per_data_set_trains_on_every_class_with_its_captions():
    m = make_manifest(per_class=(6, 4, 3), k=3)
    per_class = plan_loras(from_dict({"folds": {"k": 3}}), m, "base")
    whole = plan_loras(from_dict({"folds": {"k": 3}, "generator": {"scope": "dataset"}}), m, "base")
    assert len(per_class) == 9 and len(whole) == 3  # 3 folds x 3 classes vs one per fold
    for job in whole:
        train = m[m["fold"] != job.fold].sort_values("id")
        assert list(job.image_ids) == train["id"].tolist() and list(job.image_labels) == train["label"].tolist()
        assert job.label == "" and job.labels() == sorted(CLASSES)
        captions = dict(zip(job.image_ids, job.captions()))
        assert all(captions[i] == f"a microscopy image of {label} organ on chip cells"
                   for i, label in zip(train["id"], train["label"]))
    assert not {j.key for j in whole} & {j.key for j in per_class}
    # A relabelled image changes the data-set LoRA (its caption changed), not only its class LoRAs.
    relabelled = m.copy()
    relabelled.loc[relabelled["id"] == "good-000", "label"] = "bad"
    again = plan_loras(from_dict({"folds": {"k": 3}, "generator": {"scope": "dataset"}}), relabelled, "base")
    changed = {j.fold for j, k in zip(whole, again) if j.key != k.key}
    assert changed == {f for f in range(3) if f != int(m.loc[m["id"] == "good-000", "fold"].iloc[0])}
    with pytest.raises(Exception, match="one LoRA per dataset has no group"):
        from_dict({"generator": {"scope": "dataset", "per_group": True}})


def _another(value, hint):
    """A different valid value of a config field (another Literal choice, the opposite bool, one more, half)."""
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value and c != "SmallCNN")
    if origin is tuple:
        return value[:-1] if value else typing.get_args(typing.get_args(hint)[0])[:1]
    if hint is bool:
        return not value
    if hint is int:
        return value + 1
    if hint is float:
        return value / 2 if value else 0.5
    raise AssertionError(f"no other value for {hint}")


def _trial_fields() -> list[str]:
    from ooc_ray.roles import RESULT
    from ooc_ray.fields import field_roles

    return sorted(name for name, meta in field_roles().items()
                  if meta.get("role") == RESULT and "trial" in meta.get("feeds", ()))


@pytest.mark.parametrize("field", _trial_fields())
def test_every_result_field_of_a_trial_changes_its_planned_keys(tables, field):
    """For every config field whose role says it feeds the trial key: with its condition met (only_if), another
    value plans other keys for the trials it acts on. A field that acts but plans the same keys would let two
    settings share, and overwrite, one trial's files."""
    import typing

    from ooc_ray.config import ExperimentConfig
    from ooc_ray.fields import field_roles
    from ooc_ray.fields import with_value as _with_value

    manifest, synthetic = tables
    base = from_dict({"sample": {"weights": [1.0]}, "classify": {
        "backbone": "EfficientNetB0", "weights": "random", "mode": "exact", "ratios": [0.0, 0.5]}})
    meta = field_roles()[field]
    section, name = field.rsplit(".", 1)
    if field == "classify.train_backbone":  # random is a frozen backbone; blocks that train start from none,
        base = _with_value(_with_value(base, "classify.weights", "none"), field, 1)  # where quality needs no backbone
        base = _with_value(base, "quality.features", "image_statistics")
    if meta.get("only_if"):
        sibling, wanted = meta["only_if"]
        base = _with_value(base, f"{section}.{sibling}", wanted)
    hint = typing.get_type_hints(type(getattr(base, section)))[name]
    value = getattr(getattr(base, section), name)
    other = from_dict(_as_raw(_with_value(base, field, _another(value, hint))))  # validated like a file
    base = from_dict(_as_raw(base))

    def planned(cfg: ExperimentConfig) -> set[str]:
        return {t.key for t in plan_trials(cfg, manifest, synthetic, "none")}

    assert planned(base) != planned(other), f"{field}: {value!r} and another value plan the same trial keys"


def _as_raw(cfg) -> dict:
    from ooc_ray.fields import to_dict

    raw = to_dict(cfg)
    raw.pop("axes")
    return raw


# Config fields the trial code reads that are not results feeding its key, each with why its value cannot change a
# trial's numbers (or how its content enters the key instead).
READ_BUT_NOT_KEYED = {
    "weights": "input: the weights' identity (file digest, calibration recipe) enters the key, not the name",
    "cpus_per_trial": "threads per trial: Keras's results do not depend on it (resource)",
    "gpus_per_trial": "where the trial runs (resource); a GPU asked for and missing fails loud",
    "max_failures": "Tune's retries (resource)",
    "max_concurrent": "how many trials at a time (resource)",
    "ratios": "grid: each trial's ratio is in its point", "synthetic_only": "grid: in each trial's point",
    "controls": "grid: each control's name is in its point",
}


def test_every_classify_field_the_trial_code_reads_is_keyed_or_said_why_not(repo):
    """Read the classifier's code (ooc_ray/classify, features.py, backbones.py, networks.py): every ClassifyConfig field it
    uses (`cc.x`, `classify.x`) must be a result feeding the trial key, or be listed above with the reason it is
    not. A field demoted to a resource (classify.replace_probability once: out of the key, so p = 0 and p = 0.5
    wrote one trial's files) fails here by name."""
    import ast
    import dataclasses

    from ooc_ray.config import ClassifyConfig
    from ooc_ray.roles import RESULT

    fields = {f.name: f.metadata for f in dataclasses.fields(ClassifyConfig)}
    files = [*sorted((repo / "ooc_ray" / "classify").glob("*.py")), repo / "ooc_ray" / "features.py",
             repo / "ooc_ray" / "backbones.py", repo / "ooc_ray" / "networks.py"]
    read = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in fields:
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "cc") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "classify"):
                    read.add(node.attr)
    assert {"replace_probability", "synthetic_loss_weight", "epochs", "mixing"} <= read  # the scan sees them
    unkeyed = {name for name in read if not (fields[name].get("role") == RESULT and "trial" in fields[name]["feeds"])}
    assert unkeyed <= set(READ_BUT_NOT_KEYED), f"read by the trials but out of their keys: {unkeyed - set(READ_BUT_NOT_KEYED)}"


def test_real_fractions_are_nested_per_fold_and_class_and_the_held_out_fold_stays_whole():
    """classify.real_fraction keeps round(f x n) images per class of each training fold, in an order hashed from
    (fold, id): 0.25's images inside 0.5's inside the whole fold, whatever the manifest's row order."""
    import hashlib

    from ooc_ray.errors import DataError
    from ooc_ray.folds import held_out_rows, train_rows

    m = paper_manifest()  # 50, 21, 11 images; k = 5
    for fold in range(5):
        whole = train_rows(m, fold)
        sets = {f: set(train_rows(m, fold, f)["id"]) for f in (0.25, 0.5, 1.0)}
        assert sets[0.25] < sets[0.5] < sets[1.0] == set(whole["id"])
        for label, rows in whole.groupby("label"):
            half = train_rows(m, fold, 0.5)
            assert (half["label"] == label).sum() == round_half_up(0.5 * len(rows))
            # An independent spelling of the order: the first ids by sha256 of "real_fraction|fold|id".
            ranked = sorted(rows["id"], key=lambda i: hashlib.sha256(f"real_fraction|{fold}|{i}".encode()).hexdigest())
            assert set(half.loc[half["label"] == label, "id"]) == set(ranked[:round_half_up(0.5 * len(rows))])
        shuffled = m.sample(frac=1.0, random_state=7)
        assert train_rows(shuffled, fold, 0.25)["id"].tolist() == train_rows(m, fold, 0.25)["id"].tolist()
        assert held_out_rows(m, fold)["id"].tolist() == build_testset(m, fold)["id"].tolist()
    # The other folds' orders differ: a fraction is not the same images in every fold.
    assert set(train_rows(m, 0, 0.25)["id"]) != set(train_rows(m, 1, 0.25)["id"])
    with pytest.raises(DataError, match=r"classify.real_fraction 0.05 keeps no image of class 'bad' \(8 images\) of fold 0"):
        train_rows(m, 0, 0.05)  # 'bad' has 8 training images in fold 0: round(0.4) = 0


def test_a_fraction_flows_into_loras_pools_and_trials_and_fraction_one_changes_no_key(tables):
    m, synthetic = tables
    full = from_dict({"folds": {"k": 5}, "data": {"classes": list(CLASSES)}})
    same = from_dict({"folds": {"k": 5}, "data": {"classes": list(CLASSES)}, "classify": {"real_fraction": 1.0}})
    half = from_dict({"folds": {"k": 5}, "data": {"classes": list(CLASSES)}, "classify": {"real_fraction": 0.5}})
    assert [j.key for j in plan_loras(full, m, "base")] == [j.key for j in plan_loras(same, m, "base")]
    from ooc_ray.folds import train_rows

    for job in plan_loras(half, m, "base"):
        own = train_rows(m, job.fold, 0.5)
        assert set(job.image_ids) == set(own.loc[own["label"] == job.label, "id"])
    assert set(plan_loras(half, m, "base")).isdisjoint(plan_loras(full, m, "base"))
    sizes = pool_sizes(m, half).set_index(["fold", "label"])
    assert sizes.loc[(0, "good"), "n_train"] == round_half_up(0.5 * 40)  # 'good': 40 training images in fold 0
    trials = {t.spec: t for t in plan_trials(half, m, synthetic, "imagenet")}
    base = {t.spec: t for t in plan_trials(full, m, synthetic, "imagenet")}
    for spec_, trial in trials.items():
        real = trial.train[trial.train["source"] == "real"]
        assert set(real["id"]) <= set(train_rows(m, spec_.fold, 0.5)["id"])
        assert trial.test["id"].tolist() == base[spec_].test["id"].tolist() and trial.key != base[spec_].key


def test_the_quality_key_holds_the_real_fraction_its_reference_images_come_from(tables):
    from ooc_ray import keys

    m, synthetic = tables
    cfgs = [from_dict({})] + [from_dict({"classify": {"real_fraction": f}}) for f in (1.0, 0.5)]
    default, one, half = (keys.quality_key(c, "features", m, synthetic, 3) for c in cfgs)
    assert default == one != half  # the same pools scored against other real images: another table


def test_a_classic_copy_of_a_non_square_image_keeps_its_shape_and_shows_only_its_pixels(monkeypatch):
    """A 400x300 field (the paper's 4:3, scaled down): with the small rotation, crop and jitter held at identity,
    every copy is the image flipped or turned half way, 400x300, each pixel one of the original's (version 1
    made copies square: 400x400 with a quarter mirror padding, or turned to 300x300 with a quarter cut away).
    With the whole recipe, copies stay 400x300."""
    import numpy as np
    from PIL import Image

    import ooc_ray.classic as classic
    from ooc_ray.classic import augment, augmented_identity

    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    half_turns = [pixels, pixels[::-1], pixels[:, ::-1], pixels[::-1, ::-1]]  # flips and the half turn
    for name, identity in (("MAX_ROTATION_DEGREES", 0.0), ("CROP_RANGE", (1.0, 1.0)), ("JITTER_RANGE", (1.0, 1.0))):
        monkeypatch.setattr(classic, name, identity)
    for copy in range(8):
        out = np.asarray(augment(image, augmented_identity("ab" * 32, copy)))
        assert out.shape == (300, 400, 3) and any(np.array_equal(out, v) for v in half_turns), copy
    monkeypatch.undo()
    assert all(augment(image, augmented_identity("cd" * 32, c)).size == (400, 300) for c in range(8))


def test_a_data_set_loras_classes_and_a_searchs_weights_never_share_a_folder_or_an_id(tmp_path):
    """Folders and ids of pool images name a class and a weight in a folder-safe form: "CD4+" and "CD4-" (one
    data-set LoRA draws both) were both "CD4", and 0.7000001 and 0.7000004 (two search points) both "0.7", so
    one class's or point's rows pointed at the other's images. Safe labels and short weights keep their names."""
    import dataclasses
    import types

    from ooc_ray.sample import plan_images

    cfg = from_dict({})
    lora = {"lora_key": "fold0_dataset_k", "label": "", "group": "", "fold": 0, "sha256": "s", "weights_sha256": "w",
            "prompt": "a microscopy image of {label} cells", "dir": "d", "file": "f"}
    base = types.SimpleNamespace(identity="base")
    labels = ["CD4+", "CD4-", "good"]
    for weights in ((1.0, 0.8), (0.7000001, 0.7000004)):
        plan = plan_images(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, weights=weights)), base,
                           pd.DataFrame([lora]), {("fold0_dataset_k", label): 2 for label in labels},
                           {("fold0_dataset_k", label): pd.DataFrame() for label in labels}, tmp_path)
        assert plan["path"].is_unique and plan["id"].is_unique and len(plan) == 2 * 3 * 2
    folders = {Path(p).parent.name for p in plan["path"]}
    assert "good" in folders and len(folders) == 3
    assert {Path(p).parent.parent.name for p in plan["path"]} == {"w0.7000001", "w0.7000004"}


def test_a_strategy_that_takes_real_onlys_steps_runs_no_steps_control():
    """real_steps matches the steps of an arm that adds images to the real set (concat, split_bn); a
    loss_weighted or replace arm takes real only's steps (measured by a review: 4 per epoch beside the
    control's 8), so under them (variants of a mixing axis) the control is not planned; real_augmented (as many
    images) still is. A file whose every variant is such is refused (test_config)."""
    import dataclasses

    cfg = from_dict({"classify": {"ratios": [0.0, 1.0], "controls": ["real_steps", "real_augmented"]}})
    for mixing, controls in (("concat", {"real_steps", "real_augmented"}), ("split_bn", {"real_steps", "real_augmented"}),
                             ("loss_weighted", {"real_augmented"}), ("replace", {"real_augmented"})):
        variant = dataclasses.replace(cfg, classify=dataclasses.replace(cfg.classify, mixing=mixing))
        assert {spec.control for spec in grid_points(variant, [0]) if spec.control} == controls, mixing


def test_ratios_this_data_cannot_tell_apart_are_refused_naming_the_fold():
    """On 6 real training images per fold, ratio 0.05 draws round(0.3) = 0 synthetic images (an arm that is real
    only under another name, one more Holm comparison) and 0.5 and 0.55 both draw 3 (one training set in two
    rows): refused before anything samples or trains, at the first fold where each happens."""
    from ooc_ray.errors import ConfigError
    from ooc_ray.protocol import check_ratios

    manifest = make_manifest((6, 6))  # 2 folds: 6 training images each
    check_ratios(manifest, from_dict({"classify": {"ratios": [0.0, 0.5, 1.0]}}))  # 3 and 6: fine
    with pytest.raises(ConfigError, match=r"classify.ratios: \[0.05\] of fold 0's 6 real training images draw no "
                                          r"synthetic image.*\[0.5, 0.55\] each draw 3 synthetic images on fold 0"):
        check_ratios(manifest, from_dict({"classify": {"ratios": [0.0, 0.05, 0.5, 0.55]}}))
    with pytest.raises(ConfigError, match="draw no synthetic image"):  # the sample stage's pools refuse it too
        pool_sizes(manifest, from_dict({"classify": {"ratios": [0.0, 0.05]}}))
