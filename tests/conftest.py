"""Session fixtures: the shared real videos, one Ray instance, tiny generated and bad videos.

Everything expensive is built once per session. `../shared` (or $RECAP_SHARED) holds the real
videos; tests that need it skip when it is absent, unless RECAP_REQUIRE_SHARED=1 (CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Tests never reach a model hub: every model is built locally. Set before Ray starts so workers inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Fault injection requests (pipeline/faults.py): a test drops a file here to kill one stage actor.
FAULTS_DIR = Path(os.environ.setdefault("RECAP_FAULTS_DIR", f"/tmp/recap-faults-{os.getpid()}"))
FAULTS_DIR.mkdir(parents=True, exist_ok=True)


def _shared_dir() -> Path | None:
    env = os.environ.get("RECAP_SHARED")
    path = Path(env) if env else PROJECT_ROOT.parent / "shared"
    return path if (path / "data" / "videos").is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if path is None:
        if os.environ.get("RECAP_REQUIRE_SHARED") == "1":
            pytest.fail("RECAP_REQUIRE_SHARED=1 but the shared dir is missing (set RECAP_SHARED or put ../shared)")
        pytest.skip("shared test data not found (set RECAP_SHARED)")
    return path


@pytest.fixture(scope="session")
def videos_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "videos"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; the runner reuses it."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    from pipeline.samples import generate_samples

    root = tmp_path_factory.mktemp("samples")
    truth = generate_samples(str(root))
    return root, truth


def _write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 44100
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory, sample_videos) -> tuple[Path, dict[str, str | None]]:
    """A directory of broken inputs beside good ones; maps file name -> expected reject reason."""
    from pipeline.samples import write_sample

    root = tmp_path_factory.mktemp("bad_corpus")
    sample_root, _truth = sample_videos
    good = (sample_root / "sample-three-shots.mp4").read_bytes()
    expected: dict[str, str | None] = {}

    (root / "empty.mp4").write_bytes(b"")
    expected["empty.mp4"] = "empty_file"
    (root / "notes.mp4").write_text("these are my notes, not a video\n" * 40)
    expected["notes.mp4"] = "not_a_video"
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])  # moov atom at the end is cut off
    expected["truncated.mp4"] = "truncated"
    _write_audio_only(root / "audio_only.mp4")
    expected["audio_only.mp4"] = "no_video_stream"
    write_sample(str(root / "one_frame.mp4"), [(1, (20, 20, 200))])
    expected["one_frame.mp4"] = "too_few_frames"
    # Garbage over the middle of an H.264 stream: the decoder fails part-way through.
    corrupt = bytearray(good)
    mid = len(corrupt) // 2
    for i in range(mid, min(len(corrupt) - 4096, mid + len(corrupt) // 5)):
        corrupt[i] = (i * 7) & 0xFF
    (root / "corrupt_middle.mp4").write_bytes(bytes(corrupt))
    expected["corrupt_middle.mp4"] = "decode_error"
    # Good files: processed normally; a byte-identical copy is a duplicate.
    (root / "good.mp4").write_bytes(good)
    expected["good.mp4"] = None
    (root / "nested").mkdir()
    (root / "nested" / "good_copy.mp4").write_bytes(good)
    expected["nested/good_copy.mp4"] = "duplicate_file"
    write_sample(str(root / "nested" / "other.mp4"), [(60, (200, 40, 40)), (60, (40, 40, 200))])
    expected["nested/other.mp4"] = None
    (root / "readme.txt").write_text("not picked up: wrong extension")
    return root, expected


def _read_frames(path: str, start: int, end: int, width: int = 640, height: int = 360) -> list[np.ndarray]:
    import av

    frames = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if start <= i < end:
                frames.append(frame.to_ndarray(width=width, height=height, format="bgr24"))
            if i >= end:
                break
    return frames


def write_frames(
    path: Path, frames: list[np.ndarray], fps: int = 24, crf: int = 20, size: tuple[int, int] | None = None
) -> None:
    from fractions import Fraction

    import av
    import cv2

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        h, w = frames[0].shape[:2]
        stream.width, stream.height = size or (w, h)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            if size:
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="session")
def derived_clips(videos_dir, tmp_path_factory) -> Path:
    """One real shot (Big Buck Bunny 380-548) and copies made from it: frozen, blurred, dark, re-encoded,
    disguised (mirrored, cropped 8%, colour-graded, re-encoded smaller); plus a different shot of the same film."""
    import cv2

    root = tmp_path_factory.mktemp("derived")
    src = str(videos_dir / "big_buck_bunny_0_30.webm")
    shot = _read_frames(src, 380, 548)
    write_frames(root / "original.mp4", shot)
    write_frames(root / "frozen.mp4", [shot[0]] * len(shot))
    write_frames(root / "blurred.mp4", [cv2.GaussianBlur(f, (0, 0), 4) for f in shot])
    write_frames(root / "dark.mp4", [(f * 0.08).astype(np.uint8) for f in shot])
    write_frames(root / "reencoded.mp4", shot, crf=34, size=(480, 270))
    write_frames(root / "other_scene.mp4", _read_frames(src, 286, 374))
    write_frames(root / "disguised.mp4", [disguise(f) for f in shot], crf=30, size=(480, 270))
    return root


def disguise(frame: np.ndarray, crop: float = 0.08) -> np.ndarray:
    """The common re-upload: mirrored, cropped by `crop` of each side in all, colour-graded (contrast, gamma, warmer)."""
    import cv2

    h, w = frame.shape[:2]
    dy, dx = int(h * crop / 2), int(w * crop / 2)
    x = cv2.flip(frame[dy : h - dy, dx : w - dx], 1).astype(np.float32) / 255
    x = np.clip((x - 0.5) * 1.15 + 0.5, 0, 1) ** 0.85
    x[..., 0] *= 0.9  # less blue
    x[..., 2] = np.clip(x[..., 2] * 1.08, 0, 1)  # more red
    return cv2.resize((x * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA)


TEXT_SHOTS = {  # real shots without on-screen text: (video, first frame)
    "bunny_a": ("big_buck_bunny_0_30.webm", 380),
    "bunny_b": ("big_buck_bunny_0_30.webm", 286),
    "bottle": ("bottle-detection.mp4", 100),
    "kinetics": ("mmaction2_test.avi", 20),
}


def draw_text_lines(frame: np.ndarray, lines: list[str], height: int, bottom: int) -> np.ndarray:
    """White text with a dark outline, centred, lines `height` px tall stacked upwards from `bottom`."""
    import cv2

    out = frame.copy()
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(2, height // 10)
    scale = cv2.getFontScaleFromHeight(font, height, thickness)
    for k, line in enumerate(reversed(lines)):
        (tw, _th), _ = cv2.getTextSize(line, font, scale, thickness)
        org = ((out.shape[1] - tw) // 2, bottom - k * int(height * 1.6))
        cv2.putText(out, line, org, font, scale, (0, 0, 0), thickness + 3, cv2.LINE_AA)
        cv2.putText(out, line, org, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


@pytest.fixture(scope="session")
def text_clips(videos_dir, tmp_path_factory) -> Path:
    """Four real shots (640x360, 24 frames), each clean (`NAME-clean.mp4`), with two 22 px subtitle lines
    (`NAME-subtitles.mp4`) and with a three-line 54 px title (`NAME-title.mp4`)."""
    root = tmp_path_factory.mktemp("text_clips")
    subtitles = ["I never thought we would get here,", "but here we are at last."]
    title = ["THE LONG", "SUMMER", "PART TWO"]
    for name, (video, start) in TEXT_SHOTS.items():
        shot = _read_frames(str(videos_dir / video), start, start + 24)
        write_frames(root / f"{name}-clean.mp4", shot)
        write_frames(root / f"{name}-subtitles.mp4", [draw_text_lines(f, subtitles, 22, 330) for f in shot])
        write_frames(root / f"{name}-title.mp4", [draw_text_lines(f, title, 54, 270) for f in shot])
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny randomly initialised open_clip model saved like real weights, plus a linear aesthetic head.

    Loaded back through `open_clip.create_model_and_transforms(..., pretrained=PATH)` by the code under test.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pipeline.scoring.tiny_clip import build_tiny_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    paths = build_tiny_clip(root)
    state = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True)
    return {"root": root, "state": state, **paths}


@pytest.fixture(scope="session")
def sample_corpora(ray_session, sample_videos, tmp_path_factory) -> dict:
    """One small corpus built once for every test that only reads one (report, resume baseline):
    two sample videos through ingest, split and filter (copied as `partial`), then caption and encode (`full`).

    Tests must not change these directories (copy them first); `overrides` and `inputs` rebuild the same corpus.
    """
    import shutil

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    sample_dir, _truth = sample_videos
    shared = _shared_dir()
    vae = str(shared / "data" / "models" / "taef2") if shared else "recap-tiny:taesd"
    overrides = [
        "ray.progress=off",
        "filter.clip.model=null",
        f"encode.vae={vae}",
        "encode.shard_max_count=1",  # one sample a shard: a run commits several shards
    ]
    inputs = [str(sample_dir / "sample-quick-cuts.mp4"), str(sample_dir / "sample-three-shots.mp4")]
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", overrides)
    root = tmp_path_factory.mktemp("sample_corpora")
    full, partial = root / "corpus", root / "partial"
    run_pipeline(config, str(full), inputs=inputs, stages=["ingest", "split", "filter"])
    shutil.copytree(full, partial)
    run_pipeline(config, str(full), stages=["caption", "encode"])
    return {"full": full, "partial": partial, "inputs": inputs, "overrides": overrides}
