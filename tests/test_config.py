import dataclasses

import pytest

from svam.config import CONFIG_DIR, Config, ConfigError, load_config
from svam.hashing import json_digest
from svam.rundir import RunDir


def test_tiny_is_the_default_and_loads_typed():
    config = load_config()
    assert isinstance(config, Config)
    assert config.run.name == "tiny"
    assert isinstance(config.collect.tasks, list) and config.collect.image_size == 64


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_svd_xt_describes_the_published_setting():
    config = load_config("svd-xt")
    assert len(config.collect.tasks) == 50
    assert config.encoders.semantic_model == "vit_base_patch14_dinov2"
    assert config.encoders.geometric_model == "da3-large"


def test_overrides_are_typed_and_nested():
    config = load_config(
        "tiny", ["collect.workers=1", "collect.tasks=[push-v3]", "data.val_fraction=0.5"]
    )
    assert config.collect.workers == 1
    assert config.collect.tasks == ["push-v3"]
    assert config.data.val_fraction == 0.5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["collect.taks=[push-v3]"])
    message = str(err.value)
    assert "collect.taks" in message and "did you mean 'collect.tasks'" in message
    assert "episodes_per_task" in message and "\n" not in message


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("colect:\n  workers: 1\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'colect'.*valid keys in the top level: run"
    ):
        load_config(path)


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="collect.workers"):
        load_config("tiny", ["collect.workers=many"])


@pytest.mark.parametrize("override", ["collect.workers", "=3", "collect.workers.x=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        load_config("tiny", [override])


def test_missing_config_file_names_it():
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_config("no-such.yaml")


def test_a_config_digest_tracks_content():
    a, b = load_config(), load_config("tiny", ["collect.seed_start=100"])
    assert json_digest(a.collect) == json_digest(load_config().collect)
    assert json_digest(a.collect) != json_digest(b.collect)
    assert json_digest(a.collect) == json_digest(dataclasses.asdict(a.collect))


def test_run_dir_layout_and_saved_config(tmp_path):
    config = load_config("tiny", [f"run.root={tmp_path}", "run.name=exp"])
    run_dir = RunDir.from_config(config)
    assert run_dir.root == tmp_path / "exp"
    assert run_dir.episodes == tmp_path / "exp" / "episodes"
    saved = run_dir.save_config(config, "collect")
    assert load_config(saved) == config
