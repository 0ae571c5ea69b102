"""One interface over the VAEs recap encodes with: TAESD-format checkpoints and diffusers autoencoders.

`load_vae(spec)` takes a TAESD-format directory, a diffusers model (hub id or local path, optionally with a
`vae` subfolder), or `recap-tiny:FAMILY`; the returned `Vae` maps RGB frames in [0, 1] to normalised latents
(C, T', h, w) and back, whatever the backend's own input range, layout and latent statistics are.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Resolving a spec needs no torch (the encode prep actors read the VAE's geometry); re-exported for callers.
from pipeline.vae.spec import (  # noqa: F401
    IMAGE_CLASSES,
    TINY_PREFIX,
    VIDEO_CLASSES,
    VaeError,
    _is_taesd_dir,
    diffusers_config,
    fallback_note,
    resolve_vae_spec,
    vae_files,
    vae_geometry,
)

TILING_AREA = 1280 * 720  # encode.vae_tiling null: tiled from 720p up, where diffusers' video pipelines tile


@dataclass(frozen=True)
class Posterior:
    """Normalised latents (C, T', h, w) of one clip: the posterior mean, and its log-variance for KL VAEs."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None


def weights_sha256(module: torch.nn.Module) -> str:
    """Identity of a VAE's weights, the same whatever dtype they were loaded in: names, shapes and every floating
    value rounded to bfloat16 (so a bf16 load on CUDA and an fp32 load on CPU of one checkpoint agree, and decode
    paths choose their own dtype), then hashed as float32 bytes. 0-d parameters (LTX's timestep scale) count too."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.bfloat16).to(torch.float32)
        t = t.contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def legacy_weights_sha256(module: torch.nn.Module) -> str:
    """The identity corpora recorded before it became dtype-independent: the weights as loaded, as float32. A corpus
    carrying it is still recognised (`Vae.matches`)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _legacy_ids(model: torch.nn.Module) -> frozenset[str]:
    """The id older corpora recorded for these weights as loaded now. (A bf16 load's old id equals the new id, so
    bf16-encoded corpora match anyway; an fp32-encoded one matches an fp32 load, as it did then.)"""
    return frozenset({legacy_weights_sha256(model)})


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class Vae:
    """Frames (T, 3, H, W) in [0, 1] <-> normalised latents (C, T', h, w); subclasses wrap one backend."""

    vae_id: str
    sha256: str
    kind: str
    latent_channels: int
    spatial_factor: int
    temporal_factor: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    has_posterior: bool = False  # KL VAEs: a log-variance can be stored beside the mean
    legacy_sha256: frozenset[str] = frozenset()  # identities older corpora recorded for these weights

    def matches(self, sha256: str) -> bool:
        """Whether a corpus's recorded `vae_sha256` names these weights (today's id, or the one recorded before it)."""
        return sha256 == self.sha256 or sha256 in self.legacy_sha256

    tiling: bool = False  # a diffusers VAE's tiled encode/decode is on
    slicing: bool = False

    def __init__(self, device: str, dtype: torch.dtype, frames_per_batch: int = 16):
        self.device = device
        self.dtype = dtype
        self.frames_per_batch = frames_per_batch

    @property
    def is_video(self) -> bool:
        return self.temporal_factor > 1

    def latent_frames(self, num_frames: int) -> int:
        """T' for T input frames; T must be on the frame grid 1 + k * temporal_factor."""
        if self.temporal_factor == 1:
            return num_frames
        if (num_frames - 1) % self.temporal_factor:
            raise ValueError(
                f"{num_frames} frames is not on {self.vae_id}'s frame grid 1 + k*{self.temporal_factor}: "
                "the VAE would silently drop frames"
            )
        return 1 + (num_frames - 1) // self.temporal_factor

    def info(self) -> dict[str, Any]:
        """What a sample records about the VAE that made it."""
        return {
            "vae": self.vae_id,
            "vae_sha256": self.sha256,
            "vae_kind": self.kind,
            "vae_scaling_factor": self.scaling_factor,
            "vae_shift_factor": self.shift_factor,
            "vae_spatial_factor": self.spatial_factor,
            "vae_temporal_factor": self.temporal_factor,
            "vae_latent_channels": self.latent_channels,
        }

    def encode(self, clips: torch.Tensor) -> Posterior:
        """(T, 3, H, W) or (B, T, 3, H, W) frames in [0, 1] -> latents (C, T', h, w) or (B, C, T', h, w)."""
        single = clips.dim() == 4
        batch = clips.unsqueeze(0) if single else clips
        self.latent_frames(batch.shape[1])
        with torch.inference_mode():
            mean, logvar = self._encode(batch.to(self.device, self.dtype))
        mean = mean.float().cpu()
        logvar = logvar.float().cpu() if logvar is not None else None
        if single:
            return Posterior(mean[0], logvar[0] if logvar is not None else None)
        return Posterior(mean, logvar)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, T', h, w) or (B, C, T', h, w) normalised latents -> frames (T, 3, H, W) / (B, ...) in [0, 1]."""
        single = latents.dim() == 4
        batch = latents.unsqueeze(0) if single else latents
        with torch.inference_mode():
            frames = self._decode(batch.to(self.device, self.dtype)).float().clamp(0, 1).cpu()
        return frames[0] if single else frames

    def _encode(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _per_frame(self, fn, frames: torch.Tensor) -> torch.Tensor:
        """Run an image model over (N, ...) frames in chunks of frames_per_batch."""
        return torch.cat(
            [fn(frames[i : i + self.frames_per_batch]) for i in range(0, frames.shape[0], self.frames_per_batch)]
        )


class TaesdVae(Vae):
    """TAESD-format tiny autoencoders (TAESD, TAESDXL, TAEF1, TAEF2): deterministic, RGB [0, 1] in."""

    kind = "taesd"

    def __init__(self, directory: Path, device: str, dtype: torch.dtype, frames_per_batch: int = 16):
        from pipeline.vae.taesd import load_taesd

        super().__init__(device, dtype, frames_per_batch)
        encoder, decoder = vae_files(directory)
        model = load_taesd(encoder, decoder, device="cpu", dtype=dtype)
        self.sha256 = weights_sha256(model)
        self.legacy_sha256 = _legacy_ids(model)
        self.model = model.to(device=device)
        self.vae_id = "taesd:" + encoder.name.removesuffix("_encoder.pth")
        self.latent_channels = model.latent_channels
        self.spatial_factor = model.spatial_factor

    def _encode(self, clips: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, t = clips.shape[:2]
        z = self._per_frame(self.model.encode, clips.flatten(0, 1))
        return z.unflatten(0, (b, t)).transpose(1, 2), None  # (B, T, C, h, w) -> (B, C, T, h, w)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _c, t = latents.shape[:3]
        x = self._per_frame(self.model.decode, latents.transpose(1, 2).flatten(0, 1))
        return x.unflatten(0, (b, t))


class DiffusersVae(Vae):
    """A diffusers autoencoder: frames go in as [-1, 1]; latents are normalised with the model's own statistics.

    z = (mu - shift) * scaling for image VAEs (SD, SDXL, FLUX.1); z = (mu - mean_c) / std_c * scaling for video
    VAEs that publish per-channel statistics (Wan, LTX), z = mu * scaling otherwise (CogVideoX, HunyuanVideo).
    The stored log-variance is the posterior's, moved into the same normalised space.
    """

    kind = "diffusers"
    has_posterior = True

    def __init__(
        self,
        spec: str,
        subfolder: str | None,
        device: str,
        dtype: torch.dtype,
        frames_per_batch: int = 16,
        trust_remote_code: bool = False,
    ):
        import diffusers

        super().__init__(device, dtype, frames_per_batch)
        config = diffusers_config(spec, subfolder)
        class_name = config.get("_class_name")
        if class_name not in IMAGE_CLASSES + VIDEO_CLASSES:
            raise VaeError(
                f"encode.vae: {spec!r} is a {class_name or 'model without _class_name'}; "
                f"supported diffusers VAEs: {', '.join(IMAGE_CLASSES + VIDEO_CLASSES)}"
            )
        cls = getattr(diffusers, class_name)
        model = cls.from_pretrained(spec, subfolder=subfolder, torch_dtype=dtype)
        self.sha256 = weights_sha256(model)
        self.legacy_sha256 = _legacy_ids(model)
        self.model = model.to(device=device).eval()
        self.class_name = class_name
        self.vae_id = f"diffusers:{class_name}:{spec}" + (f"/{subfolder}" if subfolder else "")
        cfg = model.config
        self.latent_channels = int(cfg.get("latent_channels") or cfg.get("z_dim"))
        self.temporal_factor, self.spatial_factor = _diffusers_geometry(model)
        self.scaling_factor = float(cfg.get("scaling_factor") or 1.0)
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)
        # LTX-Video >= 0.9.1 decodes at a timestep with a little noise mixed in (diffusers' LTX pipeline does the
        # same; 0.05 / 0.025 are the values LTX publishes for these VAEs). Deterministic: a fixed-seed noise.
        self.timestep_conditioning = bool(cfg.get("timestep_conditioning"))
        self.decode_timestep, self.decode_noise_scale = 0.05, 0.025
        mean, std = _latent_stats(model, self.latent_channels)
        shape = (1, -1, 1, 1, 1)
        self._mean = mean.view(shape)
        self._std = std.view(shape)

    def _encode(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = clips * 2 - 1
        if self.is_video:
            dist = self.model.encode(x.transpose(1, 2)).latent_dist  # (B, 3, T, H, W)
            mu, logvar = dist.mean, dist.logvar
        else:
            b, t = x.shape[:2]
            parts = [self.model.encode(chunk).latent_dist for chunk in x.flatten(0, 1).split(self.frames_per_batch)]
            mu = torch.cat([d.mean for d in parts]).unflatten(0, (b, t)).transpose(1, 2)
            logvar = torch.cat([d.logvar for d in parts]).unflatten(0, (b, t)).transpose(1, 2)
        mean = self._mean.to(mu)
        std = self._std.to(mu)
        z = (mu - mean - self.shift_factor) / std * self.scaling_factor
        logvar = logvar + 2 * (math.log(self.scaling_factor) - torch.log(std))
        return z, logvar

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        mu = latents / self.scaling_factor * self._std.to(latents) + self._mean.to(latents) + self.shift_factor
        if self.is_video and self.timestep_conditioning:
            noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0)).to(mu)
            mu = (1 - self.decode_noise_scale) * mu + self.decode_noise_scale * noise
            temb = torch.full((mu.shape[0],), self.decode_timestep, device=mu.device, dtype=mu.dtype)
            x = self.model.decode(mu, temb=temb).sample.transpose(1, 2)
        elif self.is_video:
            x = self.model.decode(mu).sample.transpose(1, 2)  # (B, 3, T, H, W) -> (B, T, 3, H, W)
        else:
            b, _c, t = mu.shape[:3]
            x = self._per_frame(lambda z: self.model.decode(z).sample, mu.transpose(1, 2).flatten(0, 1))
            x = x.unflatten(0, (b, t))
        return (x + 1) / 2


def _diffusers_geometry(model: Any) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers VAE, from its attributes or config."""
    cfg = model.config
    temporal = getattr(model, "temporal_compression_ratio", None) or cfg.get("scale_factor_temporal") or 1
    spatial = getattr(model, "spatial_compression_ratio", None) or cfg.get("scale_factor_spatial")
    if not spatial:
        spatial = 2 ** (len(cfg["block_out_channels"]) - 1)
    return int(temporal), int(spatial)


def _latent_stats(model: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean/std the model publishes (Wan: config; LTX: buffers), else 0/1."""
    cfg = model.config
    buffers = dict(model.named_buffers())
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        return torch.tensor(cfg["latents_mean"], dtype=torch.float32), torch.tensor(
            cfg["latents_std"], dtype=torch.float32
        )
    if "latents_mean" in buffers and "latents_std" in buffers:
        return buffers["latents_mean"].float().cpu(), buffers["latents_std"].float().cpu()
    return torch.zeros(channels), torch.ones(channels)


def load_vae(
    spec: str,
    device: str = "cpu",
    fallback: str | None = None,
    subfolder: str | None = None,
    dtype: str = "auto",
    frames_per_batch: int = 16,
    tiling: bool = False,
    slicing: bool = False,
) -> Vae:
    """Load the VAE named by `spec` on `device` (see module docstring for the accepted forms). `tiling`/`slicing`
    switch on a diffusers VAE's own memory savers (tiled convolutions over large frames; one clip at a time)."""
    device = pick_device(device)
    resolved, subfolder = resolve_vae_spec(spec, fallback, subfolder)
    torch_dtype = pick_dtype(dtype, device)
    path = Path(resolved)
    if _is_taesd_dir(path):
        return TaesdVae(path, device, torch_dtype, frames_per_batch)
    if dtype == "auto" and diffusers_config(resolved, subfolder).get("_class_name") == "AutoencoderKLWan":
        torch_dtype = torch.float32  # as diffusers' Wan pipelines keep it: its causal convs drift in bf16
    vae = DiffusersVae(resolved, subfolder, device, torch_dtype, frames_per_batch)
    for wanted, method in ((tiling, "enable_tiling"), (slicing, "enable_slicing")):
        if wanted and hasattr(vae.model, method):
            getattr(vae.model, method)()
    vae.tiling, vae.slicing = tiling and hasattr(vae.model, "enable_tiling"), slicing
    return vae


def vae_from_config(cfg: Any, device: str | None = None) -> Vae:
    """The VAE of an EncodeConfig."""
    return load_vae(
        cfg.vae,
        device=device or cfg.device,
        fallback=cfg.vae_fallback,
        subfolder=cfg.vae_subfolder,
        dtype=cfg.dtype,
        frames_per_batch=cfg.frames_per_batch,
        tiling=cfg.target_area >= TILING_AREA if cfg.vae_tiling is None else cfg.vae_tiling,
        slicing=cfg.vae_slicing,
    )
