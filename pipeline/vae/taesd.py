"""TAESD-format tiny autoencoders (`*_encoder.pth` / `*_decoder.pth`), including the FLUX.2 variant TAEF2.

Images go in as RGB in [0, 1], NCHW; latents come out at 1/8 the size. The architecture is read off the
state dict: latent channels from the last encoder conv, and which blocks carry TAEF2's `pool` branch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """TAESD's residual block; with `pool`, TAEF2's extra branch (1x1 conv, GroupNorm(4), ReLU, 1x1 conv).

    The branch's wiring is not in the checkpoint. It was chosen by reconstruction PSNR of the real weights on
    testvideo.mp4 frames at 256x448 (8 frames): added to the block input before the convs, GroupNorm with 4
    groups: 33.1 dB; added to the conv output instead: 32.5 dB; 2 groups: 25.3 dB; 8 groups with GELU:
    30.8 dB; applied to a global mean: 24.8 dB; the branch left out entirely does not load strictly.
    """

    def __init__(self, n_in: int, n_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (
            nn.Sequential(
                nn.Conv2d(n_in, 256, 1, bias=False),
                nn.GroupNorm(4, 256),
                nn.ReLU(),
                nn.Conv2d(256, n_in, 1, bias=False),
            )
            if pool
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _pool_blocks(state: dict[str, torch.Tensor]) -> set[int]:
    return {int(k.split(".")[0]) for k in state if ".pool." in k}


def build_encoder(latent_channels: int, pool_blocks: set[int] = frozenset()) -> nn.Sequential:
    def block(i: int) -> Block:
        return Block(64, 64, pool=i in pool_blocks)

    return nn.Sequential(
        _conv(3, 64), block(1),
        _conv(64, 64, stride=2, bias=False), block(3), block(4), block(5),
        _conv(64, 64, stride=2, bias=False), block(7), block(8), block(9),
        _conv(64, 64, stride=2, bias=False), block(11), block(12), block(13),
        _conv(64, latent_channels),
    )  # fmt: skip


def build_decoder(latent_channels: int, pool_blocks: set[int] = frozenset()) -> nn.Sequential:
    def block(i: int) -> Block:
        return Block(64, 64, pool=i in pool_blocks)

    return nn.Sequential(
        Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        block(3), block(4), block(5), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        block(8), block(9), block(10), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        block(13), block(14), block(15), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        block(18), _conv(64, 3),
    )  # fmt: skip


class TinyAutoencoder(nn.Module):
    """encode: RGB [0, 1] (B, 3, H, W) -> latents (B, C, H/8, W/8); decode: the way back, clamped to [0, 1]."""

    spatial_factor = 8
    input_range = (0.0, 1.0)

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential | None, latent_channels: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_channels = latent_channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("this autoencoder was loaded without a decoder")
        return self.decoder(latents).clamp(0, 1)


def load_taesd(
    encoder_path: str | Path,
    decoder_path: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyAutoencoder:
    """Load a TAESD-format checkpoint pair strictly (weights only: no pickled code)."""
    enc_state = torch.load(encoder_path, map_location="cpu", weights_only=True)
    last = max(int(k.split(".")[0]) for k in enc_state)
    latent_channels = int(enc_state[f"{last}.weight"].shape[0])
    encoder = build_encoder(latent_channels, _pool_blocks(enc_state))
    encoder.load_state_dict(enc_state, strict=True)
    decoder = None
    if decoder_path is not None:
        dec_state = torch.load(decoder_path, map_location="cpu", weights_only=True)
        decoder = build_decoder(latent_channels, _pool_blocks(dec_state))
        decoder.load_state_dict(dec_state, strict=True)
    model = TinyAutoencoder(encoder, decoder, latent_channels)
    return model.to(device=device, dtype=dtype).eval()


def save_random_taesd(out_dir: str | Path, latent_channels: int = 4, seed: int = 0, prefix: str = "tiny") -> Path:
    """A randomly initialised TAESD pair in the checkpoint format (tests and offline smoke runs only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        torch.save(build_encoder(latent_channels).state_dict(), out / f"{prefix}_encoder.pth")
        torch.save(build_decoder(latent_channels).state_dict(), out / f"{prefix}_decoder.pth")
    finally:
        torch.random.set_rng_state(generator_state)
    return out
