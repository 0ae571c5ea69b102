"""Rectified flow: x_t = (1 - t) x_0 + t * noise, the model predicts the velocity noise - x_0; t ~ logit-normal.

Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data) with Euler steps and classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def logit_normal_timesteps(
    n: int, mean: float, std: float, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """t = sigmoid(N(mean, std)): more weight on middle noise levels, where velocity is hardest (SD3, sec. 3.1)."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * std + mean)


def drop_captions(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mask out whole captions with probability p, so the model also learns the unconditional velocity (CFG)."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape[0], generator=generator, device=mask.device) >= p
    return mask & keep[:, None]


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    generator: torch.Generator,
    t_mean: float = 0.0,
    t_std: float = 1.0,
    caption_dropout: float = 0.0,
) -> torch.Tensor:
    """Mean squared velocity error over a batch of clean latents x0 (B, C, T, H, W)."""
    b = x0.shape[0]
    t = logit_normal_timesteps(b, t_mean, t_std, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t_ = t.view(b, *([1] * (x0.dim() - 1)))
    xt = (1 - t_) * x0 + t_ * noise
    mask = drop_captions(text_mask, caption_dropout, generator)
    pred = model(xt, t, text, mask)
    return F.mse_loss(pred.float(), (noise - x0).float())


def timestep_schedule(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0; shift > 1 spends more steps at high noise (SD3's resolution shift)."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    steps: int = 30,
    cfg_scale: float = 5.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate from noise (B, C, T, H, W) at t=1 to latents at t=0; v = v_u + g (v_c - v_u) when g != 1."""
    x = noise
    b = x.shape[0]
    schedule = timestep_schedule(steps, shift, x.device)
    guided = cfg_scale != 1.0
    if guided:
        text = torch.cat([text, text])
        text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])  # second half: no caption
    for i in range(steps):
        t, t_next = schedule[i], schedule[i + 1]
        if guided:
            v_cond, v_uncond = model(torch.cat([x, x]), t.expand(2 * b), text, text_mask).float().chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = model(x, t.expand(b), text, text_mask).float()
        x = x + (t_next - t) * v
    return x
