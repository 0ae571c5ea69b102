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
    timestamps: list[float] = field(default_factory=list)


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
