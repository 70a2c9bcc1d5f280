"""cluster.yaml passes Ray's own cluster-config validation (the launcher's JSON schema + checks)."""
import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture
def cluster(repo):
    return yaml.safe_load((repo / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(cluster):
    full = prepare_config(copy.deepcopy(cluster))
    validate_config(full)
    assert full["head_node_type"] in full["available_node_types"]
    assert full["docker"]["image"].startswith("rayproject/ray:")
    setup = " ".join(full["setup_commands"])
    assert "torch==2.13.0" in setup and "torchvision" not in setup
    assert full["file_mounts"]["/home/ray/ooc-ray"] == "."  # this checkout, synced to every node


def test_validation_catches_a_typo(cluster):
    cluster["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(cluster))
