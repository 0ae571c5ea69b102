"""Text overlay from a real detector: the PP-OCRv6 text detector (and optionally its recogniser) from the
`rapidocr` wheel, on onnxruntime. The models ship inside the wheel, so nothing is downloaded at run time.

`score_text` is the share of the frame area inside detected text boxes, averaged over the frames looked at.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DET_MEAN = 0.5  # PP-OCR detection normalisation: (x / 255 - 0.5) / 0.5
DET_STRIDE = 32  # the detector's input sides must be multiples of this
# A box thicker than this share of the frame's short side is not a line of text: DB post-processing
# sometimes returns one box around the whole frame (seen on a graded, low-contrast shot of Big Buck Bunny).
MAX_LINE_THICKNESS = 0.3


def onnx_providers(device: str) -> list[str]:
    """onnxruntime execution providers for `device` (auto: CUDA when this onnxruntime build has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "device cuda needs onnxruntime with CUDA: pip install onnxruntime-gpu==1.31.* (in place of onnxruntime)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path: str | Path, device: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))


def rapidocr_model(name: str) -> Path:
    """A model file shipped in the rapidocr wheel (never fetched: a missing file is an install problem)."""
    import rapidocr

    path = Path(rapidocr.__file__).parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall rapidocr (pip install 'rapidocr==3.10.*')")
    return path


def detector_input(frame: np.ndarray, max_side: int) -> np.ndarray:
    """CHW float32 input: the frame scaled so its long side is at most `max_side`, sides rounded to 32."""
    h, w = frame.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    nh = max(DET_STRIDE, round(h * scale / DET_STRIDE) * DET_STRIDE)
    nw = max(DET_STRIDE, round(w * scale / DET_STRIDE) * DET_STRIDE)
    resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA) if (nh, nw) != (h, w) else frame
    x = (resized.astype(np.float32) / 255.0 - DET_MEAN) / DET_MEAN
    return x.transpose(2, 0, 1)


def text_line_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The boxes that can be lines of text in a frame of `shape` (h, w): none thicker than MAX_LINE_THICKNESS."""
    limit = MAX_LINE_THICKNESS * min(shape)
    keep = [b for b in boxes if min(cv2.minAreaRect(np.asarray(b, np.float32))[1]) <= limit]
    return np.asarray(keep, np.float32).reshape(-1, 4, 2)


def box_area_share(boxes: list[np.ndarray], shape: tuple[int, int]) -> float:
    """Share of a frame of `shape` (h, w) inside the union of quadrilateral boxes (overlaps count once)."""
    if not len(boxes):
        return 0.0
    mask = np.zeros(shape, np.uint8)
    for box in boxes:  # one call per box: fillPoly fills overlaps of several polygons even-odd (as holes)
        cv2.fillConvexPoly(mask, np.round(box).astype(np.int32), 1)
    return float(mask.mean())


class TextDetector:
    """PP-OCRv6 text boxes for batches of BGR frames (as PP-OCR was trained); the model loads once per instance (once per actor)."""

    def __init__(
        self,
        max_side: int = 640,
        box_thresh: float = 0.5,
        device: str = "auto",
        threads: int = 0,
        batch_size: int = 8,
        recognize: bool = False,
    ):
        from rapidocr.ch_ppocr_det.utils import DBPostProcess

        self.max_side = max_side
        self.batch_size = batch_size
        self.session = onnx_session(rapidocr_model("PP-OCRv6_det_small.onnx"), device, threads)
        self.input_name = self.session.get_inputs()[0].name
        # rapidocr's own defaults for PP-OCR detection maps (DB: threshold, box score, polygon expansion).
        self.postprocess = DBPostProcess(
            thresh=0.3, box_thresh=box_thresh, max_candidates=1000, unclip_ratio=1.6, use_dilation=True
        )
        self.recognizer = None
        if recognize:
            from rapidocr import RapidOCR

            self.recognizer = RapidOCR(
                params={
                    "Global.log_level": "error",
                    "Global.use_cls": False,
                    "Rec.model_path": str(rapidocr_model("PP-OCRv6_rec_small.onnx")),
                    "EngineConfig.onnxruntime.use_cuda": onnx_providers(device)[0] == "CUDAExecutionProvider",
                    "EngineConfig.onnxruntime.intra_op_num_threads": threads if threads > 0 else -1,
                }
            )

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Text boxes (n, 4, 2) in each frame's own pixel coordinates. Same-sized frames run as one batch."""
        out: list[np.ndarray] = [np.zeros((0, 4, 2), np.float32)] * len(frames)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                x = np.stack([detector_input(frames[i], self.max_side) for i in chunk])
                maps = self.session.run(None, {self.input_name: x})[0]
                for j, i in enumerate(chunk):
                    boxes, _scores = self.postprocess(maps[j : j + 1], frames[i].shape[:2])
                    if len(boxes):
                        out[i] = text_line_boxes(np.asarray(boxes, np.float32), frames[i].shape[:2])
        return out

    def recognize(self, frame: np.ndarray, boxes: np.ndarray) -> str:
        """The text inside `boxes`, one line per box, top to bottom."""
        if self.recognizer is None or not len(boxes):
            return ""
        lines = []
        for box in sorted(boxes, key=lambda b: (float(b[:, 1].min()), float(b[:, 0].min()))):
            x0, y0 = np.floor(box.min(axis=0)).astype(int)
            x1, y1 = np.ceil(box.max(axis=0)).astype(int)
            crop = frame[max(0, y0) : y1, max(0, x0) : x1]
            if crop.size == 0:
                continue
            result = self.recognizer(np.ascontiguousarray(crop), use_det=False, use_cls=False, use_rec=True)
            text = " ".join(t for t in (getattr(result, "txts", None) or ()) if t).strip()
            if text:
                lines.append(text)
        return "\n".join(lines)

    def score_clips(self, clips: list[list[np.ndarray]]) -> list[dict[str, Any]]:
        """Per clip: `score_text` (mean share of the frame in text boxes; NaN without frames) and, when
        recognising, `text_ocr` (the text of the frame with the most text)."""
        frames = [f for clip in clips for f in clip]
        boxes = self.detect(frames)
        results = []
        start = 0
        for clip in clips:
            stop = start + len(clip)
            shares = [box_area_share(boxes[i], frames[i].shape[:2]) for i in range(start, stop)]
            result: dict[str, Any] = {"score_text": float(np.mean(shares)) if shares else math.nan}
            if self.recognizer is not None:
                best = start + int(np.argmax(shares)) if shares else None
                result["text_ocr"] = self.recognize(frames[best], boxes[best]) if best is not None else None
            results.append(result)
            start = stop
        return results
