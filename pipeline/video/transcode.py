"""Write each clip of a video to its own H.264 mp4 in one decoding pass over the source.

Files are written under a temporary name and renamed when complete, locally or on any
fsspec filesystem, so a crash never leaves a half clip under its final name.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from typing import Any

import av
import fsspec

from pipeline.config import TranscodeConfig
from pipeline.io.sources import is_local, local_path
from pipeline.video.decode import open_video
from pipeline.video.isolation import heartbeat


def _publish(tmp_path: str, final_uri: str) -> None:
    if is_local(final_uri):
        final = local_path(final_uri)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp_path, final)
        return
    fs, path = fsspec.core.url_to_fs(final_uri)
    partial = path + ".partial"
    fs.put_file(tmp_path, partial)
    fs.mv(partial, path)
    os.unlink(tmp_path)


class _ClipWriter:
    def __init__(self, path: str, cfg: TranscodeConfig, rate: Fraction, width: int, height: int):
        self.path = path
        self.container = av.open(path, mode="w", format="mp4")
        self.stream = self.container.add_stream(cfg.codec, rate=rate)
        self.stream.width = width - width % 2
        self.stream.height = height - height % 2
        self.stream.pix_fmt = "yuv420p"
        if cfg.codec == "libx264":
            self.stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}

    def write(self, frame: Any) -> None:
        frame.pts = None
        if frame.width != self.stream.width or frame.height != self.stream.height or frame.format.name != "yuv420p":
            frame = frame.reformat(width=self.stream.width, height=self.stream.height, format="yuv420p")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def transcode_clips(uri: str, clips: list[dict[str, Any]], clips_dir: str, cfg: TranscodeConfig) -> dict[str, str]:
    """Encode every clip ([start_frame, end_frame) of `uri`) to `clips_dir/{clip_id}.mp4`."""
    if not clips:
        return {}
    ordered = sorted(clips, key=lambda c: c["start_frame"])
    ends_at: dict[int, list[dict[str, Any]]] = {}
    for clip in ordered:
        ends_at.setdefault(clip["end_frame"], []).append(clip)
    written: dict[str, str] = {}
    tmpdir = tempfile.mkdtemp(prefix="recap-transcode-")
    try:
        with open_video(uri) as container:
            stream = container.streams.video[0]
            rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
            active: dict[str, _ClipWriter] = {}
            pos = 0
            for index, frame in enumerate(container.decode(stream)):
                while pos < len(ordered) and ordered[pos]["start_frame"] == index:
                    clip = ordered[pos]
                    tmp = os.path.join(tmpdir, clip["clip_id"] + ".mp4")
                    active[clip["clip_id"]] = _ClipWriter(tmp, cfg, rate, frame.width, frame.height)
                    pos += 1
                for writer in active.values():
                    writer.write(frame)
                for clip in ends_at.get(index + 1, ()):
                    if clip["clip_id"] in active:
                        writer = active.pop(clip["clip_id"])
                        writer.close()
                        final = clips_dir.rstrip("/") + "/" + clip["clip_id"] + ".mp4"
                        _publish(writer.path, final)
                        written[clip["clip_id"]] = final
                if index % 32 == 0:
                    heartbeat()
                if pos >= len(ordered) and not active:
                    break
            for writer in active.values():  # the source ended early: finish what we have
                writer.close()
    finally:
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)
    return written


def write_rgb_video(path: str, frames: Any, fps: float, crf: int = 18) -> None:
    """Write RGB uint8 frames (T, H, W, 3) as an H.264 mp4 (even sides: odd ones are cropped by a pixel)."""
    import numpy as np

    frames = np.asarray(frames, dtype=np.uint8)
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": str(crf)}
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
