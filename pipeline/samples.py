"""Generate short sample videos with known hard cuts, so recap runs on a machine with no data.

Each shot is a distinct moving pattern; `cuts.json` beside the videos lists the true cuts.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import av
import numpy as np

# (shots as (frames, base colour BGR)) per sample; 24 fps.
_SAMPLES: dict[str, list[tuple[int, tuple[int, int, int]]]] = {
    "sample-three-shots": [(72, (40, 90, 200)), (96, (200, 160, 40)), (60, (60, 200, 80))],
    "sample-long-take": [(300, (120, 60, 160))],
    "sample-quick-cuts": [(24, (30, 30, 220)), (18, (220, 220, 30)), (72, (200, 60, 200)), (48, (20, 180, 180))],
}


def _shot_frame(shot: int, t: int, width: int, height: int, color: tuple[int, int, int]) -> np.ndarray:
    """A textured, moving frame that differs strongly from other shots (so cuts are real cuts)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = t * (2 + shot)
    stripes = 0.5 + 0.5 * np.sin((xx * (1 + shot) + yy * (3 - shot % 3) + phase) / (9.0 + 4 * shot))
    image = np.empty((height, width, 3), np.uint8)
    for c in range(3):
        image[..., c] = np.clip(color[c] * (0.35 + 0.65 * stripes), 0, 255).astype(np.uint8)
    # A square that moves across the frame: motion inside a shot without any cut.
    size = height // 4
    x0 = int((t * 3 + shot * 40) % max(1, width - size))
    y0 = int((height - size) / 2 + (height / 6) * np.sin(t / 10))
    image[y0 : y0 + size, x0 : x0 + size] = (255 - color[0], 255 - color[1], 255 - color[2])
    return image


def write_sample(
    path: str, shots: list[tuple[int, tuple[int, int, int]]], width: int = 320, height: int = 180, fps: int = 24
) -> list[int]:
    """Write one H.264 mp4 with the given shots; returns the true cut frames."""
    cuts: list[int] = []
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        index = 0
        for shot, (frames, color) in enumerate(shots):
            if shot:
                cuts.append(index)
            for t in range(frames):
                frame = av.VideoFrame.from_ndarray(_shot_frame(shot, t, width, height, color), format="bgr24")
                for packet in stream.encode(frame):
                    container.mux(packet)
                index += 1
        for packet in stream.encode():
            container.mux(packet)
    return cuts


def _cuts(shots: list[tuple[int, tuple[int, int, int]]]) -> list[int]:
    starts = np.cumsum([frames for frames, _color in shots])
    return [int(x) for x in starts[:-1]]


def generate_samples(out_dir: str, count: int | None = None) -> dict[str, list[int]]:
    """Write the sample videos into `out_dir`; returns {file name: cuts} and writes cuts.json.

    A video already there is kept as it is: its bytes, and so its `video_id`, stay those of a corpus
    made from it (x264 output is not byte-identical from one encode to the next)."""
    os.makedirs(out_dir, exist_ok=True)
    truth: dict[str, list[int]] = {}
    for name, shots in list(_SAMPLES.items())[:count]:
        file_name = f"{name}.mp4"
        path = os.path.join(out_dir, file_name)
        truth[file_name] = _cuts(shots)
        if not os.path.exists(path):
            tmp = os.path.join(out_dir, f".{file_name}.partial")
            write_sample(tmp, shots)
            os.replace(tmp, path)
    with open(os.path.join(out_dir, "cuts.json"), "w") as fh:
        json.dump(truth, fh, indent=2)
    return truth
