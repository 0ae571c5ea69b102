"""Motion scores from dense optical flow (OpenCV Farneback) on downscaled grey frames.

Gives the mean flow magnitude (catches static shots and slideshows), a camera-motion class
from the global flow field, the share of frozen frame pairs, and a cut/flash check.
"""

from __future__ import annotations

import cv2
import numpy as np

CAMERA_CLASSES = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "mixed")

FROZEN_DIFF = 1.0  # mean absolute grey difference (0-255) below which two frames are the same picture


def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) in pixels from `prev` to `nxt` (grey uint8, same size)."""
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def camera_motion_class(flows: list[np.ndarray], static_px: float = 0.2) -> str:
    """Classify the dominant camera motion from flow fields.

    Translation is the mean flow; zoom is the mean radial component (flow projected on the
    direction away from the centre). Content moves opposite to the camera: a pan to the right
    makes the picture flow left.
    """
    if not flows:
        return "static"
    dx, dy, radial, magnitude = [], [], [], []
    for flow in flows:
        h, w = flow.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        rx, ry = xs - (w - 1) / 2, ys - (h - 1) / 2
        norm = np.sqrt(rx**2 + ry**2) + 1e-6
        dx.append(float(flow[..., 0].mean()))
        dy.append(float(flow[..., 1].mean()))
        radial.append(float(((flow[..., 0] * rx + flow[..., 1] * ry) / norm).mean()))
        magnitude.append(float(np.linalg.norm(flow, axis=2).mean()))
    mx, my, mr, mm = (float(np.mean(v)) for v in (dx, dy, radial, magnitude))
    if mm < static_px:
        return "static"
    components = {"pan": abs(mx), "tilt": abs(my), "zoom": abs(mr)}
    kind, strength = max(components.items(), key=lambda kv: kv[1])
    # A camera move explains most of the flow; otherwise objects move on their own: mixed.
    if strength < 0.5 * mm:
        return "mixed"
    if kind == "pan":
        return "pan_right" if mx < 0 else "pan_left"
    if kind == "tilt":
        return "tilt_down" if my < 0 else "tilt_up"
    return "zoom_in" if mr > 0 else "zoom_out"


def score_frozen(greys: list[np.ndarray]) -> float:
    """Share of successive sampled frames (spread over the clip) that show the same picture.

    1.0 for a still image repeated; a static camera still differs by noise and small motion.
    """
    if len(greys) < 2:
        return float("nan")
    same = [
        np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < FROZEN_DIFF
        for a, b in zip(greys[:-1], greys[1:], strict=True)
    ]
    return float(np.mean(same))


def score_motion(
    pairs: list[tuple[np.ndarray, np.ndarray, int]], fps: float, flow_width: int = 160
) -> dict[str, float | str]:
    """Scores from (frame, later frame, frames apart) grey pairs sampled across a clip.

    - `score_motion`: mean flow magnitude in percent of the frame width per second;
    - `camera_motion`: one of CAMERA_CLASSES.
    """
    if not pairs:
        return {"score_motion": float("nan"), "camera_motion": "static"}
    flows, magnitudes = [], []
    for a, b, apart in pairs:
        scale = flow_width / a.shape[1]
        if scale < 1:
            size = (flow_width, max(8, round(a.shape[0] * scale)))
            a, b = cv2.resize(a, size, interpolation=cv2.INTER_AREA), cv2.resize(b, size, interpolation=cv2.INTER_AREA)
        flow = farneback(a, b) / max(1, apart)  # per frame
        flows.append(flow)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()) / a.shape[1])
    return {
        "score_motion": 100.0 * float(np.mean(magnitudes)) * fps,
        "camera_motion": camera_motion_class(flows),
    }


def score_cut_inside(frames_bgr: list[np.ndarray]) -> float:
    """Largest colour-histogram change between successive sampled frames (0 same, 1 disjoint).

    A high value inside a clip means a missed cut or a flash.
    """
    if len(frames_bgr) < 2:
        return 0.0
    hists = []
    for frame in frames_bgr:
        hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        hists.append(cv2.normalize(hist, hist).flatten())
    return float(
        max(cv2.compareHist(h1, h2, cv2.HISTCMP_BHATTACHARYYA) for h1, h2 in zip(hists[:-1], hists[1:], strict=True))
    )
