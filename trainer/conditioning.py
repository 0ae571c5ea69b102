"""Which latent frames of a training sample are given as clean conditioning (image-to-video, extension, interpolation).

The choice is a pure function of (seed, step, rank, micro-batch, sample), so a resumed run draws the same choices
without any RNG state in the checkpoint, and the text-only path draws nothing from the training generator.
"""

from __future__ import annotations

import random

import torch

from trainer.config import ConditioningConfig

POLICIES = ("image", "prefix", "ends")


def given_frames(policy: str, num_frames: int, prefix_len: int = 1) -> list[bool]:
    """The given-frame mask of one sample of `num_frames` latent frames; all False when the policy would give every
    frame (nothing would be left to learn)."""
    given = [False] * num_frames
    if policy == "image":
        given[0] = True
    elif policy == "prefix":
        given[: min(prefix_len, num_frames)] = [True] * min(prefix_len, num_frames)
    elif policy == "ends":
        given[0] = given[-1] = True
    elif policy != "none":
        raise ValueError(f"unknown conditioning policy {policy!r}; allowed: none, {', '.join(POLICIES)}")
    return [False] * num_frames if all(given) else given


def choose_policy(cfg: ConditioningConfig, num_frames: int, rng: random.Random) -> tuple[str, int]:
    """One sample's policy and prefix length, by the configured shares (the rest: "none", text only)."""
    u = rng.random()
    for name in POLICIES:
        share = getattr(cfg, name)
        if u < share:
            longest = min(num_frames - 1, cfg.prefix_max or num_frames)
            return name, rng.randint(min(cfg.prefix_min, max(1, longest)), max(1, longest))
        u -= share
    return "none", 0


def draw_given_frames(
    cfg: ConditioningConfig, batch_size: int, num_frames: int, seed: int, step: int, rank: int, micro: int
) -> torch.Tensor | None:
    """(B, T) bool: the given latent frames of every sample of one micro-batch, or None when none is given.

    Each sample's draw is seeded by its place in the run (a string seed: stable across processes and Python runs).
    """
    if not cfg.enabled:
        return None
    rows = []
    for i in range(batch_size):
        rng = random.Random(f"recap-frames/{seed}/{step}/{rank}/{micro}/{i}")
        policy, prefix_len = choose_policy(cfg, num_frames, rng)
        rows.append(given_frames(policy, num_frames, prefix_len))
    given = torch.tensor(rows, dtype=torch.bool)
    return given if bool(given.any()) else None
