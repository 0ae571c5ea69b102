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
    given: torch.Tensor | None = None,
    given_noise: float = 0.0,
) -> torch.Tensor:
    """Mean squared velocity error over a batch of clean latents x0 (B, C, T, H, W).

    `given` (B, T) bool marks latent frames given as conditioning: they sit at noise level `given_noise` (the
    model is told so per frame) and carry no loss; the mean runs over the other frames' elements only.
    """
    b = x0.shape[0]
    t = logit_normal_timesteps(b, t_mean, t_std, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mask = drop_captions(text_mask, caption_dropout, generator)
    if given is None:
        t_ = t.view(b, *([1] * (x0.dim() - 1)))
        xt = (1 - t_) * x0 + t_ * noise
        pred = model(xt, t, text, mask)
        return F.mse_loss(pred.float(), (noise - x0).float())
    given = given.to(x0.device)
    frame_t = torch.where(given, torch.full_like(t[:, None], given_noise), t[:, None])  # (B, T)
    t_ = frame_t[:, None, :, None, None].to(x0.dtype)
    xt = (1 - t_) * x0 + t_ * noise
    pred = model(xt, t, text, mask, frame_t=frame_t)
    weight = (~given)[:, None, :, None, None].float()  # (B, 1, T, 1, 1)
    squared = (pred.float() - (noise - x0).float()).square() * weight
    return squared.sum() / (weight.sum() * x0.shape[1] * x0.shape[3] * x0.shape[4])


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
    given: torch.Tensor | None = None,
    given_latents: torch.Tensor | None = None,
    frame_cfg_scale: float = 1.0,
    given_noise: float = 0.0,
) -> torch.Tensor:
    """Integrate from noise (B, C, T, H, W) at t=1 to latents at t=0; v = v_u + g (v_c - v_u) when g != 1.

    With `given` (B, T) bool and `given_latents` (B, C, T, H, W), those latent frames are conditioning: put back
    (at noise level `given_noise`) before every step and exactly at the end. Frame guidance (InstructPix2Pix's
    two-scale form) adds a prediction without them: v = v_0 + s_f (v_f - v_0) + s_t (v_ft - v_f), where v_0 sees
    no caption and no given frames (every frame at the step's t, as a text-only training sample), v_f the given
    frames only, v_ft both (with text guidance off, v_0 keeps the caption: v = v_0 + s_f (v_ft - v_0)).
    """
    if given is None:
        return _euler_text_only(model, noise, text, text_mask, steps, cfg_scale, shift)
    x = noise
    b, t_frames = x.shape[0], x.shape[2]
    given = given.to(x.device)
    keep = given[:, None, :, None, None]
    given_latents = given_latents.to(x.device, x.dtype)
    given_x = (1 - given_noise) * given_latents + given_noise * noise
    schedule = timestep_schedule(steps, shift, x.device)
    no_text = torch.zeros_like(text_mask)
    for i in range(steps):
        t, t_next = schedule[i], schedule[i + 1]
        x = torch.where(keep, given_x, x)
        frame_t = torch.where(given, torch.full((b, t_frames), given_noise, device=x.device), t)
        inputs = [(x, text, text_mask, frame_t)]
        if cfg_scale != 1.0:
            inputs.append((x, text, no_text, frame_t))
        if frame_cfg_scale != 1.0:
            # The frame-free view of the same trajectory: the given frames noised to t like every other frame.
            x_free = torch.where(keep, (1 - t) * given_latents + t * noise, x)
            free_mask = no_text if cfg_scale != 1.0 else text_mask  # without text guidance, keep the caption
            inputs.append((x_free, text, free_mask, torch.full((b, t_frames), float(t), device=x.device)))
        xs, texts, masks, frame_ts = (torch.cat(parts) for parts in zip(*inputs, strict=True))
        preds = model(xs, t.expand(xs.shape[0]), texts, masks, frame_t=frame_ts).float().chunk(len(inputs))
        v = preds[0]
        if cfg_scale != 1.0:
            v = preds[1] + cfg_scale * (preds[0] - preds[1])
        if frame_cfg_scale != 1.0:
            v_frames = preds[1] if cfg_scale != 1.0 else preds[0]
            v = v + (frame_cfg_scale - 1.0) * (v_frames - preds[-1])
        x = x + (t_next - t) * v
    return torch.where(keep, given_latents, x)


def _euler_text_only(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    steps: int,
    cfg_scale: float,
    shift: float,
) -> torch.Tensor:
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
