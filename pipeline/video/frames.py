"""Frame preparation for latent encoding: aspect-ratio buckets, frame stride and count, resize + center crop.

Deterministic by design: no random crops or flips, so stored latents are the same on every run.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

DEFAULT_RATIOS = (9 / 21, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 21 / 9)  # width / height


def make_buckets(
    target_area: int, multiple: int = 16, ratios: tuple[float, ...] = DEFAULT_RATIOS
) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio, each side a multiple of `multiple`, area near `target_area`."""
    buckets = []
    for ratio in ratios:
        height = math.sqrt(target_area / ratio)
        h = max(multiple, int(round(height / multiple)) * multiple)
        w = max(multiple, int(round(height * ratio / multiple)) * multiple)
        buckets.append((h, w))
    return sorted(set(buckets), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (a 2:1 error counts like a 1:2 error)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale so the frame covers (height, width), then crop the center: no stretching, no padding."""
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(frame, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width]


def frame_grid_count(available: int, wanted: int, temporal_factor: int) -> int:
    """Largest count <= min(available, wanted) of the form 1 + k * temporal_factor (any count for factor 1).

    Video VAEs with temporal compression (1+4k for Wan/CogVideoX/HunyuanVideo, 1+8k for LTX) drop
    frames off that grid silently, so counts are chosen on it.
    """
    n = min(available, wanted)
    if n < 1:
        return 0
    if temporal_factor <= 1:
        return n
    return 1 + ((n - 1) // temporal_factor) * temporal_factor


def frame_positions(
    start: int, end: int, src_fps: float, target_fps: float | None, num_frames: int, temporal_factor: int = 1
) -> tuple[list[int], int]:
    """Source frame indices to encode from [start, end) and the stride between them."""
    stride = max(1, round(src_fps / target_fps)) if target_fps else 1
    available = len(range(start, end, stride))
    count = frame_grid_count(available, num_frames, temporal_factor)
    return [start + i * stride for i in range(count)], stride


def to_unit_range(frames: list[np.ndarray]) -> np.ndarray:
    """(T, 3, H, W) float32 in [0, 1] from RGB uint8 frames."""
    return np.stack(frames).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
