"""The training loop on real TAEF2 latents: overfitting, exact resume, mixed shapes, accumulation, checkpoints."""

from __future__ import annotations

import statistics

import torch

from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.train import train


def test_overfits_a_handful_of_real_latents(overfit_corpus, make_config, metrics_of, tmp_path):
    # 4 clips, 240 steps of a slightly widened tiny model (~10 s on one CPU thread). Flow matching has a noise
    # floor, so the bar is a fraction of the starting loss, not zero: measured 1.55 -> 0.45 (0.29x).
    cfg = make_config(
        model={"hidden_size": 128, "depth": 3},
        optim={"lr": 3e-3, "warmup_steps": 10},
        objective={"caption_dropout": 0.0},
        train={"steps": 240},
    )
    summary = train(cfg, str(overfit_corpus), tmp_path / "run")
    losses = [r["loss"] for r in metrics_of(tmp_path / "run")]
    assert summary["step"] == 240 and len(losses) == 240
    start, end = statistics.mean(losses[:5]), statistics.mean(losses[-20:])
    assert end < 0.4 * start, (start, end)


def test_resume_midway_gives_the_same_weights_and_data_order(overfit_corpus, make_config, metrics_of, tmp_path):
    # Two DataLoader workers and an odd split (3 + 3): the resumed loader must rotate its workers. Frame
    # conditioning is on: its per-sample draws must come out the same after the resume too.
    cfg = make_config(
        data={"batch_size": 2, "num_workers": 2, "window_shards": 3},
        train={
            "steps": 6,
            "log_batch_keys": True,
            "conditioning": {"image": 0.3, "prefix": 0.3, "ends": 0.2, "noise": 0.05},
        },
    )
    train(cfg, str(overfit_corpus), tmp_path / "straight")
    assert train(cfg, str(overfit_corpus), tmp_path / "resumed", stop_at=3)["step"] == 3
    assert train(cfg, str(overfit_corpus), tmp_path / "resumed")["step"] == 6
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.allclose(tensor, b[part][name], atol=1e-6, rtol=0), (part, name)
    straight, resumed = metrics_of(tmp_path / "straight"), metrics_of(tmp_path / "resumed")
    assert [r["batch_keys"] for r in straight] == [r["batch_keys"] for r in resumed]
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert len({tuple(r["batch_keys"][0]) for r in straight}) > 1


def test_mixed_shapes_with_a_text_encoder_and_accumulation(
    mixed_corpus, text_encoder_dir, make_config, metrics_of, tmp_path
):
    cfg = make_config(
        data={"batch_size": 2, "text_encoder": str(text_encoder_dir)},
        optim={"grad_accum": 2},
        train={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 1, "log_batch_keys": True},
    )
    summary = train(cfg, str(mixed_corpus), tmp_path / "run")
    records = metrics_of(tmp_path / "run")
    assert summary["step"] == 4 and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["batch_keys"][0]) == 4 for r in records)  # 2 micro-batches of 2 per step
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert latest_checkpoint(tmp_path / "run").endswith("/checkpoints/step-00000004.pt")
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*.pt"))) == 1
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["text_encoder"] == str(text_encoder_dir) and ckpt["model_args"]["text_dim"] == 32
    assert ckpt["vae"]["vae_spec"] and ckpt["vae"]["vae_sha256"]
