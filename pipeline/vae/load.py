"""Resolve the configured VAE (a TAESD-format directory, or a tiny random one for smoke runs) and load it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

TINY = "recap-tiny:taesd"


def _tiny_dir() -> Path:
    from pipeline.vae.taesd import save_random_taesd

    root = Path(os.environ.get("RECAP_CACHE", Path.home() / ".cache" / "recap")) / "tiny-models" / "taesd"
    if not (root / "tiny_decoder.pth").exists():
        tmp = root.with_name(f".taesd-{os.getpid()}")
        save_random_taesd(tmp, latent_channels=4)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another worker built it first
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return root


def resolve_vae_dir(spec: str, fallback: str | None = None) -> Path:
    """The directory holding `*_encoder.pth` and `*_decoder.pth` for `spec` (or `fallback` when missing)."""
    if spec == TINY:
        return _tiny_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        if fallback:
            return resolve_vae_dir(fallback)
        raise FileNotFoundError(f"encode.vae: {spec!r} does not exist (a TAESD-format directory or {TINY})")
    return path


def vae_files(directory: Path) -> tuple[Path, Path]:
    encoders = sorted(directory.glob("*_encoder.pth"))
    decoders = sorted(directory.glob("*_decoder.pth"))
    if len(encoders) != 1 or len(decoders) != 1:
        raise FileNotFoundError(f"{directory}: expected one *_encoder.pth and one *_decoder.pth")
    return encoders[0], decoders[0]


def load_vae(cfg: Any, device: str) -> tuple[Any, str, str]:
    """(model, id, sha256 of its weight files) for an EncodeConfig; the id and hash go into every sample."""
    directory = resolve_vae_dir(cfg.vae, cfg.vae_fallback)
    encoder, decoder = vae_files(directory)
    from pipeline.vae.taesd import load_taesd

    digest = hashlib.sha256(encoder.read_bytes() + decoder.read_bytes()).hexdigest()
    vae_id = "taesd:" + encoder.name.removesuffix("_encoder.pth")
    return load_taesd(encoder, decoder, device=device), vae_id, digest
