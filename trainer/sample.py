"""Sampling from a checkpoint: text-to-video, and with given frames (animate a still, interpolate between two stills,
extend a clip) encoded by the corpus's VAE (checked by its weights hash); Euler ODE sampler with classifier-free
guidance on text and on the given frames; frames decoded by the same VAE and written as an H.264 mp4 with PyAV."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import load_checkpoint, resolve_checkpoint
from trainer.config import ConditioningConfig, SampleConfig
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
    given_frames: tuple[int, ...] = field(default_factory=tuple)  # latent frames kept from the inputs


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


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a still image file."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"{path}: not a readable image file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_last_frames(path: str | Path, count: int, fps: float) -> list[np.ndarray]:
    """The last `count` (H, W, 3) uint8 RGB frames of a video taken at about `fps` (upright, as players show them)."""
    from pipeline.video.decode import display_turns, open_video, probe_video, upright

    src_fps = probe_video(str(path))["fps"] or fps
    stride = max(1, round(src_fps / fps))
    last: deque[np.ndarray] = deque(maxlen=count)
    with open_video(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i % stride == 0:
                last.append(upright(frame.to_ndarray(format="rgb24"), display_turns(frame)))
    return list(last)


def encode_frames(vae: Any, frames: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    """RGB frames resized to cover (height, width) and center-cropped (as the encode stage does) -> latents
    (C, T', h, w)."""
    from pipeline.video.frames import resize_center_crop, to_unit_range

    pixels = to_unit_range([resize_center_crop(f, height, width) for f in frames])
    return vae.encode(torch.from_numpy(pixels)).mean


def bucket_for(ckpt: dict[str, Any], vae: Any, patch: tuple[int, ...], image: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels: the aspect-ratio bucket nearest the input's, of the training latents' area."""
    from pipeline.video.frames import make_buckets, nearest_bucket

    _, _, h, w = ckpt["latent_shape"]
    f = vae.spatial_factor
    buckets = make_buckets(h * w * f * f, multiple=f * max(patch[1:]))
    return nearest_bucket(image.shape[0], image.shape[1], buckets)


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
    frame_cfg_scale: float | None = None,
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
    image: str | Path | None = None,
    end_image: str | Path | None = None,
    video: str | Path | None = None,
    extend: float | None = None,
    context_frames: int | None = None,
) -> SampleResult:
    """Sample one clip for `prompt` and write it to `output` (.mp4).

    `image` gives the first frame (image-to-video), with `end_image` also the last (interpolation); `video` with
    `extend` seconds continues a clip from its last `context_frames` frames (default: half a training clip).
    Inputs are resized and center-cropped to the aspect-ratio bucket nearest theirs (or to --height/--width).
    """
    from trainer.text import TextConditioner

    if end_image is not None and image is None:
        raise ValueError("--end-image needs --image (the first frame of the interpolation)")
    if (video is None) != (extend is None):
        raise ValueError("--video and --extend SECONDS go together")
    if video is not None and image is not None:
        raise ValueError("give either --image or --video, not both")
    if extend is not None and extend <= 0:
        raise ValueError(f"--extend {extend}: give a positive number of seconds")
    if context_frames is not None and context_frames < 1:
        raise ValueError(f"--context-frames {context_frames}: give at least 1 frame")
    if video is not None and frames is not None:
        raise ValueError("--frames does not apply to --video: the output is the clip's last frames plus --extend")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    sample_cfg = SampleConfig(**ckpt["config"]["sample"])  # older checkpoints: new keys take their defaults
    trained = ConditioningConfig(**ckpt["config"]["train"].get("conditioning", {}))
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
    fps = fps or sample_cfg.fps

    inputs: list[np.ndarray] = []
    if image is not None:
        inputs = [read_image(image)] + ([read_image(end_image)] if end_image is not None else [])
    elif video is not None:
        tf = autoencoder.temporal_factor
        if context_frames is None:  # half a training clip, on the VAE's frame grid
            clip_frames = 1 + (ckpt["latent_shape"][1] - 1) * tf
            context_frames = max(1, 1 + (clip_frames // 2 - 1) // tf * tf)
        inputs = read_last_frames(video, context_frames, fps)
        if not inputs:
            raise ValueError(f"{video}: no frame decodes")
        inputs = inputs[(len(inputs) - 1) % tf :]  # the latest frames on the VAE's frame grid
    if inputs and height is None and width is None:
        height, width = bucket_for(ckpt, autoencoder, model.patch_size, inputs[0])
    shape = latent_shape_for(ckpt, autoencoder, frames, height, width)
    c, t, h, w = shape
    px_h, px_w = h * autoencoder.spatial_factor, w * autoencoder.spatial_factor
    given_latents = given = None
    if inputs:
        if video is not None:
            prefix = encode_frames(autoencoder, inputs, px_h, px_w)  # (C, Tp, h, w)
            new = max(1, -(-round(extend * fps) // autoencoder.temporal_factor))
            t = prefix.shape[1] + new
            given_idx = list(range(prefix.shape[1]))
            given_latents = torch.cat([prefix, torch.zeros(c, new, h, w)], dim=1)
        else:
            stills = [encode_frames(autoencoder, [im], px_h, px_w) for im in inputs]  # each (C, 1, h, w)
            if t < len(stills) + 1:
                raise ValueError(
                    f"{t} latent frame(s) leave nothing to generate between the given frames: raise --frames"
                )
            given_idx = [0, t - 1][: len(stills)]
            given_latents = torch.zeros(c, t, h, w)
            for i, latent in zip(given_idx, stills, strict=True):
                given_latents[:, i] = latent[:, 0]
        shape = (c, t, h, w)
        given = torch.zeros(1, t, dtype=torch.bool)
        given[0, given_idx] = True
        given_latents = given_latents.unsqueeze(0)
        if not trained.enabled:
            log.warning(
                "%s was trained without frame conditioning: the given frames are kept, but expect little", path
            )
    generator = torch.Generator(device).manual_seed(sample_cfg.seed if seed is None else seed)
    noise = torch.randn((1, *shape), generator=generator, device=device)
    latents = euler_sample(
        model,
        noise,
        text,
        mask,
        steps=steps or sample_cfg.steps,
        cfg_scale=sample_cfg.cfg_scale if cfg_scale is None else cfg_scale,
        shift=shift or sample_cfg.shift,
        given=given,
        given_latents=given_latents,
        frame_cfg_scale=sample_cfg.frame_cfg_scale if frame_cfg_scale is None else frame_cfg_scale,
        given_noise=trained.noise,
    )
    decoded = autoencoder.decode(latents[0].cpu())  # (T, 3, H, W) in [0, 1]
    write_mp4(decoded, output, fps)
    n, _, px_h, px_w = decoded.shape
    log.info("wrote %s: %d frames %dx%d from %s", output, n, px_w, px_h, path)
    return SampleResult(
        str(output),
        prompt,
        n,
        px_h,
        px_w,
        tuple(shape),
        tuple(int(i) for i in given.nonzero()[:, 1]) if given is not None else (),
    )
