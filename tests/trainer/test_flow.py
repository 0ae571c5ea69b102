"""Rectified flow: the sampler integrates an exact velocity field to the data; the LR schedule's shape."""

from __future__ import annotations

import pytest
import torch

from trainer.flow import euler_sample, flow_matching_loss, timestep_schedule
from trainer.train import lr_lambda


def test_euler_follows_straight_paths_to_the_data_with_and_without_guidance():
    x0 = torch.randn(2, 4, 2, 3, 3)
    noise = torch.randn_like(x0)

    def exact(x, t, text, mask):  # the velocity of the straight path through x0: (x_t - x0) / t
        target = torch.cat([x0] * (x.shape[0] // x0.shape[0]))
        return (x - target) / t.view(-1, 1, 1, 1, 1).clamp_min(1e-6)

    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    for cfg_scale in (1.0, 4.0):  # cond == uncond here, so guidance changes nothing
        out = euler_sample(exact, noise, text, mask, steps=3, cfg_scale=cfg_scale)
        assert torch.allclose(out, x0, atol=1e-5)


def test_timestep_schedule_runs_from_noise_to_data():
    t = timestep_schedule(4, shift=3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and (t[1:] < t[:-1]).all()
    assert t[2] > 0.5  # the shift keeps more steps at high noise


def test_loss_is_zero_for_the_true_velocity_and_caption_dropout_masks_captions():
    seen = []

    def oracle(xt, t, text, mask):
        seen.append(mask.clone())
        return xt  # wrong on purpose for t < 1

    x0 = torch.zeros(64, 2, 1, 2, 2)  # x0 = 0: velocity = noise = x_t / t
    g = torch.Generator().manual_seed(0)

    def true_velocity(xt, t, text, mask):
        return xt / t.view(-1, 1, 1, 1, 1)

    mask = torch.ones(64, 3, dtype=torch.bool)
    assert float(flow_matching_loss(true_velocity, x0, torch.zeros(64, 3, 4), mask, g)) == pytest.approx(0, abs=1e-8)
    flow_matching_loss(oracle, x0, torch.zeros(64, 3, 4), mask, g, caption_dropout=0.5)
    dropped = (~seen[0].any(dim=1)).sum()
    assert 16 <= int(dropped) <= 48


def test_warmup_then_cosine_to_the_floor():
    values = [lr_lambda(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55, abs=0.01)
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_given_frames_are_kept_and_guidance_on_text_and_frames_follows_the_exact_field():
    x0 = torch.randn(2, 4, 3, 2, 2)
    noise = torch.randn_like(x0)
    given = torch.tensor([[True, False, False], [True, False, True]])
    seen = []

    def exact(x, t, text, mask, frame_t=None):
        seen.append(frame_t)
        target = torch.cat([x0] * (x.shape[0] // x0.shape[0]))
        return (x - target) / t.view(-1, 1, 1, 1, 1).clamp_min(1e-6)

    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    for cfg_scale, frame_scale, batch in ((1.0, 1.0, 2), (4.0, 1.0, 4), (1.0, 3.0, 4), (4.0, 3.0, 6)):
        seen.clear()
        out = euler_sample(
            exact, noise, text, mask, 3, cfg_scale, given=given, given_latents=x0, frame_cfg_scale=frame_scale
        )
        assert torch.allclose(out, x0, atol=1e-5)
        assert torch.equal(
            out[given[:, None, :, None, None].expand_as(out)], x0[given[:, None, :, None, None].expand_as(x0)]
        )
        assert seen[0].shape == (batch, 3)  # one model call per step holds every guidance branch
        assert (seen[0][:2][given] == 0).all() and (seen[0][:2][~given] == 1).all()  # given frames at t = 0


def test_given_frames_carry_no_loss():
    x0 = torch.randn(2, 4, 3, 2, 2)
    given = torch.tensor([[True, False, False], [False, False, False]])
    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    calls = {}

    def exact_but_given(xt, t, text, mask, frame_t=None):  # the true velocity, garbage on the given frames
        calls["frame_t"] = frame_t
        noise = (xt - (1 - frame_t[:, None, :, None, None]) * x0) / frame_t[:, None, :, None, None]
        return torch.where(given[:, None, :, None, None], torch.full_like(xt, 100.0), noise - x0)

    loss = flow_matching_loss(exact_but_given, x0, text, mask, torch.Generator().manual_seed(0), given=given)
    assert float(loss) < 1e-8
    assert (calls["frame_t"][given] == 0).all() and (calls["frame_t"][~given] > 0).all()
    noisy = flow_matching_loss(
        exact_but_given, x0, text, mask, torch.Generator().manual_seed(0), given=given, given_noise=0.1
    )
    assert float(noisy) < 1e-8 and torch.allclose(calls["frame_t"][given], torch.tensor(0.1))
