"""Trainer fixtures, built once per session: real TAEF2 latents of clips from the shared videos written to shards by
the pipeline's writer, a tiny T5 text encoder saved with save_pretrained, and small training configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# (video, first frame) of each clip; 4 frames each, every 3rd frame.
CLIPS = [
    ("big_buck_bunny_0_30.webm", 390),
    ("big_buck_bunny_0_30.webm", 600),
    ("testvideo.mp4", 30),
    ("testvideo.mp4", 200),
]
PORTRAIT_CLIPS = [("fades.mp4", 40), ("counter.mp4", 10), ("bottle-detection.mp4", 60)]
CAPTIONS = [
    "A white rabbit sits on the green grass under a tree.",
    "A rabbit walks slowly across a bright meadow.",
    "A close view of a busy city street with cars.",
    "People walk on the street in the morning light.",
    "The screen fades from black to a bright scene.",
    "A counter shows numbers changing on a dark screen.",
    "Bottles stand on a table in a white room.",
]
FRAMES, STRIDE = 4, 3


def read_clip(path: Path, start: int, height: int, width: int) -> np.ndarray:
    """(FRAMES, H, W, 3) uint8 RGB frames start, start+STRIDE, ... resized to (height, width)."""
    import av

    wanted = {start + i * STRIDE for i in range(FRAMES)}
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(frame.to_ndarray(width=width, height=height, format="rgb24"))
            if len(frames) == FRAMES:
                break
    assert len(frames) == FRAMES, f"{path} has fewer than {start + FRAMES * STRIDE} frames"
    return np.stack(frames)


@pytest.fixture(scope="session")
def taef2_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "models" / "taef2"
    if not (path / "taef2_encoder.pth").is_file():
        if os.environ.get("RECAP_REQUIRE_SHARED") == "1":
            pytest.fail(f"RECAP_REQUIRE_SHARED=1 but {path} has no TAEF2 weights")
        pytest.skip("TAEF2 weights not in the shared dir")
    return path


@pytest.fixture(scope="session")
def taef2(taef2_dir):
    from pipeline.vae.load import load_vae

    return load_vae(str(taef2_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory) -> Path:
    from captioner.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("text_encoder"), family="text_encoder")


@pytest.fixture(scope="session")
def real_latents(videos_dir, taef2) -> dict[str, list[np.ndarray]]:
    """float16 TAEF2 latents: 4 landscape clips (32, 4, 8, 12) and 3 portrait clips (32, 4, 12, 8)."""
    import torch

    def encode(clips, height, width):
        out = []
        for name, start in clips:
            frames = read_clip(videos_dir / name, start, height, width)
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
            out.append(taef2.encode(x).mean.numpy().astype(np.float16))
        return out

    return {"landscape": encode(CLIPS, 64, 96), "portrait": encode(PORTRAIT_CLIPS, 96, 64)}


def _key(i: int) -> str:
    return f"{i:016x}-0000000-0000012"


def write_corpus(out: Path, latents: list[np.ndarray], taef2, taef2_dir: Path, text_encoder: str | None = None):
    """A corpus through the pipeline's writer: shards (2 samples each), samples/shards tables, run.json."""
    from pipeline import manifest
    from pipeline.shards.corpus import write_corpus_shards
    from pipeline.shards.writer import encode_latent

    embedder = None
    if text_encoder is not None:
        from captioner.text_encoder import CaptionEncoder

        embedder = CaptionEncoder(text_encoder, device="cpu", dtype="float32")
    info = {**taef2.info(), "latent_dtype": "float16", "text_encoder": text_encoder}

    def items():
        for i, latent in enumerate(latents):
            caption = CAPTIONS[i % len(CAPTIONS)]
            extra = {}
            if embedder is not None:
                extra["text_emb.npy"] = encode_latent(embedder.encode([caption])[0].astype(np.float16))
            yield {
                "key": _key(i),
                "latent": latent,
                "caption": caption,
                "meta": {"clip_id": _key(i), **info},
                "extra": extra,
                "row": {"vae": taef2.vae_id, "num_frames": FRAMES, "frame_stride": STRIDE, "height": 0, "width": 0},
            }

    write_corpus_shards(str(out), items(), max_count=2)
    manifest.update_run_json(
        str(out), {}, "encode", {**taef2.info(), "vae_spec": str(taef2_dir), "vae_subfolder": None}
    )
    return out


@pytest.fixture(scope="session")
def overfit_corpus(tmp_path_factory, real_latents, taef2, taef2_dir, text_encoder_dir) -> Path:
    """Four real landscape latents with stored caption embeddings (KEY.text_emb.npy)."""
    out = tmp_path_factory.mktemp("overfit_corpus")
    return write_corpus(out, real_latents["landscape"], taef2, taef2_dir, text_encoder=str(text_encoder_dir))


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory, real_latents, taef2, taef2_dir) -> Path:
    """Landscape and portrait latents (two shapes), captions only (the trainer embeds them)."""
    out = tmp_path_factory.mktemp("mixed_corpus")
    latents = real_latents["landscape"][:3] + real_latents["portrait"]
    return write_corpus(out, latents, taef2, taef2_dir)


def tiny_config(**sections):
    """A tiny-preset config for CPU tests; `sections` override per section, e.g. data={"batch_size": 2}."""
    from trainer.config import config_from_dict

    base = {
        "model": {"preset": "tiny"},
        "data": {"batch_size": 4, "num_workers": 0, "window_shards": 2, "shuffle_buffer": 8},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "train": {"steps": 10, "device": "cpu", "ema_decay": 0.9, "log_every": 1000, "checkpoint_every": 1000},
        "sample": {"steps": 4, "cfg_scale": 2.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def metrics_of():
    return read_metrics


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP barriers under contention can slow steps 50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
