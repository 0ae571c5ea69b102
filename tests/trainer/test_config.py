"""Training config errors name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import TrainConfigError, load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_tiny_config_loads():
    cfg = load_train_config(ROOT / "configs" / "train-tiny.yaml", ["train.steps=7"])
    assert cfg.model.preset == "tiny" and cfg.train.steps == 7 and cfg.train.device == "cpu"


def test_unknown_key_lists_the_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(TrainConfigError) as err:
        load_train_config(path)
    message = str(err.value)
    assert "optim.learning_rate: unknown key (value 0.1)" in message
    assert "grad_accum" in message and "lr" in message


def test_bad_values_name_key_value_and_allowed():
    with pytest.raises(TrainConfigError, match=r"model\.preset: 'XXL' is not allowed.*allowed: tiny, S, B, L, XL, 1B"):
        load_train_config(None, ["model.preset=XXL"])
    with pytest.raises(TrainConfigError, match=r"optim\.schedule: 'linear' is not allowed.*'cosine' or 'constant'"):
        load_train_config(None, ["optim.schedule=linear"])
