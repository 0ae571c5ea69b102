"""Frames of one clip for a captioning model: evenly spaced or at a target fps, capped and resized.

Decodes with PyAV from the keyframe before the clip (a seek, not a decode from the video's start)
and picks frames by presentation time, so variable frame rate sources sample correctly.
"""

from __future__ import annotations

from typing import Any

import av
import cv2
import numpy as np

from pipeline.schema import RejectReason
from pipeline.video.decode import VideoRejected, decode_from, display_turns, open_video, upright


def _upright_rgb(frame: Any) -> np.ndarray:
    """A decoded frame as RGB, standing as players show it (its display matrix applied)."""
    return upright(frame.to_ndarray(format="rgb24"), display_turns(frame))


# Model families whose video encoding has a native frame rate: Qwen's own tooling samples 2 fps, and their
# temporal positions collapse when frames come faster (ids step by temporal_patch_size / fps, truncated), with
# frames grouped in pairs (at least 2).
FAMILY_SAMPLING = {"qwen2_5_vl": (2.0, 2), "qwen2.5-vl": (2.0, 2), "qwen3_vl": (2.0, 2), "qwen3-vl": (2.0, 2)}
DEFAULT_FRAMES = 8


def family_sampling(
    model: str | None, num_frames: int | None, target_fps: float | None
) -> tuple[int | None, float | None, int]:
    """(num_frames, target_fps, min_frames) to sample for `model`: what the user set wins; with neither set, the
    family's native rate (Qwen2.5-VL / Qwen3-VL: 2 fps, at least 2 frames), else DEFAULT_FRAMES evenly."""
    name = (model or "").lower()
    for key, (fps, least) in FAMILY_SAMPLING.items():
        if key in name:
            if num_frames is None and target_fps is None:
                return None, fps, least
            return num_frames, target_fps, least
    if num_frames is None and target_fps is None:
        return DEFAULT_FRAMES, None, 1
    return num_frames, target_fps, 1


def sample_times(
    start_s: float,
    end_s: float,
    num_frames: int | None,
    target_fps: float | None,
    max_frames: int,
    min_frames: int = 1,
) -> list[float]:
    """Presentation times to sample in [start_s, end_s): `num_frames` evenly, or every 1/target_fps s."""
    duration = max(0.0, end_s - start_s)
    count = max(1, int(duration * target_fps)) if target_fps else (num_frames or DEFAULT_FRAMES)
    count = max(min_frames, 1, min(count, max_frames))
    return [start_s + (k + 0.5) * duration / count for k in range(count)]


def resize_to(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def read_clip_frames(
    uri: str,
    start_s: float,
    end_s: float,
    num_frames: int | None = 8,
    target_fps: float | None = None,
    max_frames: int = 32,
    max_side: int = 448,
    min_frames: int = 1,
) -> tuple[list[np.ndarray], list[float]]:
    """RGB uint8 frames (and their times) sampled from the clip [start_s, end_s) of `uri`."""
    targets = sample_times(start_s, end_s, num_frames, target_fps, max_frames, min_frames)
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with open_video(uri) as container:
            pending = 0
            last: Any = None
            for frame, t in decode_from(container, start_s):
                if t >= end_s:
                    break
                # Take the latest frame at or before each target time.
                while pending < len(targets) and t > targets[pending] and last is not None:
                    frames.append(resize_to(_upright_rgb(last[0]), max_side))
                    times.append(last[1])
                    pending += 1
                last = (frame, t)
                if pending >= len(targets):
                    break
            while last is not None and pending < len(targets):
                frames.append(resize_to(_upright_rgb(last[0]), max_side))
                times.append(last[1])
                pending += 1
    except av.error.FFmpegError as exc:
        raise VideoRejected(RejectReason.DECODE_ERROR, f"decoding the clip failed: {exc}") from None
    if not frames:
        raise VideoRejected(RejectReason.DECODE_ERROR, f"no frame decoded in [{start_s:.3f}, {end_s:.3f}) s")
    return frames, times
