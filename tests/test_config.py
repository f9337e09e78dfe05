"""Config loading, overrides, the authors' YAML translation and instantiate_from_config."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from utils.config import (
    ConfigError,
    instantiate_from_config,
    load_config,
    translate_authors_config,
)

TINY1 = str(ROOT / "configs" / "tiny" / "first_stage.yaml")


def test_overrides_are_typed_and_merged_left_to_right(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  params:\n    batch_size: 2\n")
    config = load_config(
        [TINY1, str(extra)],
        ["data.params.num_workers=3", "model.params.lossconfig=null", "lightning.trainer.x=1"],
    )
    assert config.data.params.batch_size == 2
    assert config.data.params.num_workers == 3
    assert config.model.params.lossconfig is None


def test_new_key_allowed_only_as_a_constructor_argument():
    config = load_config([TINY1], ["data.params.train.params.repeat=4"])
    assert config.data.params.train.params.repeat == 4
    with pytest.raises(ConfigError, match="repet.*valid keys.*repeat"):
        load_config([TINY1], ["data.params.train.params.repet=4"])


@pytest.mark.parametrize(
    "override, message",
    [("nonsense", "dotted.key=value"), ("foo.bar=1", "unknown config key 'foo.bar'")],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([TINY1], [override])


def test_missing_file_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level config sections"):
        load_config([bad])


def test_instantiate_names_the_target_and_the_bad_key():
    with pytest.raises(TypeError, match="ldm.blocks.ResnetBlock.*channelz"):
        instantiate_from_config({"target": "ldm.blocks.ResnetBlock", "params": {"channelz": 3}})
    with pytest.raises(ImportError, match="ldm.blocks.Nope"):
        instantiate_from_config({"target": "ldm.blocks.Nope"})


def test_authors_targets_are_translated(conformance):
    config = translate_authors_config(conformance["config"])
    model = config["model"]
    assert model["target"] == "models.ldcsr.LDCSR"
    assert "conditioning_key" not in model["params"]
    unet = instantiate_from_config(model["params"]["unet_config"])
    assert type(unet).__name__ == "UNetModel"
