"""Which VAE an `encode.vae` spec names and its geometry, without torch: the encode prep actors need only this.

A spec is a TAESD-format directory, a diffusers model (hub id or local path, optionally with a `vae` subfolder),
or `recap-tiny:FAMILY`; `pipeline.vae.load` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_PREFIX = "recap-tiny:"
# Diffusers autoencoders recap knows how to normalise and lay out; others are refused by name.
IMAGE_CLASSES = ("AutoencoderKL",)
VIDEO_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo")


class VaeError(ValueError):
    """A VAE spec that cannot be loaded: says what was given and what is accepted."""


def diffusers_config(spec: str, subfolder: str | None) -> dict[str, Any]:
    """The model's config.json (local or from the hub cache/hub), without loading weights."""
    local = Path(spec).expanduser()
    if local.is_dir():
        path = local / subfolder / "config.json" if subfolder else local / "config.json"
        if not path.is_file():
            raise VaeError(f"encode.vae: {spec!r} has no {'/'.join(filter(None, [subfolder, 'config.json']))}")
        return json.loads(path.read_text())
    from diffusers import ConfigMixin

    return dict(ConfigMixin.load_config(spec, subfolder=subfolder))


def _tiny_dir(family: str) -> Path:
    from pipeline.vae.tiny import ensure_tiny_vae

    return ensure_tiny_vae(family)


def vae_files(directory: Path) -> tuple[Path, Path]:
    encoders = sorted(directory.glob("*_encoder.pth"))
    decoders = sorted(directory.glob("*_decoder.pth"))
    if len(encoders) != 1 or len(decoders) != 1:
        raise VaeError(f"{directory}: expected one *_encoder.pth and one *_decoder.pth")
    return encoders[0], decoders[0]


def _is_taesd_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_encoder.pth"))


def fallback_note(spec: str, fallback: str | None) -> str | None:
    """A warning for a person when `spec` is a missing local path and `fallback` will be loaded instead."""
    path = Path(spec).expanduser()
    if spec.startswith(TINY_PREFIX) or not fallback or path.exists() or not spec.startswith((".", "/", "~")):
        return None
    weights = "a tiny RANDOM VAE: these latents train nothing real" if fallback.startswith(TINY_PREFIX) else fallback
    return f"encode.vae {spec!r} does not exist; encoding with encode.vae_fallback {fallback!r} ({weights})"


def resolve_vae_spec(spec: str, fallback: str | None = None, subfolder: str | None = None) -> tuple[str, str | None]:
    """(spec, subfolder) to load: tiny families built into the cache, a missing local path replaced by
    `fallback`, and a pipeline directory's `vae/` subfolder found on its own."""
    if spec.startswith(TINY_PREFIX):
        return str(_tiny_dir(spec[len(TINY_PREFIX) :])), subfolder
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        if fallback:
            return resolve_vae_spec(fallback, None, subfolder)
        raise VaeError(
            f"encode.vae: {spec!r} does not exist (give a TAESD-format directory, a diffusers VAE directory or "
            f"hub id, or {TINY_PREFIX}taesd|autoencoder_kl|wan|ltx)"
        )
    if path.is_dir():
        path = path.resolve()
        if subfolder is None and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            subfolder = "vae"
        return str(path), subfolder
    return spec, subfolder  # a hub id


def vae_geometry(cfg: Any) -> tuple[int, int]:
    """(temporal, spatial) compression of an EncodeConfig's VAE, read without loading its weights."""
    resolved, subfolder = resolve_vae_spec(cfg.vae, cfg.vae_fallback, cfg.vae_subfolder)
    if _is_taesd_dir(Path(resolved)):
        return 1, 8
    import diffusers

    config = diffusers_config(resolved, subfolder)
    class_name = config.get("_class_name")
    if class_name not in IMAGE_CLASSES + VIDEO_CLASSES:
        raise VaeError(
            f"encode.vae: {cfg.vae!r} is a {class_name}; supported: {', '.join(IMAGE_CLASSES + VIDEO_CLASSES)}"
        )
    import torch

    from pipeline.vae.load import _diffusers_geometry

    cls = getattr(diffusers, class_name)
    with torch.device("meta"):  # builds the module with no memory for weights: only its geometry is wanted
        model = cls.from_config(config)
    return _diffusers_geometry(model)
