import pytest
import yaml

from ooc_ray.config import ExperimentConfig
from ooc_ray.roles import ARTIFACTS
from ooc_ray.fields import field_roles
from ooc_ray.load import from_dict, load_config
from ooc_ray.errors import ConfigError, OocRayError
from ooc_ray.keys import config_slice


def test_defaults_are_the_papers_classifier():
    cfg = ExperimentConfig()
    assert cfg.classify.backbone == "EfficientNetB7"
    assert cfg.classify.input_size == 600
    assert cfg.classify.dropout == 0.2
    assert cfg.generator.unet_lr == 5e-4 and cfg.generator.text_encoder_lr == 1e-4


def test_experiment_files_load_normal_and_tiny(repo):
    files = sorted((repo / "experiments").glob("*.yaml"))
    assert {p.stem for p in files} >= {"demo", "lora_search", "paper"}
    for path in files:
        assert load_config(path).name == path.stem
        tiny = load_config(path, tiny=True)  # every file has its `tiny:` overrides (the smoke test runs them)
        assert tiny.generator.base == "tiny" and tiny.classify.input_size == 32


def test_paper_yaml_holds_only_differences(repo):
    import yaml

    raw = yaml.safe_load((repo / "experiments" / "paper.yaml").read_text())
    raw.pop("tiny")
    defaults = ExperimentConfig()
    same = [f"{section}.{key}" for section, values in raw.items() for key, value in values.items()
            if getattr(getattr(defaults, section), key) == (tuple(value) if isinstance(value, list) else value)]
    assert same == [], f"paper.yaml repeats defaults: {same}"


def test_paper_yaml_is_the_papers_protocol(repo):
    cfg = load_config(repo / "experiments" / "paper.yaml")
    assert cfg.folds.k == 5
    assert cfg.generator.repeats == 2 and cfg.generator.epochs == 10 and cfg.generator.batch_size == 2
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg) == ("euler_a", 20, 7.0)
    assert cfg.sample.weights == (1.0, 0.8)
    assert cfg.classify.ratios == (0.0, 0.1, 0.25, 0.5, 0.75, 1.0) and cfg.classify.synthetic_only
    assert (cfg.classify.backbone, cfg.classify.input_size, cfg.classify.epochs) == ("EfficientNetB7", 600, 30)
    assert cfg.classify.mode == "exact"
    # The Keras EfficientNet fine-tuning example's augmentation, in its order, with its strengths.
    from ooc_ray.backbones import AUGMENT_ARGS

    assert [AUGMENT_ARGS[name] for name in cfg.classify.augment] == [
        ("RandomRotation", {"factor": 0.15}), ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
        ("RandomFlip", {"mode": "horizontal_and_vertical"}), ("RandomContrast", {"factor": 0.1})]


def test_paper_yaml_header_states_what_its_plan_makes(repo):
    """The file's header counts (LoRAs, images per weight, trials) are those of its own plan on the paper's
    500/212/110 images, so the header cannot drift from the config."""
    import re
    import sys

    sys.path.insert(0, str(repo / "tests"))
    from helpers import make_manifest

    from ooc_ray.folds import assign_folds
    from ooc_ray.protocol import grid_points, plan_loras, pool_sizes

    cfg = load_config(repo / "experiments" / "paper.yaml")
    manifest = make_manifest((500, 212, 110), k=5, labels=("good", "acceptable", "bad")).drop(columns="fold")
    manifest["fold"] = assign_folds(manifest, cfg.folds)["fold"].to_numpy()
    header = (repo / "experiments" / "paper.yaml").read_text().split("\ndata:")[0]
    loras, images, trials = (int(x.replace(",", "")) for x in re.search(
        r"(\d+) LoRAs.*?([\d,]+) images sampled per LoRA weight.*?(\d+) EfficientNetB7 trials", header, re.S).groups())
    assert loras == len(plan_loras(cfg, manifest, "base"))
    assert images == pool_sizes(manifest, cfg)["n_pool"].sum()
    assert trials == len(grid_points(cfg, list(range(cfg.folds.k))))


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("classify:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"classify\.epoch"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="clasify"):
        from_dict({"clasify": {"epochs": 3}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"classify": {"epochs": "three"}}, "classify.epochs"),
        ({"classify": {"ratios": 0.5}}, "classify.ratios"),
        ({"sample": {"weights": ["heavy"]}}, r"sample.weights\[0\]"),
        ({"classify": {"mode": "fast"}}, "classify.mode"),
        ({"classify": {"backbone": "ResNet50"}}, "classify.backbone"),
        ({"generator": {"split": "none"}}, "generator.split"),
        ({"classify": {"augment": ["flip", "warp"]}}, r"classify.augment\[1\]"),
        ({"generator": {"prompt": "cells of {cls}"}}, "generator.prompt"),
        ({"generator": {"group_prompt": "{label} {"}}, "generator.group_prompt"),
        ({"data": {"demo": {"per_class": [3, 3]}}}, "data.demo.per_class"),
        ({"classify": {"weights": "/nowhere/b0.weights.h5"}}, "classify.weights"),
        ({"search": {"space": {"generator.epochs": {"randint": [5, 2]}}}}, "search.space.generator.epochs"),
        ({"data": {"demo": {"size": True}}}, "data.demo.size"),
        ({"folds": 5}, "folds"),
        ({"classify": {"backbone": "SmallCNN", "weights": "none", "mode": "cached"}}, "classify.backbone"),
        ({"classify": {"backbone": "SmallCNN", "mode": "exact"}}, "classify.weights"),  # imagenet: none exist
        ({"classify": {"backbone": "SmallCNN", "weights": "none", "train_backbone": 2}}, "classify.train_backbone"),
        ({"classify": {"train_backbone": 8}}, "classify.train_backbone"),
        ({"classify": {"train_backbone": 2, "mode": "cached"}}, "classify.train_backbone"),
        ({"sample": {"clip_sample": 2.0}}, "sample.clip_sample: euler_a cannot clip"),
        ({"sample": {"sampler": "ddim", "clip_sample": -1.0}}, "sample.clip_sample"),
        ({"quality": {"features": "inception"}}, "quality.features"),
        # A frozen backbone at its random init: the head learns class frequencies; "random" says a test means it.
        ({"classify": {"backbone": "EfficientNetB0", "weights": "none"}},
         "classify.weights: none with classify.train_backbone 0 leaves the frozen classify.backbone EfficientNetB0"),
        ({"classify": {"weights": "random", "train_backbone": 2, "mode": "exact"}}, "classify.weights: random names"),
        ({"classify": {"backbone": "SmallCNN", "weights": "random", "mode": "exact"}},
         "classify.weights: 'random' does not exist for SmallCNN"),
        # Quality measured on a random initialisation (SmallCNN's, or below a frozen EfficientNet's trained blocks)
        ({"classify": {"backbone": "SmallCNN", "weights": "none", "mode": "exact"}, "quality": {"enabled": True}},
         "quality.features: backbone with quality.enabled measures on classify.backbone SmallCNN's features, and "
         "classify.weights none"),
        ({"classify": {"backbone": "EfficientNetB0", "weights": "none", "train_backbone": 2, "mode": "exact"},
          "quality": {"enabled": True}},
         "quality.features: backbone with quality.enabled measures on classify.backbone EfficientNetB0's"),
        ({"classify": {"weights": "~no_such_user_here/b0.weights.h5"}}, "classify.weights: '~no_such_user_here"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(raw)


@pytest.mark.parametrize("raw, message", [
    ({"generator": {"unet_lr": 10**400}}, r"generator.unet_lr: expected a finite number, got 10+\.\.\. \(401 characters"),
    ({"classify": {"epochs": 10**400}}, "classify.epochs: expected an integer of at most 19 digits"),
    ({"generator": {"prompt": "{label.x} cells"}}, r"generator.prompt: .* placeholder\(s\) \{label.x\}"),
    ({"generator": {"prompt": "{label[a]} cells"}}, r"generator.prompt: .* placeholder\(s\) \{label\[a\]\}"),
    ({"generator": {"group_prompt": "{label!r} {group:>9}"}}, r"generator.group_prompt: .*\{label!r\}, \{group:>9\}"),
    ({1: 2}, "top level: keys are field names, got 1"),
    ({"classify": {True: 1}}, "classify: keys are field names, got True"),
    ({"search": {"space": {1: {"choice": [1]}}}}, "search.space: 1 is not a field's dotted name"),
    ({"name": ".."}, "name: '..' must be a folder name"),
    ({"name": " x"}, "name: ' x' must be a folder name"),
    ({"results_dir": " "}, "results_dir: empty"),
    ({"data": {"source": ""}}, "data.source: empty"),
    ({"data": {"classes": ["good", ""]}}, "data.classes: an empty class name"),
    ({"classify": {"mixing": "replace", "ratios": [0.0, 1.0], "controls": ["real_steps"]}},
     "classify.controls: real_steps matches the steps of an arm that adds images"),
    ({"sample": {"weights": [0.7000001, 0.7000004]}}, r"sample.weights: \[0.7000001, 0.7000004\] has weights alike"),
    ({"axes": {"sample.negative_prompt": ["blurry, dark", "blurry; dark"]}, "sample": {"cfg": 2.0}},
     r"axes: the variants sample.negative_prompt = blurry, dark and sample.negative_prompt = blurry; dark would "
     r"share the folder variants/sample.negative_prompt=blurry--dark/"),
    ({"data": {"demo": {"per_class": [30, 14, 2]}}, "folds": {"k": 3}},
     r"data.demo.per_class \(data.source demo\): \[30, 14, 2\] has a class of fewer images than folds.k=3"),
    ({"generator": {"base": ""}}, "generator.base: empty"),
    ({"folds": {"seed": -1}}, r"folds.seed: must be in \[0, 2147483648\), got -1"),
    ({"sample": {"seed": 2**32}}, r"sample.seed: must be in \[0, 2147483648\), got 4294967296"),
    ({"sample": {"resolution": 20}}, "generator.resolution / sample.resolution: 512 / 20: each must be a multiple of 8"),
    ({"classify": {"ratios": []}}, "classify.ratios: need at least one ratio"),
    ({"classify": {"ratios": [0.0, 1e300]}}, r"classify.ratios: must be in \[0, 100\], got \[0.0, 1e\+300\]"),
    ({"classify": {"ratios": [0.0], "controls": ["real_steps"]}},
     "classify.controls: each control matches an arm of ratio > 0"),
    ({"folds": {"k": 3}, "search": {"folds": [0, 1, 2]}},
     r"search.folds / the default confirmation folds \(search.confirm: the last third of folds.k x folds.repeats = "
     r"3\): \[2\] in both"),
    ({"generator": {"per_group": True}}, "generator.per_group: one LoRA per group needs data.group_column"),
    ({"folds": {"strategy": "group"}}, "folds.strategy: group needs data.group_column"),
    ({"generator": {"scope": "dataset", "prompt": "cells"}}, "generator.prompt: 'cells' has no {label}"),
    ({"report": {"equivalence_margin": 5}}, r"report.equivalence_margin: must be in \(0, 1\), got 5.0"),
    ({"quality": {"enabled": False, "filter_min_confidence": 0.5}}, "quality.filter_min_confidence: the filter reads"),
    ({"search": {"space": {"sample.strength": {"uniform": [0.3, 0.6]}}}},
     "search.space.sample.strength: matters only when sample.mode is img2img"),
    ({"classify": {"augment": ["flip", "flip"]}}, "classify.augment: an augmentation is listed twice"),
    # diffusers guides only above 1: cfg 0 and 0.5 sample as 1 does, and a negative prompt is then never read.
    ({"sample": {"cfg": 0.5}}, r"sample.cfg: need at least 1, got 0.5"),
    ({"sample": {"cfg": 1.0, "negative_prompt": "blurry"}},
     "sample.negative_prompt: used only by classifier-free guidance, which sample.cfg 1 turns off"),
    ({"axes": {"sample.steps": [2, 4]}, "sample": {"cfg": 1.0, "negative_prompt": "blurry"}},
     "sample.negative_prompt: used only by classifier-free guidance"),
    ({"search": {"space": {"sample.negative_prompt": {"choice": ["", "blurry"]}}}, "sample": {"cfg": 1.0}},
     "sample.negative_prompt: used only by classifier-free guidance"),
    ({"search": {"space": {"sample.steps": {"randint": [2, 4]}}}, "sample": {"cfg": 1.0, "negative_prompt": "blurry"}},
     "sample.negative_prompt: used only by classifier-free guidance"),
    ({"search": {"space": {"sample.cfg": {"uniform": [0.5, 3.0]}}}},
     r"search.space.sample.cfg = 0.5: sample.cfg: need at least 1"),
    # Two rows of one arm (and one more comparison in the Holm family), as sample.weights alike were.
    ({"classify": {"ratios": [0.0, 1.0, 1.0000001]}}, r"classify.ratios: \[0.0, 1.0, 1.0000001\] has ratios alike"),
    # diffusers denoises int(steps x strength) steps in img2img: 0 crashed the sample stage after finetune.
    ({"sample": {"mode": "img2img", "steps": 1, "strength": 0.6}},
     r"sample.strength: img2img runs int\(sample.steps x strength\) = int\(1 x 0.6\) = 0"),
    ({"classify": {"backbone": "EfficientNetB0", "input_size": 16}}, "classify.input_size: 16 px is below the 32 px"),
    # Set, but read only at another value of a sibling: the run would record a setting it never read.
    ({"sample": {"strength": 0.3}}, "sample.strength: set to 0.3, but read only when sample.mode is img2img"),
    ({"classify": {"synthetic_loss_weight": 0.5}},
     "classify.synthetic_loss_weight: set to 0.5, but read only when classify.mixing is loss_weighted"),
    # Replicate r samples with sample.seed + 1000 r: its seed is checked too, and a seed axis may not meet it.
    ({"sample": {"seed": 2**31 - 5, "replicates": 2}},
     r"sample.replicates \(replicate = 1\): sample.seed: must be in \[0, 2147483648\)"),
    ({"sample": {"replicates": 2}, "axes": {"sample.seed": [0, 1000]}},
     "axes: the variants sample.seed = 0, replicate = 1 and sample.seed = 1000, replicate = 0 are the same config"),
    # `space:` with every line commented out is null: it ran the default 7-dimension space.
    ({"search": {"space": None}}, "search.space: expected a mapping of fields to distributions"),
    ({"search": {"space": {"sample.resolution": {"randint": [32, 64]}}}},
     "search.space.sample.resolution: a resolution must be a multiple of 8, which a randint range cannot promise"),
])
def test_values_that_cannot_mean_anything_are_refused_in_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(raw)
    assert "\n" not in str(caught.value)


def test_what_an_axis_or_search_space_varies_is_judged_per_variant_and_point():
    """A strength range matters when a mode dimension includes img2img; guidance from 1.0 (no guidance pass) with a
    negative prompt, and the text-encoder modules beside a learning-rate axis that includes 0, are legitimate."""
    cfg = from_dict({"search": {"space": {"sample.mode": {"choice": ["txt2img", "img2img"]},
                                          "sample.strength": {"uniform": [0.3, 0.9]},
                                          "sample.cfg": {"uniform": [1.0, 3.0]}}},
                     "sample": {"negative_prompt": "blurry"}})
    assert [name for name, _, _ in cfg.search.space] == ["sample.mode", "sample.strength", "sample.cfg"]
    cfg = from_dict({"axes": {"sample.cfg": [1.0, 7.0], "generator.text_encoder_lr": [0.0, 1e-4]},
                     "sample": {"negative_prompt": "blurry"}, "generator": {"text_encoder_modules": "attention+mlp"},
                     "search": {"confirm": False, "confirm_folds": [4]}})
    assert len(cfg.axes) == 2
    # real_steps under a mixing axis that includes a strategy adding images: its variants run it.
    assert from_dict({"axes": {"classify.mixing": ["concat", "replace"]},
                      "classify": {"ratios": [0.0, 1.0], "controls": ["real_steps"]}}).classify.controls
    # Guidance from an axis or from the search, whichever the other one varies: the negative prompt is read.
    for varied in ({"axes": {"sample.cfg": [1.0, 7.0]}, "search": {"space": {"sample.steps": {"randint": [2, 4]}}}},
                   {"axes": {"sample.steps": [2, 4]}, "search": {"space": {"sample.cfg": {"uniform": [1.0, 3.0]}}}}):
        assert from_dict({**varied, "sample": {"cfg": 1.0, "negative_prompt": "blurry"}}).sample.negative_prompt


def test_wrong_types_unknown_keys_and_bounds_are_named_at_once():
    """A wrong type no longer hides the problems after it: every section's types and every field's bounds."""
    with pytest.raises(ConfigError) as caught:
        from_dict({"classify": {"epochs": "x", "lr": -1}, "sample": {"cfg": "y"}, "folds": {"k": 1}, "generatr": {}})
    text = str(caught.value)
    assert all(key in text for key in ("classify.epochs", "classify.lr", "sample.cfg", "folds.k", "generatr"))
    assert "(5 problems)" in text


def test_floats_accept_yaml_exponent_strings(tmp_path):
    # PyYAML reads 5e-4 (no dot) as a string; configs written that way must still work.
    path = tmp_path / "x.yaml"
    path.write_text("generator:\n  unet_lr: 5e-4\n")
    assert load_config(path).generator.unet_lr == 5e-4


def test_overrides_and_frozen(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("classify:\n  epochs: 3\n")
    cfg = load_config(path, ["classify.epochs=5", "sample.weights=[1.0]"])
    assert cfg.name == "exp" and cfg.classify.epochs == 5 and cfg.sample.weights == (1.0,)
    with pytest.raises(Exception):
        cfg.classify.epochs = 1  # frozen
    with pytest.raises(ConfigError, match="classify.epoch"):
        load_config(path, ["classify.epoch=5"])


def test_a_key_given_twice_is_refused_and_a_section_given_as_a_mapping_sets_its_fields_one_by_one(tmp_path):
    """YAML keeps the last of two equal keys silently (a second `classify:` block replaced the first whole: epochs
    5 became the default 20); and `-o 'sample={steps: 3}'` replaced the whole section, resetting every other
    sampling setting to its default. Now: refused naming both lines; set field by field, as extends merges."""
    path = tmp_path / "exp.yaml"
    path.write_text("classify:\n  epochs: 5\nsample:\n  cfg: 2.0\n  steps: 4\nclassify:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: the key 'classify' is given twice in one mapping \(lines 1 "
                                          r"and 6\)"):
        load_config(path)
    path.write_text("classify:\n  epochs: 5\nsample:\n  cfg: 2.0\n  steps: 4\n")
    cfg = load_config(path, ["sample={steps: 3}"])
    assert (cfg.sample.steps, cfg.sample.cfg, cfg.classify.epochs) == (3, 2.0, 5)
    with pytest.raises(ConfigError, match=r"override sample.steps: given 2 times \('sample=\{steps: 3\}', '6'\)"):
        load_config(path, ["sample={steps: 3}", "sample.steps=6"])
    with pytest.raises(ConfigError, match="override 'sample={steps: 3, steps: 4}': the key 'steps' is given twice"):
        load_config(path, ["sample={steps: 3, steps: 4}"])
    # A field whose value is a mapping (the search's space) stays one value.
    cfg = load_config(path, ["search.space={sample.cfg: {uniform: [1.5, 2.5]}}"])
    assert cfg.search.space == (("sample.cfg", "uniform", (1.5, 2.5)),)


def test_yaml_11_octal_and_base_60_integers_are_refused_not_read_as_another_number(tmp_path):
    """PyYAML reads YAML 1.1: `seed: 010` was 8 and `time_budget_s: 1:30` was 90, without a word."""
    path = tmp_path / "exp.yaml"
    for text, message in (("folds:\n  seed: 010\n", r"'010' \(line 2\) reads as 8 in YAML 1.1"),
                          ("search:\n  time_budget_s: 1:30\n", r"'1:30' \(line 2\) reads as 90")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text("folds:\n  seed: 10\n")
    assert load_config(path).folds.seed == 10
    with pytest.raises(ConfigError, match="override 'folds.seed=010': '010' \\(line 1\\) reads as 8"):
        load_config(path, ["folds.seed=010"])


def test_a_tiny_section_with_an_unknown_key_is_refused_without_tiny_too(tmp_path):
    """A typo in `tiny:` waited, unseen, for the next smoke test; its keys are checked on every load."""
    path = tmp_path / "exp.yaml"
    for tiny, message in (("\n  clasify.epochs: 1\n  sample: {stepz: 2}", r"tiny: unknown config key\(s\): "
                                                                           "clasify.epochs, sample.stepz"),
                          (" [classify.epochs]", "tiny: expected a mapping")):
        path.write_text(f"classify:\n  epochs: 5\ntiny:{tiny}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_config_errors_are_ooc_ray_errors():
    with pytest.raises(OocRayError):
        from_dict({"folds": {"k": 1}})


def test_every_field_declares_a_role():
    roles = field_roles()
    assert len(roles) > 60
    for name, meta in roles.items():
        assert meta.get("role") in {"result", "input", "grid", "resource", "presentation"}, name
        if meta["role"] == "result":
            assert meta["feeds"] and set(meta["feeds"]) <= set(ARTIFACTS), name
    # the roles the issue names, as declared on the fields
    assert roles["sample.batch_size"]["role"] == roles["classify.gpus_per_trial"]["role"] == "resource"
    assert roles["classify.ratios"]["role"] == roles["sample.weights"]["role"] == "grid"
    assert roles["data.source"]["role"] == roles["generator.base"]["role"] == "input"
    assert roles["classify.epochs"]["feeds"] == ("trial",)


def test_config_slices_follow_roles():
    base = ExperimentConfig()
    lora = config_slice(base, "lora")
    assert lora["generator.rank"] == 8 and "generator.gpus" not in lora and "generator.prompt" not in lora
    assert set(config_slice(base, "features")) == {"classify.backbone", "classify.input_size", "classify.augment",
                                                   "classify.seed"}  # feature_views only in cached mode
    cached = from_dict({"classify": {"mode": "cached"}})
    assert "classify.feature_views" in config_slice(cached, "features")
    txt = config_slice(base, "image")
    assert "sample.strength" not in txt and "sample.batch_size" not in txt and "sample.weights" not in txt
    assert config_slice(from_dict({"sample": {"mode": "img2img"}}), "image")["sample.strength"] == 0.6
    assert config_slice(from_dict({"sample": {"batch_size": 64, "actors": 3}}), "image") == txt
    # A field added later enters keys only when set, so the trials that ran before it existed stay valid.
    assert "classify.train_backbone" not in config_slice(base, "trial")
    assert config_slice(from_dict({"classify": {"train_backbone": 2}}), "trial")["classify.train_backbone"] == 2


def test_axes_expand_to_validated_variants(tmp_path):
    from ooc_ray.config import REPLICATE_SEED_STEP
    from ooc_ray.fields import to_dict
    from ooc_ray.variants import variants

    cfg = from_dict({"axes": {"sample.cfg": [2, 7.5], "classify.mixing": ["concat", "replace"]},
                     "sample": {"replicates": 2, "seed": 5}})
    every = variants(cfg)
    assert [v.tag for v in every][:3] == ["sample.cfg=2__classify.mixing=concat__replicate=0",
                                          "sample.cfg=2__classify.mixing=concat__replicate=1",
                                          "sample.cfg=2__classify.mixing=replace__replicate=0"]
    assert len(every) == 8 and all(v.cfg.axes == () for v in every)
    last = every[-1]
    assert (last.cfg.sample.cfg, last.cfg.classify.mixing, last.cfg.sample.seed) == (7.5, "replace", 5 + REPLICATE_SEED_STEP)
    assert cfg.sample.cfg == 7.0  # the file's own value stays the config's
    # The saved config (config.yaml) loads back to the same axes.
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # as the CLI writes it
    assert load_config(path).axes == cfg.axes
    # Without axes or replicates: the config itself, under its own folders (tag "").
    assert [(v.tag, v.cfg) for v in variants(ExperimentConfig())] == [("", ExperimentConfig())]


@pytest.mark.parametrize("axes, message", [
    ({"sample.batch_size": [1, 2]}, "axes.sample.batch_size: changes no result"),
    ({"data.source": ["a", "b"]}, "axes.data.source: an axis varies generator, sample or classify fields"),
    ({"folds.k": [3, 5]}, "axes.folds.k: an axis varies"),
    ({"classify.ratios": [[0.5]]}, "axes.classify.ratios: is already a dimension of the grid"),
    ({"sample.cfgg": [1]}, "axes.sample.cfgg: no such config field"),
    ({"sampel.cfg": [1]}, "axes.sampel.cfg: no such config section 'sampel'"),
    ({"sample.cfg": []}, "axes.sample.cfg: expected a non-empty list"),
    ({"sample.cfg": [2, 2.0]}, "axes.sample.cfg: values repeat"),
    ({"sample.cfg": ["high"]}, r"axes.sample.cfg\[0\]: expected a number"),
    ({"sample.mode": ["img2img"], "sample.strength": [0.5, 1.5]},
     r"axes \(sample.mode = img2img, sample.strength = 1.5\): sample.strength: must be in \(0, 1\]"),
    ({"sample.strength": [0.3, 0.6]}, "axes.sample.strength: matters only when sample.mode is img2img, which it is "
                                      "nowhere here"),
    ({"classify.feature_views": [2, 4]}, "axes.classify.feature_views: matters only when classify.mode is cached"),
    ({1: [2], "sample.cfgg": [1]}, r"axes: 1 is not a field's dotted name.*axes.sample.cfgg: no such config field"),
    ({"classify.mixing": ["split_bn"]}, "split_bn builds SmallCNN with split BatchNorm layers"),
    ({"classify.mixing": ["blend"]}, r"axes.classify.mixing\[0\]: 'blend' is not one of"),
])
def test_axes_that_cannot_mean_anything_are_refused_naming_the_axis(axes, message, tmp_path):
    weights = tmp_path / "small.weights.h5"
    weights.write_bytes(b"")
    extra = {"classify": {"backbone": "SmallCNN", "weights": str(weights)}} if "split_bn" in str(axes) else {}
    with pytest.raises(ConfigError, match=message):
        from_dict({"axes": axes, **extra})


def test_mixing_and_control_settings_are_checked():
    for raw, message in [({"classify": {"synthetic_loss_weight": 1.5}}, "synthetic_loss_weight: must be in"),
                         ({"classify": {"replace_probability": -0.1}}, "replace_probability: must be in"),
                         ({"classify": {"controls": ["real_steps", "real_steps"]}}, "a control is listed twice"),
                         ({"classify": {"controls": ["more_data"]}}, "is not one of"),
                         ({"sample": {"replicates": 0}}, "sample.replicates: need at least 1")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(raw)
    # mixing enters a trial's key only when set, its weight and probability only under their own strategy
    assert "classify.mixing" not in config_slice(ExperimentConfig(), "trial")
    weighted = config_slice(from_dict({"classify": {"mixing": "loss_weighted"}}), "trial")
    assert weighted["classify.synthetic_loss_weight"] == 0.2 and "classify.replace_probability" not in weighted


def test_extends_merges_the_base_first_one_level_only(tmp_path):
    """`extends:` loads the named file (beside this one) first, then this file's own keys over it, section by
    section; the base's name does not carry over; a base that extends another is refused."""
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "common.yaml").write_text(
        "name: common\nclassify: {epochs: 7, lr: 0.01}\nsample: {weights: [1.0, 0.5]}\ntiny: {classify.epochs: 2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: bases/common.yaml\nclassify: {epochs: 9}\ntiny: {sample.steps: 3}\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.classify.epochs == 9 and cfg.classify.lr == 0.01
    assert cfg.sample.weights == (1.0, 0.5)
    tiny = load_config(child, tiny=True)  # both files' tiny: mappings
    assert tiny.classify.epochs == 2 and tiny.sample.steps == 3
    # A file's axes and search space are the whole grid and space it means: the base's are replaced, not joined
    # (a child's one-dimension space searched the base's dimensions too, and axes multiplied).
    (tmp_path / "bases" / "common.yaml").write_text(
        "axes: {sample.steps: [2, 4]}\nsearch: {space: {sample.cfg: {uniform: [1.5, 3.0]}}, num_samples: 5}\n")
    child.write_text("extends: bases/common.yaml\naxes: {sample.cfg: [2.0, 3.0]}\n"
                     "search: {space: {generator.rank: {choice: [2, 4]}}}\n")
    cfg = load_config(child)
    assert cfg.axes == (("sample.cfg", (2.0, 3.0)),) and cfg.search.num_samples == 5
    assert cfg.search.space == (("generator.rank", "choice", (2, 4)),)
    (tmp_path / "bases" / "deeper.yaml").write_text("extends: common.yaml\n")
    child.write_text("extends: bases/deeper.yaml\n")
    with pytest.raises(ConfigError, match="one level only"):
        load_config(child)
    child.write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match="cannot extend itself"):
        load_config(child)
    child.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(child)


def test_the_cpu_examples_hold_only_their_differences(repo):
    """The axis examples, mixing and replicates extend one base and hold a few lines each."""
    for name in ("axis_guidance", "axis_img2img", "axis_lora", "axis_lora_scope", "axis_sampling", "axis_base",
                 "mixing", "replicates"):
        text = (repo / "experiments" / f"{name}.yaml").read_text()
        assert "extends: base/small_cpu.yaml" in text
        assert len([line for line in text.splitlines() if line and not line.startswith("#")]) <= 8, name


@pytest.mark.parametrize("override, message", [
    ("classify.epochs=-3", "classify.epochs: need at least 1, got -3"),
    ("classify.lr=-1", r"classify.lr: must be > 0, got -1.0"),
    ("generator.rank=0", "generator.rank: need at least 1, got 0"),
    ("classify.batch_size=0", "classify.batch_size: need at least 1, got 0"),
    ("sample.steps=0", "sample.steps: need at least 1, got 0"),
    ("sample.weights=[1.0, 1.0]", r"sample.weights: a LoRA weight is listed twice \(1.0 in \[1.0, 1.0\]\)"),
    ("classify.ratios=[0.0, -0.5]", r"classify.ratios: must be in \[0, 100\], got \[0.0, -0.5\]"),
    ("classify.dropout=1.0", r"classify.dropout: must be in \[0, 1\), got 1.0"),
    ("generator.unet_lr=.inf", "generator.unet_lr: expected a finite number"),
])
def test_every_numeric_field_is_range_checked_naming_its_bound(tmp_path, override, message):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_every_bad_value_is_named_at_once(tmp_path):
    """Three bad values in one file: one error naming all three, not the first of them."""
    path = tmp_path / "x.yaml"
    path.write_text("classify: {epochs: -3, lr: -1}\ngenerator: {rank: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "classify.epochs" in text and "classify.lr" in text and "generator.rank" in text and "(3 problems)" in text


def test_problems_of_every_kind_come_in_one_error_not_in_rounds(tmp_path):
    """A combination, a search dimension, an axis, a variant, the tiny section and an override, each wrong: one
    error naming all six (the load used to stop at the first kind, so fixing one revealed the next). With a field
    of the wrong type, its combinations and the search space wait, but the axes and overrides are still named."""
    path = tmp_path / "x.yaml"
    path.write_text("sample: {clip_sample: 1.0, sampler: euler_a}\n"
                    "search: {space: {folds.k: {choice: [3, 5]}}}\n"
                    "axes: {data.source: [a, b]}\n"
                    "tiny: {clasify.epochs: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["classify.lr"])
    text = str(caught.value)
    for said in ("tiny: unknown config key(s): clasify.epochs", "override 'classify.lr': expected key=value",
                 "sample.clip_sample: euler_a cannot clip", "search.space.folds.k: a search dimension varies",
                 "axes.data.source: an axis varies", "(5 problems)"):
        assert said in text, said
    path.write_text("axes: {data.source: [a, b], folds.k: [2, 3]}\n"  # two bad axes, two bad dimensions: each
                    "search: {space: {folds.k: {choice: [3, 5]}, data.source: {choice: [a, b]}}}\n")  # counted
    with pytest.raises(ConfigError) as caught:  # once, at the end (not "(2 problems); ... (2 problems)")
        load_config(path)
    assert str(caught.value).count("problems)") == 1 and str(caught.value).endswith("(4 problems)")
    path.write_text("sample: {clip_sample: 1.0, sampler: euler_a}\naxes: {sample.steps: [0, 2]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "sample.clip_sample: euler_a cannot clip" in text and "(2 problems)" in text
    assert "axes (sample.steps = 0): sample.steps: need at least 1, got 0" in text
    path.write_text("classify: {epochs: x}\naxes: {folds.k: [3, 5]}\nsearch: {space: {folds.k: {choice: [3]}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["classify.lr"])
    text = str(caught.value)
    assert "classify.epochs: expected an integer" in text and "axes.folds.k:" in text
    assert "override 'classify.lr'" in text and "search.space.folds.k: a search dimension" in text
    assert "(4 problems)" in text
    # One bad axis value under 3 replicates: one line naming its 3 variants, not the same problem 3 times.
    path.write_text("sample: {replicates: 3}\naxes: {sample.steps: [0, 5]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).count("need at least 1, got 0") == 1 and "replicate = 2" in str(caught.value)
    path.write_text("tiny: {1: {a: 1}}\n")  # a key that is no string: named, not a TypeError
    with pytest.raises(ConfigError, match="tiny: unknown config key"):
        load_config(path, tiny=True)


def test_a_wrong_type_or_a_misspelt_key_holds_back_only_the_checks_that_name_its_field(tmp_path):
    from ooc_ray.load import checked

    """A field given a value of the wrong type keeps its default, and so does the field a misspelt key most likely
    meant: the combinations, the search space and the variants are still checked, less each problem that names
    that field (it would be about the default). Before, any such key held every one of those checks back."""
    path = tmp_path / "x.yaml"
    path.write_text("sample: {steps: many, mode: img2img, strength: 0.01, samplr: ddim, clip_sample: 0.5}\n"
                    "classify: {ratios: []}\ngenerator: {epoch: 3}\naxes: {sample.cfg: [1, 1.0]}\n"
                    "search: {space: {folds.k: {choice: [3]}}}\ntiny: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert [p.split(": ")[1] for p in problems] == [
        "unknown config key(s)", "sample.steps", "unknown config key(s)", "axes.sample.cfg", "classify.ratios",
        "search.space.folds.k"], problems
    assert "sample.samplr (did you mean sample.sampler?)" in problems[0]
    assert "generator.epoch (did you mean generator.epochs?)" in problems[2]
    # Left out: img2img's int(sample.steps x strength), which would read the default steps (50: 0 steps at
    # 0.01), and the clip that euler_a cannot do, as sample.sampler was meant to be given.
    assert not any("denoising steps" in p or "cannot clip" in p for p in problems)
    # --tiny over a file whose section is no mapping: named once, with the rest (tiny's own keys under it
    # used to fail first as an override: "'classify' is not a section").
    path.write_text("classify: 5\nsample: {samplr: ddim}\nfolds: {seed: x}\ntiny: {classify.epochs: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, tiny=True)
    assert [p.split(": ")[1] for p in caught.value.problems] == ["classify", "unknown config key(s)", "folds.seed"]
    # A review's pairs: a word in prose is no key (`name`, `data`); a field given beside its misspelling keeps
    # its own problems; a message reading a field names it (the keras minimum under a misspelt SmallCNN).
    for raw, said in (({"name": ["x"], "sample": {"weights": [1.0, 1.0000001]}}, "sample.weights: [1.0, 1.0000001]"),
                      ({"data": 5, "search": {"space": {"data.source": {"choice": ["a", "b"]}}}},
                       "search.space.data.source: a search dimension"),
                      ({"classify": {"epochs": 0, "epoch": 3}}, "classify.epochs: need at least 1, got 0"),
                      ({"axis": {}, "axes": {"sample.steps": [0, 2]}}, "axes (sample.steps = 0)")):
        assert any(p.startswith(said) for p in checked(raw)[1]), (raw, checked(raw)[1])
    odd = {"classify": {"backbone": "SmallCnn", "weights": "none", "mode": "exact", "input_size": 16}}
    assert [p.split(":")[0] for p in checked(odd)[1]] == ["classify.backbone"]


def test_no_check_reads_a_default_that_stands_in_for_a_bad_value_without_naming_its_field(repo):
    """Each experiment file (a config with no problem), each field given a value of no type it takes: every
    problem then reported names that field, so none is about the default standing in for it (three did not:
    the VAE of the default base, the frozen default backbone, quality's random features with quality.enabled)."""
    import copy
    import re

    from ooc_ray.load import MAPPING_FIELDS, checked, read_experiment, set_dotted

    for path in sorted((repo / "experiments").glob("*.yaml")):
        raw = read_experiment(path)
        raw.pop("tiny")
        assert checked(raw)[1] == [], path
        for key in set(field_roles()) - set(MAPPING_FIELDS):
            bad = copy.deepcopy(raw)
            set_dotted(bad, key, {"not": "a value"})
            _, found = checked(bad)
            names = re.compile(rf"(?<![\w.]){re.escape(key)}(?!\w)")
            assert found and all(names.search(p) for p in found), (path.name, key, found)


def test_an_override_or_tiny_key_into_the_search_space_or_axes_sets_one_entry(tmp_path):
    """`search.space.<field>` and `axes.<field>` set one dimension or axis of those mappings (their keys are
    dotted field names; `search.space.sample.cfg=1` used to read as a section `sample`: "no such config
    field"); each is then checked as one given in the file."""
    path = tmp_path / "x.yaml"
    path.write_text("axes: {sample.steps: [2, 4]}\nsearch: {space: {sample.cfg: {uniform: [1.0, 3.0]}}}\n"
                    "tiny: {axes.sample.steps: [2, 3], search.space.sample.cfg: {choice: [1.0, 2.0]}}\n")
    cfg = load_config(path, ["axes.sample.cfg=[1, 7]", "search.space.generator.rank={choice: [4, 8]}"])
    assert cfg.axes == (("sample.steps", (2, 4)), ("sample.cfg", (1.0, 7.0)))
    assert cfg.search.space == (("sample.cfg", "uniform", (1.0, 3.0)), ("generator.rank", "choice", (4, 8)))
    tiny = load_config(path, tiny=True)
    assert tiny.axes == (("sample.steps", (2, 3)),) and tiny.search.space[0] == ("sample.cfg", "choice", (1.0, 2.0))
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["search.space.sample.cfg=1", "axes.sample.cfgg=[1]"])
    assert [p.split(": ")[1] for p in caught.value.problems] == ["axes.sample.cfgg", "search.space.sample.cfg"]
    assert "expected one of {choice | uniform | loguniform | randint: values}, got 1" in str(caught.value)
    # The whole mapping and an entry of it: which wins would depend on their order; refused like a key given twice.
    with pytest.raises(ConfigError, match="override search.space: given whole and as search.space.sample.cfg"):
        load_config(path, ["search.space.sample.cfg={choice: [1, 2]}", "search.space={sample.steps: {choice: [2]}}"])
    # A file without a space: the entry joins the default space; a misspelt entry in `tiny:` is named without --tiny.
    path.write_text("tiny: {axes.sample.cfgg: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"tiny: unknown config key\(s\): axes.sample.cfgg"):
        load_config(path)
    path.write_text("tiny: {}\n")
    space = load_config(path, ["search.space.sample.cfg={choice: [1, 2]}"]).search.space
    assert space == ExperimentConfig().search.space + (("sample.cfg", "choice", (1.0, 2.0)),)


def test_every_numeric_field_declares_its_bounds():
    """A number without a declared range is a number nobody checked: every int and float field says where it
    may lie (seeds too: config.SEED)."""
    import dataclasses
    import typing

    missing = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("role") == "section":
                walk(f.default_factory, f"{prefix}{f.name}.")
            elif hints[f.name] in (int, float) and not f.metadata.get("bounds"):
                missing.append(prefix + f.name)

    walk(ExperimentConfig)
    assert missing == []
