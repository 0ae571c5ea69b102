"""The backend interface: a batch of clips (frames + prompt) in, one caption per clip out.

Backends get frames already decoded and resized by CPU-side actors, so the model never waits on
decoding; they only build model inputs and generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class CaptionRequest:
    clip_id: str
    frames: list[np.ndarray]  # RGB uint8 (H, W, 3), all the same size
    fps: float  # rate of the sampled frames, for the model's temporal encoding
    user_text: str
    system: str = ""
    timestamps: list[float] = field(default_factory=list)  # each frame's time from the clip's start (real, VFR too)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    seed: int = 0


class CaptionBackend(Protocol):
    model_id: str

    def caption(self, requests: list[CaptionRequest], sampling: Sampling) -> list[str]: ...


def build_messages(request: CaptionRequest) -> list[dict]:
    """Chat messages with one video part, in the content-parts format of transformers chat templates."""
    messages: list[dict] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": request.user_text}]})
    return messages


def frames_array(request: CaptionRequest) -> np.ndarray:
    """(T, H, W, 3) uint8; frames of differing size (never from one clip) are an error, not a resize."""
    shapes = {f.shape for f in request.frames}
    if len(shapes) != 1:
        raise ValueError(f"clip {request.clip_id}: frames differ in shape {sorted(shapes)}")
    return np.stack(request.frames).astype(np.uint8, copy=False)


def video_metadata(request: CaptionRequest) -> dict:
    """What the processors read about the frames: `fps` is the rate of the frames given (Qwen2.5-VL's temporal
    positions step by temporal_patch_size / fps), `frames_indices` place each frame on that rate's grid by its real
    time (Qwen3-VL's `<t seconds>` labels are index / fps), `duration` is the clip's."""
    n = len(request.frames)
    fps = request.fps or 1.0
    times = request.timestamps if len(request.timestamps) == n else [i / fps for i in range(n)]
    indices = [max(0, round(t * fps - 0.5)) for t in times]  # times sit mid-interval: k + 0.5 over fps
    for i in range(1, n):  # strictly increasing, as the processors expect
        indices[i] = max(indices[i], indices[i - 1] + 1)
    duration = (times[-1] - times[0]) + 1 / fps if n else 0.0
    return {
        "fps": fps,
        "total_num_frames": indices[-1] + 1 if n else 0,
        "frames_indices": indices,
        "duration": duration,
    }
