"""Text-to-video sampling from a checkpoint: Euler ODE sampler with classifier-free guidance, latents decoded by the
corpus's VAE (checked by its weights hash), frames written as an H.264 mp4 with PyAV."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import load_checkpoint, resolve_checkpoint
from trainer.data import VaeMismatchError
from trainer.flow import euler_sample
from trainer.model import DiT, DiTArgs

log = logging.getLogger("recap.sample")


@dataclass
class SampleResult:
    path: str
    prompt: str
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, ...]


def load_denoiser(ckpt: dict[str, Any], use_ema: bool = True, device: str = "cpu") -> DiT:
    model = DiT(DiTArgs.from_dict(ckpt["model_args"]))
    weights = dict(ckpt["model"])
    if use_ema:
        weights.update(ckpt["ema"])  # EMA holds the parameters; buffers (if any) come from the model
    model.load_state_dict(weights)
    return model.to(device).eval()


def load_corpus_vae(ckpt: dict[str, Any], spec: str | None, device: str) -> Any:
    """The VAE the training latents came from (or `spec`), refused when its weights hash differs."""
    from pipeline.vae.load import load_vae

    info = ckpt.get("vae", {})
    spec = spec or info.get("vae_spec")
    if not spec:
        raise VaeMismatchError(
            "the checkpoint does not name the VAE its latents came from (run.json stages.encode.vae_spec): "
            "pass --vae SPEC"
        )
    vae = load_vae(spec, device=device, subfolder=info.get("vae_subfolder") if spec == info.get("vae_spec") else None)
    want = info.get("vae_sha256")
    if want and not vae.matches(want):
        raise VaeMismatchError(
            f"VAE {spec!r} has weights sha256 {vae.sha256[:16]}..., but the model was trained on latents of "
            f"{info.get('vae')} (sha256 {want[:16]}...): decode with the corpus's VAE"
        )
    if not want:
        log.warning("the checkpoint records no VAE weights hash: cannot check that %s made the training latents", spec)
    return vae


def latent_shape_for(
    ckpt: dict[str, Any], vae: Any, frames: int | None, height: int | None, width: int | None
) -> tuple[int, int, int, int]:
    c, t, h, w = ckpt["latent_shape"]
    if frames is not None:
        t = vae.latent_frames(frames)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % vae.spatial_factor:
            raise ValueError(f"--{name} {value} is not a multiple of the VAE's spatial factor {vae.spatial_factor}")
    h = height // vae.spatial_factor if height is not None else h
    w = width // vae.spatial_factor if width is not None else w
    return c, t, h, w


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> None:
    """(T, 3, H, W) frames in [0, 1] -> H.264 mp4, through the pipeline's own writer."""
    from pipeline.video.transcode import write_rgb_video

    array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_rgb_video(str(path), array, fps)


def sample_video(
    checkpoint: str | Path,
    prompt: str,
    output: str | Path,
    *,
    steps: int | None = None,
    cfg_scale: float | None = None,
    shift: float | None = None,
    seed: int | None = None,
    fps: float | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    vae: str | None = None,
    use_ema: bool = True,
    device: str = "auto",
    upsample_model: str | None = None,
) -> SampleResult:
    """Sample one clip for `prompt` and write it to `output` (.mp4)."""
    from trainer.text import TextConditioner

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    sample_cfg = ckpt["config"]["sample"]
    if upsample_model:
        from captioner.upsample import Upsampler

        prompt = Upsampler(upsample_model, device=device).upsample([prompt], [])[0] or prompt
        log.info("upsampled prompt: %s", prompt)
    model = load_denoiser(ckpt, use_ema, device)
    autoencoder = load_corpus_vae(ckpt, vae, device)
    if autoencoder.latent_channels != model.args.in_channels:
        raise VaeMismatchError(
            f"VAE {autoencoder.vae_id} has {autoencoder.latent_channels} latent channels, the model "
            f"{model.args.in_channels}"
        )
    encoder = ckpt.get("text_encoder")
    if not encoder:
        raise ValueError("the checkpoint names no text encoder, so prompts cannot be embedded like its captions")
    text, mask = TextConditioner(encoder, device, int(ckpt.get("text_max_length", 256))).encode([prompt])
    shape = latent_shape_for(ckpt, autoencoder, frames, height, width)
    generator = torch.Generator(device).manual_seed(sample_cfg["seed"] if seed is None else seed)
    noise = torch.randn((1, *shape), generator=generator, device=device)
    latents = euler_sample(
        model,
        noise,
        text,
        mask,
        steps=steps or sample_cfg["steps"],
        cfg_scale=sample_cfg["cfg_scale"] if cfg_scale is None else cfg_scale,
        shift=shift or sample_cfg["shift"],
    )
    video = autoencoder.decode(latents[0])  # (T, 3, H, W) in [0, 1]
    write_mp4(video, output, fps or sample_cfg["fps"])
    t, _, h, w = video.shape
    log.info("wrote %s: %d frames %dx%d from %s", output, t, w, h, path)
    return SampleResult(str(output), prompt, t, h, w, tuple(shape))
