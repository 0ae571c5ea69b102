"""NSFW from a real detector: NudeNet's 320n body-part detector (ONNX, shipped in the `nudenet` wheel).

`score_nsfw` is the highest confidence of an exposed-content class over the frames looked at: one clear
detection in one frame is enough to flag a clip. Covered parts, faces and feet never count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.scoring.ocr import onnx_session

# NudeNet's classes that mean explicit content (its other classes: *_COVERED, FACE_*, FEET_*, ARMPITS_*,
# BELLY_*, MALE_BREAST_EXPOSED, are ordinary in film and sport).
EXPOSED_CLASSES = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


def nsfw_score(detections: list[list[dict[str, Any]]], classes: tuple[str, ...] = EXPOSED_CLASSES) -> float:
    """Highest confidence of a detection of one of `classes` over frames (NudeNet's {class, score, box}
    dicts, one list per frame); 0.0 when none; NaN when no frame was looked at."""
    if not detections:
        return math.nan
    return max((float(d["score"]) for frame in detections for d in frame if d["class"] in classes), default=0.0)


def nudenet_model() -> Path:
    import nudenet

    path = Path(nudenet.__file__).parent / "320n.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall nudenet (pip install 'nudenet==3.4.*')")
    return path


class NsfwDetector:
    """NudeNet 320n on batches of BGR frames; the model loads once per instance (once per actor)."""

    def __init__(
        self,
        device: str = "auto",
        threads: int = 0,
        batch_size: int = 8,
        classes: tuple[str, ...] = EXPOSED_CLASSES,
    ):
        self.session = onnx_session(nudenet_model(), device, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.side = 320  # the resolution the 320n model was trained at
        self.batch_size = batch_size
        self.classes = tuple(classes)

    def detect(self, frames: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """NudeNet's detections ({class, score, box}) per frame, batched."""
        from nudenet.nudenet import _postprocess

        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(frames), self.batch_size):
            batch, meta = [], []
            for frame in frames[start : start + self.batch_size]:
                h, w = frame.shape[:2]
                side = max(h, w)  # NudeNet pads to a square at the bottom/right, then scales
                padded = cv2.copyMakeBorder(frame, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT)
                batch.append(
                    cv2.dnn.blobFromImage(
                        padded, 1 / 255.0, (self.side, self.side), (0, 0, 0), swapRB=True, crop=False
                    )
                )
                meta.append((side / w, side / h, side - w, side - h, w, h))
            outputs = self.session.run(None, {self.input_name: np.vstack(batch)})[0]
            for j, (x_ratio, y_ratio, x_pad, y_pad, w, h) in enumerate(meta):
                out.append(
                    _postprocess([outputs[j : j + 1]], x_pad, y_pad, x_ratio, y_ratio, w, h, self.side, self.side)
                )
        return out

    def score_clips(self, clips: list[list[np.ndarray]]) -> list[dict[str, Any]]:
        """Per clip: `score_nsfw` (see `nsfw_score`)."""
        frames = [f for clip in clips for f in clip]
        detections = self.detect(frames)
        results, start = [], 0
        for clip in clips:
            stop = start + len(clip)
            results.append({"score_nsfw": nsfw_score(detections[start:stop], self.classes)})
            start = stop
        return results
