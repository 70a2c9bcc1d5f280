"""Training-set semantics (DESIGN.md "Exact semantics"), grid shape and metrics: pandas only, no TF/Ray."""
import math

import numpy as np
import pandas as pd
import pytest

from ooc_ray.classify import (
    TrainsetError,
    arm_name,
    build_testset,
    build_trainset,
    compute_metrics,
    config_key,
    largest_remainder,
    round_half_up,
    trial_specs,
)
from ooc_ray.config import from_dict

CLASSES = ["good", "acceptable", "bad"]


def make_manifest(per_class=(50, 21, 11), k=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(per_class):
        folds = rng.permutation(np.arange(n) % k)
        for i in range(n):
            rows.append({"id": f"{CLASSES[c]}-{i:03d}", "path": f"/data/{CLASSES[c]}/{i:03d}.jpg", "label": CLASSES[c],
                         "label_index": c, "group": "", "fold": int(folds[i])})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_synthetic(manifest, weights=(1.0, 0.8), k=5, extra=3, folds=None):
    rows = []
    for fold in folds or [str(f) for f in range(k)]:
        train = manifest if fold == "all" else manifest[manifest["fold"] != int(fold)]
        for w in weights:
            for c, label in enumerate(CLASSES):
                for i in range(int((train["label_index"] == c).sum()) + extra):
                    rows.append({"id": f"syn-{fold}-{w}-{label}-{i:04d}", "path": f"/syn/{fold}/{w}/{label}/{i}.png",
                                 "label": label, "group": "", "fold": fold, "lora_key": f"l{fold}{label}",
                                 "weight": float(w), "seed": i})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tables():
    m = make_manifest()
    return m, make_synthetic(m)


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
        train = build_trainset(m, s, fold, ratio, 1.0, seed=0)
        real = train[train["source"] == "real"]
        syn = train[train["source"] == "synthetic"]
        n_train = int((m["fold"] != fold).sum())
        assert len(real) == n_train
        assert len(syn) == round_half_up(ratio * n_train)
        real_counts = np.bincount(real["label_index"], minlength=3)
        assert np.bincount(syn["label_index"], minlength=3).tolist() == \
            largest_remainder(len(syn), real_counts).tolist()
        # drawn from this fold's pool of this weight, without replacement
        pool = s[(s["fold"] == str(fold)) & (s["weight"] == 1.0)]
        assert set(syn["id"]) <= set(pool["id"])
        assert not syn["id"].duplicated().any()
        assert not train["path"].duplicated().any()


def test_no_overlap_with_held_out_fold(tables):
    m, s = tables
    for fold in range(5):
        test = build_testset(m, fold)
        assert (test["source"] == "real").all()
        assert len(test) == int((m["fold"] == fold).sum())
        for ratio, synth in [(0.0, False), (0.5, False), (1.0, True)]:
            train = build_trainset(m, s, fold, ratio, 0.8, synthetic_only=synth)
            assert not set(train["id"]) & set(test["id"])
            assert not set(train["path"]) & set(test["path"])


def test_synthetic_only(tables):
    m, s = tables
    train = build_trainset(m, s, 2, 1.0, 0.8, synthetic_only=True)
    n_train = int((m["fold"] != 2).sum())
    assert (train["source"] == "synthetic").all() and len(train) == n_train
    real_counts = np.bincount(m.loc[m["fold"] != 2, "label_index"], minlength=3)
    assert np.bincount(train["label_index"], minlength=3).tolist() == real_counts.tolist()
    assert set(train["id"]) <= set(s[(s["fold"] == "2") & (s["weight"] == 0.8)]["id"])


def test_ratio_zero_ignores_weight_and_synthetic_table(tables):
    m, s = tables
    a = build_trainset(m, s, 1, 0.0, None)
    b = build_trainset(m, None, 1, 0.0, float("nan"))
    pd.testing.assert_frame_equal(a, b)
    assert (a["source"] == "real").all()


def test_deterministic_and_independent_of_row_order(tables):
    m, s = tables
    a = build_trainset(m, s, 0, 0.5, 1.0, seed=3)
    b = build_trainset(m.sample(frac=1, random_state=1), s.sample(frac=1, random_state=2), 0, 0.5, 1.0, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = build_trainset(m, s, 0, 0.5, 1.0, seed=4)
    assert set(a["id"]) != set(c["id"])  # the seed matters


def test_ratios_draw_nested_subsets(tables):
    m, s = tables
    previous = set()
    for ratio in [0.1, 0.25, 0.5, 0.75, 1.0]:
        syn = build_trainset(m, s, 3, ratio, 1.0)
        ids = set(syn.loc[syn["source"] == "synthetic", "id"])
        assert previous <= ids
        previous = ids


def test_pool_too_small_names_fold_class_weight_counts(tables):
    m, _ = tables
    small = make_synthetic(m, weights=(1.0,), extra=0)
    small = small[~((small["label"] == "bad") & (small["fold"] == "1") & small["id"].str.endswith(("0000", "0001")))]
    build_trainset(m, small, 1, 0.5, 1.0)  # enough for half
    with pytest.raises(TrainsetError) as err:
        build_trainset(m, small, 1, 1.0, 1.0, synthetic_only=True)
    msg = str(err.value)
    n_bad = int(((m["fold"] != 1) & (m["label"] == "bad")).sum())
    for part in ["fold 1", "'bad'", "weight 1", f"need {n_bad}", f"has {n_bad - 2}"]:
        assert part in msg, (part, msg)


def test_missing_weight_or_table_errors(tables):
    m, s = tables
    with pytest.raises(TrainsetError, match="LoRA weight"):
        build_trainset(m, s, 0, 0.5, None)
    with pytest.raises(TrainsetError, match="empty"):
        build_trainset(m, None, 0, 0.5, 1.0)
    with pytest.raises(TrainsetError, match="need"):  # no pool of weight 0.5 at all
        build_trainset(m, s, 0, 0.5, 0.5)
    bad = s.assign(label=s["label"].replace({"bad": "awful"}))
    with pytest.raises(TrainsetError, match="awful"):
        build_trainset(m, bad, 0, 0.5, 1.0)


def test_generator_split_all_uses_all_rows():
    m = make_manifest()
    s = make_synthetic(m, folds=["all"])
    for fold in range(5):
        train = build_trainset(m, s, fold, 1.0, 1.0, generator_split="all")
        assert (train.loc[train["source"] == "synthetic", "id"].str.startswith("syn-all-")).all()
    with pytest.raises(TrainsetError):  # per-fold protocol finds no pool of fold "0"
        build_trainset(m, s, 0, 0.5, 1.0, generator_split="fold")


def cfg_of(**classify):
    return from_dict({"folds": {"k": 5}, "sample": {"weights": [1.0, 0.8]}, "classify": classify})


def test_paper_grid_shape():
    specs = trial_specs(cfg_of())
    assert len(specs) == 65  # 5 folds x (real + 2 weights x (5 ratios + synthetic only))
    assert len({s["trial_key"] for s in specs}) == 65
    real = [s for s in specs if s["arm"] == "real"]
    assert len(real) == 5 and all(s["weight"] is None for s in real)
    synth = [s for s in specs if s["synthetic_only"]]
    assert len(synth) == 10 and {s["arm"] for s in synth} == {"synthetic_only"}
    assert {s["arm"] for s in specs} == {"real", "real+10%", "real+25%", "real+50%", "real+75%", "real+100%",
                                        "synthetic_only"}
    assert trial_specs(cfg_of()) == specs  # stable keys
    assert len(trial_specs(cfg_of(synthetic_only=False, ratios=[0.5]))) == 10


def test_config_key_ignores_resources_not_results():
    base = config_key(cfg_of())
    assert config_key(cfg_of(gpus_per_trial=1.0, cpus_per_trial=4.0, max_failures=5)) == base
    assert config_key(cfg_of(ratios=[0.0, 0.5])) == base  # grid shape: the kept trials keep their keys
    assert config_key(cfg_of(epochs=3)) != base
    assert config_key(cfg_of(mode="cached")) != base


def test_arm_names():
    assert arm_name(0.0, False) == "real"
    assert arm_name(0.1, False) == "real+10%"
    assert arm_name(0.125, False) == "real+12.5%"
    assert arm_name(1.0, True) == "synthetic_only"


def test_metrics_macro_and_confusion():
    out = compute_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 1], 3)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["per_class_recall"] == [0.5, 1.0, 0.0]
    assert out["recall_macro"] == pytest.approx(0.5)
    assert out["precision_macro"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # class 2 never predicted: 0
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert not math.isnan(out["f1_macro"])
