"""Per-frame picture quality: sharpness (variance of the Laplacian), exposure and black frames.

All take grey uint8 frames at the analysis size and average over a clip's sampled frames.
"""

from __future__ import annotations

import cv2
import numpy as np

BLACK_LUMA = 20.0  # a frame whose mean luma is below this is black
CLIP_LOW, CLIP_HIGH = 4, 251  # pixels at or beyond these are clipped shadows/highlights


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: high for crisp edges, low for blur or flat pictures."""
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def score_quality(greys: list[np.ndarray]) -> dict[str, float]:
    if not greys:
        nan = float("nan")
        return {"score_sharpness": nan, "score_brightness": nan, "score_clipped": nan, "score_black": nan}
    means = [float(g.mean()) for g in greys]
    clipped = [float(((g <= CLIP_LOW) | (g >= CLIP_HIGH)).mean()) for g in greys]
    return {
        "score_sharpness": float(np.mean([sharpness(g) for g in greys])),
        "score_brightness": float(np.mean(means)),
        "score_clipped": float(np.mean(clipped)),
        "score_black": float(np.mean([m < BLACK_LUMA for m in means])),
    }
