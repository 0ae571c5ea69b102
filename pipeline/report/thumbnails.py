"""Thumbnail strips for the report's gallery: a few frames of each clip side by side in one small JPEG.

Each source video is opened once and its clips are visited in time order (one keyframe seek per clip); videos are
handled by a thread pool, since PyAV decodes with the GIL released. A strip that exists already is kept.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FRAMES_PER_STRIP = 4
STRIP_HEIGHT = 96


def strip_times(start_s: float, end_s: float, frames: int = FRAMES_PER_STRIP) -> list[float]:
    """Evenly spaced presentation times inside [start_s, end_s): the centres of `frames` equal slices."""
    span = max(end_s - start_s, 0.0)
    return [start_s + span * (i + 0.5) / frames for i in range(frames)]


def _video_strips(uri: str, clips: list[dict[str, Any]], out_dir: str, height: int) -> dict[str, str]:
    import cv2

    from pipeline.video.decode import decode_from, display_turns, open_video, upright

    written: dict[str, str] = {}
    try:
        with open_video(uri) as container:
            for clip in sorted(clips, key=lambda c: c["start_s"]):
                targets = strip_times(clip["start_s"], clip["end_s"])
                images: list[np.ndarray] = []
                for frame, t in decode_from(container, clip["start_s"]):
                    if t >= clip["end_s"] - 1e-6 and images:
                        break
                    if t + 1e-6 >= targets[len(images)]:
                        turns = display_turns(frame)  # strips stand as players show the video
                        if turns % 2:
                            side = max(2, round(frame.height * height / frame.width / 2) * 2)
                            image = frame.to_ndarray(width=height, height=side, format="bgr24")
                        else:
                            width = max(2, round(frame.width * height / frame.height / 2) * 2)
                            image = frame.to_ndarray(width=width, height=height, format="bgr24")
                        images.append(upright(image, turns))
                        if len(images) == len(targets):
                            break
                if not images:
                    continue
                path = os.path.join(out_dir, f"{clip['clip_id']}.jpg")
                ok, data = cv2.imencode(".jpg", np.concatenate(images, axis=1), [cv2.IMWRITE_JPEG_QUALITY, 80])
                if ok:
                    with open(path + ".tmp", "wb") as fh:
                        fh.write(data.tobytes())
                    os.replace(path + ".tmp", path)
                    written[clip["clip_id"]] = path
    except Exception:  # a video that cannot be decoded now just has no thumbnails: the report still renders
        return written
    return written


def write_strips(
    clips: Iterable[dict[str, Any]], out_dir: str, height: int = STRIP_HEIGHT, workers: int | None = None
) -> set[str]:
    """Write `out_dir/<clip_id>.jpg` for each clip (dicts with clip_id, uri, start_s, end_s) that lacks one.

    Returns the clip ids that have a strip afterwards."""
    os.makedirs(out_dir, exist_ok=True)
    have = {name[:-4] for name in os.listdir(out_dir) if name.endswith(".jpg")}
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for clip in clips:
        if clip["clip_id"] not in have and clip.get("uri") and clip.get("end_s") is not None:
            by_video[clip["uri"]].append(clip)
    workers = workers or min(len(by_video), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for written in pool.map(lambda item: _video_strips(item[0], item[1], out_dir, height), by_video.items()):
            have.update(written)
    return have
