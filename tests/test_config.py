"""Config schema: presets load, overrides apply, errors name file:line and field."""
import pytest

from derta.config import CONFIG_DIR, ConfigError, load_config


def test_every_preset_validates():
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["train.lr=1e-4", "data.mode=recaug", "train.lora={r: 8}"])
    assert cfg.train.lr == 1e-4 and cfg.data.mode == "recaug" and cfg.train.lora.r == 8


def test_error_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  mode: derta\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert f"{bad}:4" in str(err.value) and "train.lr" in str(err.value)


def test_unknown_field_is_an_error(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(bad)


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="--set: data.mode"):
        load_config("tiny", ["data.mode=sideways"])


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {CONFIG_DIR / 'tiny.yaml'}\ntrain:\n  lr: 0.5\n")
    cfg = load_config(child)
    assert cfg.train.lr == 0.5 and cfg.data.max_length == load_config("tiny").data.max_length
