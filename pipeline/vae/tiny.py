"""Tiny randomly initialised VAEs for tests and offline smoke runs, one per backend recap supports.

`recap-tiny:taesd` (TAESD format, 4 channels), `recap-tiny:autoencoder_kl` (diffusers image VAE, 8x, with a
shift and scaling factor), `recap-tiny:wan` (diffusers AutoencoderKLWan, 8x spatial, 4x temporal, per-channel
latent statistics), `recap-tiny:ltx` (diffusers AutoencoderKLLTXVideo of the >= 0.9.1 kind: a
timestep-conditioned decoder). Built once into the tiny-model cache through the diffusers/torch savers and loaded back
through the real loaders. Random weights: shapes and plumbing only, never pictures.
"""

from __future__ import annotations

from pathlib import Path

from captioner.tiny import ensure_tiny_model, register_family

TINY_VAES = ("taesd", "autoencoder_kl", "wan", "ltx")


def _seeded(build, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _write_taesd(out: Path, seed: int) -> None:
    from pipeline.vae.taesd import save_random_taesd

    save_random_taesd(out, latent_channels=4, seed=seed)


def _write_autoencoder_kl(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    model = _seeded(
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.5,
            shift_factor=0.1,
        ),
        seed,
    )
    model.save_pretrained(out)


def _write_wan(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    model = _seeded(
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.8, 1.2, 1.0],
        ),
        seed,
    )
    model.save_pretrained(out)


def _write_ltx(out: Path, seed: int) -> None:
    """An LTX-Video VAE of the >= 0.9.1 kind: timestep-conditioned decoder (a 0-d timestep_scale_multiplier)."""
    from diffusers import AutoencoderKLLTXVideo

    model = _seeded(
        lambda: AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=True,
            patch_size=1,
            patch_size_t=1,
        ),
        seed,
    )
    model.save_pretrained(out)


for _name, _writer in (
    ("taesd", _write_taesd),
    ("autoencoder_kl", _write_autoencoder_kl),
    ("wan", _write_wan),
    ("ltx", _write_ltx),
):
    register_family(f"vae_{_name}", _writer)


def ensure_tiny_vae(family: str) -> Path:
    """The cached directory of tiny VAE `family`, built on first use."""
    if family not in TINY_VAES:
        raise ValueError(f"unknown tiny VAE {family!r}; choose one of {', '.join(TINY_VAES)}")
    return ensure_tiny_model(family=f"vae_{family}")
