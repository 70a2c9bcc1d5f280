import pytest

from ooc_ray.config import ConfigError, ExperimentConfig, from_dict, load_config, slice_key


def test_defaults_are_the_papers_classifier():
    cfg = ExperimentConfig()
    assert cfg.classify.backbone == "EfficientNetB7"
    assert cfg.classify.input_size == 600
    assert cfg.classify.dropout == 0.2
    assert cfg.generator.unet_lr == 5e-4 and cfg.generator.text_encoder_lr == 1e-4


def test_every_experiment_file_is_listed(repo):
    assert sorted(p.stem for p in (repo / "experiments").glob("*.yaml")) == ["demo", "lora_search", "paper"]


@pytest.mark.parametrize("name", ["paper", "demo", "lora_search"])
def test_experiment_files_load(repo, name):
    cfg = load_config(repo / "experiments" / f"{name}.yaml")
    assert cfg.name == name


def test_paper_yaml_is_the_papers_protocol(repo):
    cfg = load_config(repo / "experiments" / "paper.yaml")
    assert cfg.folds.k == 5
    assert cfg.generator.repeats == 2 and cfg.generator.epochs == 10 and cfg.generator.batch_size == 2
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg) == ("euler_a", 20, 7.0)
    assert cfg.sample.weights == (1.0, 0.8)
    assert cfg.classify.ratios == (0.0, 0.1, 0.25, 0.5, 0.75, 1.0) and cfg.classify.synthetic_only
    assert (cfg.classify.backbone, cfg.classify.input_size, cfg.classify.epochs) == ("EfficientNetB7", 600, 30)
    assert cfg.classify.mode == "exact"


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
        ({"classify": {"augment": ["flip", "warp"]}}, "classify.augment"),
        ({"data": {"demo": {"size": True}}}, "data.demo.size"),
        ({"folds": 5}, "folds"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(raw)


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


def test_slice_key_changes_with_content_only():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert slice_key(a.generator) == slice_key(b.generator)
    changed = from_dict({"generator": {"rank": 4}})
    assert slice_key(changed.generator) != slice_key(a.generator)
    assert slice_key(changed.classify) == slice_key(a.classify)
