"""Text/graphics overlay share without a model: the fraction of the frame covered by text-like blobs.

Text is dense, high-contrast strokes in horizontal runs: a morphological gradient picks strokes,
a wide closing joins letters into lines, and only line-shaped components (short, wide, well filled)
count. Measures the area of those line boxes over the frame area, averaged over sampled frames.
"""

from __future__ import annotations

import cv2
import numpy as np


def text_share(grey: np.ndarray) -> float:
    h, w = grey.shape
    gradient = cv2.morphologyEx(grey, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    _, strokes = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if strokes.mean() > 0.5 * 255:  # texture everywhere, not text
        return 0.0
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 40), 1))
    lines = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, kernel)
    count, _labels, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    area = 0
    for _x, _y, bw, bh, filled in stats[1:count]:
        if not (0.01 * h <= bh <= 0.12 * h and bw >= 2.5 * bh and bw >= 0.03 * w):
            continue
        density = filled / float(bw * bh)
        if 0.25 <= density <= 0.95:
            area += bw * bh
    return min(1.0, area / float(h * w))


def score_text(greys: list[np.ndarray]) -> dict[str, float]:
    if not greys:
        return {"score_text": float("nan")}
    return {"score_text": float(np.mean([text_share(g) for g in greys]))}
