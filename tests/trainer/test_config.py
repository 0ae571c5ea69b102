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


def test_conditioning_shares_and_keys_are_checked():
    cfg = load_train_config(None, ["train.conditioning.image=0.2", "train.conditioning.prefix=0.1"])
    assert cfg.train.conditioning.enabled and not load_train_config(None).train.conditioning.enabled
    with pytest.raises(TrainConfigError, match=r"train\.conditioning: .*image \+ prefix \+ ends = 1\.2.*at most 1"):
        load_train_config(None, ["train.conditioning.image=0.7", "train.conditioning.ends=0.5"])
    with pytest.raises(TrainConfigError, match=r"train\.conditioning\.image: 1\.5 is not allowed"):
        load_train_config(None, ["train.conditioning.image=1.5"])
    with pytest.raises(
        TrainConfigError, match=r"train\.conditioning\.video: unknown key \(value 0\.1\).*allowed.*prefix"
    ):
        load_train_config(None, ["train.conditioning.video=0.1"])
    with pytest.raises(TrainConfigError, match=r"prefix_max 1 is below prefix_min 2"):
        load_train_config(None, ["train.conditioning.prefix_min=2", "train.conditioning.prefix_max=1"])
