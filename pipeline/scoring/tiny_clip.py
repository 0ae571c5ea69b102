"""A tiny randomly initialised open_clip model and aesthetic head, built on first use and cached.

For the offline smoke config and tests only (`filter.clip.model: recap-tiny:clip`): its scores mean
nothing, but every code path a real CLIP model takes runs, loaded from disk like real weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

TINY_PREFIX = "recap-tiny:"
FORMAT_VERSION = "1"
MODEL_NAME = "recap-tiny-clip"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    # open_clip's SimpleTokenizer emits ids up to 49407, so the vocabulary stays full size; the towers are tiny.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def default_cache() -> Path:
    return Path(os.environ.get("RECAP_CACHE", Path.home() / ".cache" / "recap")) / "tiny-models"


def build_tiny_clip(out_dir: str | Path, seed: int = 1234) -> dict[str, str]:
    """Write config JSON, checkpoint and a linear aesthetic head into `out_dir`; returns their paths."""
    import open_clip
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"{MODEL_NAME}.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "model.pt")
    generator = torch.Generator().manual_seed(seed)
    torch.save(
        {"weight": torch.randn(1, CONFIG["embed_dim"], generator=generator), "bias": torch.full((1,), 5.0)},
        out / "aesthetic_head.pt",
    )
    (out / "VERSION").write_text(FORMAT_VERSION)
    return paths_in(out)


def paths_in(directory: Path) -> dict[str, str]:
    return {
        "model": MODEL_NAME,
        "config": str(directory / f"{MODEL_NAME}.json"),
        "checkpoint": str(directory / "model.pt"),
        "head": str(directory / "aesthetic_head.pt"),
    }


def ensure_tiny_clip(cache_dir: str | Path | None = None) -> dict[str, str]:
    """The cached tiny model's paths, building it once (atomically, safe when workers race)."""
    target = Path(cache_dir or default_cache()) / "clip"
    marker = target / "VERSION"
    if marker.exists() and marker.read_text() == FORMAT_VERSION:
        return paths_in(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".clip-", dir=target.parent))
    try:
        build_tiny_clip(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):  # another worker finished first
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths_in(target)
