"""Write each clip of a video to its own H.264 mp4 in one decoding pass over the source.

Files are written under a temporary name beside their final one and renamed when complete
(locally; on an fsspec filesystem a local temporary is uploaded to a `.partial` name, then moved),
so a crash never leaves a half clip under its final name and a rename never crosses filesystems.
Any failure to write raises StorageError: a full or broken output is not the video's fault.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from fractions import Fraction
from typing import Any

import av
import fsspec

from pipeline.config import TranscodeConfig
from pipeline.errors import StorageError
from pipeline.io.sources import is_local, local_path
from pipeline.video.decode import open_video
from pipeline.video.isolation import heartbeat


def _storage_error(exc: OSError, path: str) -> StorageError:
    return StorageError(exc.errno or 0, exc.strerror or str(exc), exc.filename or path)


def _publish(tmp_path: str, final_uri: str) -> None:
    if is_local(final_uri):
        os.replace(tmp_path, local_path(final_uri))  # same directory: never crosses filesystems
        return
    fs, path = fsspec.core.url_to_fs(final_uri)
    partial = path + ".partial"
    fs.put_file(tmp_path, partial)
    fs.mv(partial, path)
    os.unlink(tmp_path)


class _ClipWriter:
    def __init__(self, path: str, cfg: TranscodeConfig, rate: Fraction, width: int, height: int, rotation: int = 0):
        self.path = path
        self.container = av.open(path, mode="w", format="mp4")  # the temporary name has no .mp4 to go by
        self.stream = self.container.add_stream(cfg.codec, rate=rate)
        self.stream.width = width - width % 2
        self.stream.height = height - height % 2
        self.stream.pix_fmt = "yuv420p"
        if rotation:  # the clip keeps its source's display matrix, so it stands as the source does
            self.stream.set_display_rotation(rotation)
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
    local = is_local(clips_dir)
    try:
        if local:
            os.makedirs(local_path(clips_dir), exist_ok=True)
        tmpdir = local_path(clips_dir) if local else tempfile.mkdtemp(prefix="recap-transcode-")
    except OSError as exc:
        raise _storage_error(exc, clips_dir) from exc
    active: dict[str, _ClipWriter] = {}
    try:
        with open_video(uri) as container:
            stream = container.streams.video[0]
            rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
            pos = 0
            for index, frame in enumerate(container.decode(stream)):
                try:
                    while pos < len(ordered) and ordered[pos]["start_frame"] == index:
                        clip = ordered[pos]
                        tmp = os.path.join(tmpdir, f".{clip['clip_id']}.mp4.partial")
                        active[clip["clip_id"]] = _ClipWriter(
                            tmp, cfg, rate, frame.width, frame.height, round(getattr(frame, "rotation", 0) or 0)
                        )
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
                except OSError as exc:  # PyAV's write errors subclass OSError too
                    raise _storage_error(exc, clips_dir) from exc
                if index % 32 == 0:
                    heartbeat()
                if pos >= len(ordered) and not active:
                    break
            # The source ended before these clips did: they are not written (finally removes their temporaries).
    finally:
        for writer in active.values():
            with contextlib.suppress(Exception):
                writer.container.close()
            with contextlib.suppress(OSError):
                os.unlink(writer.path)
        if not local:
            shutil.rmtree(tmpdir, ignore_errors=True)
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
