"""Config loading: defaults, overrides, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_shipped_configs_load():
    cfg = load_config()
    assert cfg.split.detector == "content" and cfg.split.resources.concurrency >= 1
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        if not path.name.startswith("train-"):  # trainer configs: tests/trainer loads those
            load_config(path)


def test_unknown_key_names_it_and_lists_allowed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  detectr: content\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "split.detectr" in message and "'content'" in message
    assert "detector" in message and "min_clip_s" in message  # the allowed keys


def test_bad_value_names_key_value_and_choices(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  detector: magic\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "split.detector" in message and "'magic'" in message
    assert "'content'" in message and "'adaptive'" in message and "'transnetv2'" in message


def test_out_of_range_and_wrong_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  resources:\n    concurrency: 0\n  min_clip_s: soon\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "split.resources.concurrency: 0" in message and "greater than or equal to 1" in message
    assert "split.min_clip_s: 'soon'" in message


def test_overrides_apply_and_are_validated():
    cfg = load_config(None, ["split.detector=adaptive", "split.max_clip_s=null", "ingest.extensions=[MP4]"])
    assert cfg.split.detector == "adaptive" and cfg.split.max_clip_s is None
    assert cfg.ingest.extensions == [".mp4"]
    with pytest.raises(ConfigError, match="ray.progress"):
        load_config(None, ["ray.progress=loud"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_errors_name_the_keys_of_their_own_section_and_blame_the_override():
    with pytest.raises(ConfigError) as exc:
        load_config(PROJECT_ROOT / "configs" / "smoke.yaml", ["filter.thresholds.motion.mn=1"])
    text = str(exc.value)
    assert "filter.thresholds.motion.mn: unknown key" in text and "allowed keys here: max, min" in text
    assert "(from --set filter.thresholds.motion.mn=1)" in text
    assert "smoke.yaml with --set overrides" in text
