"""Open videos from any fsspec URI with PyAV, probe them, and stream small frames for analysis.

Decoding streams frame by frame: memory does not grow with the video's length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np

from pipeline.io.sources import open_binary
from pipeline.schema import RejectReason
from pipeline.video.isolation import heartbeat

_HASH_CHUNK = 8 << 20

# FFmpeg's errors in plain words (by errno / AVERROR code); the raw text follows in brackets.
_PLAIN_ERRORS = {
    1094995529: "the data is not valid for its format (damaged, or cut off)",  # AVERROR_INVALIDDATA
    541478725: "the file ends before the data its header describes (cut off)",  # AVERROR_EOF
    1: "no readable video data where the index points (a seek failed: the file is probably cut off)",  # EPERM
    5: "an I/O error while reading the file",  # EIO
    12: "out of memory while decoding",  # ENOMEM
    1414092869: "a bitstream filter or codec is missing from this FFmpeg build",  # AVERROR_BSF_NOT_FOUND
    1330794744: "no decoder for this codec in this FFmpeg build",  # AVERROR_DECODER_NOT_FOUND
}
# Containers FFmpeg opens for single images: a still image is not a video.
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "tiff_pipe", "webp_pipe", "gif_pipe", "ppm_pipe"}
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "tiff", "webp", "ppm", "jpeg2000"}


def plain_error(exc: BaseException) -> str:
    """An FFmpeg/PyAV error as a person would read it, the raw text kept in brackets after it."""
    code = getattr(exc, "errno", None)
    raw = str(exc)
    plain = _PLAIN_ERRORS.get(abs(code)) if isinstance(code, int) else None
    return f"{plain} [FFmpeg: {raw}]" if plain else raw


def promised_bytes(container: Any) -> int | None:
    """About how many bytes the container's header says the file holds (bit rate x duration), if it says."""
    if container.bit_rate and container.duration:
        return int(container.bit_rate * (container.duration / av.time_base) / 8)
    return None


def packets_after(container: Any, stream: Any, limit: int = 8) -> int:
    """How many more (non-empty) packets the demuxer finds from where it stands, up to `limit`: after a decode
    failure, none means the file ends there (cut off), many mean damage in the middle."""
    found = 0
    try:
        for packet in container.demux(stream):
            found += packet.size > 0
            if found >= limit:
                break
    except (av.error.FFmpegError, OSError):
        pass
    return found


def cut_off_note(uri: str, container: Any, stream: Any | None = None) -> str | None:
    """Why the file looks cut off, or None: it is clearly shorter than its header says, or (given the stream, after
    a decode failure) the demuxer finds no packet after the failure."""
    if stream is not None and packets_after(container, stream) <= 1:
        listed = f" although its header lists {stream.frames} frames" if stream.frames else ""
        return f"the file ends where decoding failed{listed} (cut off)"
    promised = promised_bytes(container)
    try:
        with open_binary(uri) as fh:
            size = fh.seek(0, 2)
    except OSError:
        return None
    if promised and size < 0.9 * promised:
        return f"the file holds {size:,} of the ~{promised:,} bytes its header promises"
    return None


class VideoRejected(Exception):
    """A video that cannot be used, with its stable reason code."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def open_video(uri: str) -> Iterator[Any]:
    """An open PyAV container for a local path or any fsspec URI."""
    with open_binary(uri) as fh:
        try:
            container = av.open(fh, mode="r", metadata_errors="ignore")
        except (av.error.FFmpegError, OSError) as exc:
            # PyAV reports some unparseable inputs as OSError from its I/O callbacks.
            kind = _container_magic(uri)
            if kind is not None:
                raise VideoRejected(
                    RejectReason.TRUNCATED,
                    f"{kind} header found but FFmpeg cannot open it (cut off or damaged): {plain_error(exc)}",
                ) from None
            raise VideoRejected(RejectReason.NOT_A_VIDEO, f"FFmpeg cannot open it: {plain_error(exc)}") from None
        try:
            yield container
        finally:
            container.close()


def _container_magic(uri: str) -> str | None:
    """The container a file's first bytes announce (MP4/MOV, Matroska/WebM, AVI), if any."""
    try:
        with open_binary(uri) as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    return None


def display_turns(frame: Any) -> int:
    """Quarter turns clockwise (0-3) that show a decoded frame as players do: its display matrix (phone footage
    stored landscape with a -90 degree matrix is shown portrait). FFmpeg's own autorotate does the same."""
    rotation = getattr(frame, "rotation", 0) or 0
    return int(round(-rotation / 90)) % 4


def upright(image: np.ndarray, turns: int) -> np.ndarray:
    """`image` (H, W[, C]) turned `turns` quarter turns clockwise."""
    return np.ascontiguousarray(np.rot90(image, k=-turns)) if turns % 4 else image


def sha256_of(uri: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open_binary(uri) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            heartbeat()
    return digest.hexdigest(), size


def _rate(stream: Any) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return None


def probe_video(uri: str, min_frames: int = 2) -> dict[str, Any]:
    """Probe one file with PyAV: stream facts for the `videos` row. Raises VideoRejected.

    Runs inside the isolated child: a crashing demuxer takes only the child down.
    """
    try:
        return _probe_container(uri, min_frames)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoRejected(RejectReason.DECODE_ERROR, plain_error(exc)) from None


def _probe_container(uri: str, min_frames: int) -> dict[str, Any]:
    with open_video(uri) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoRejected(RejectReason.NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if container.format.name in _IMAGE_FORMATS or (ctx.name in _IMAGE_CODECS and stream.frames == 1):
            raise VideoRejected(
                RejectReason.NOT_A_VIDEO, f"still image ({ctx.name} in {container.format.name}), not a video"
            )
        info: dict[str, Any] = {
            "container": container.format.name,
            "codec": ctx.name,
            "width": ctx.width,
            "height": ctx.height,
            "pix_fmt": ctx.format.name if ctx.format is not None else None,
            "has_audio": bool(container.streams.audio),
            "video_stream": stream.index,
            "video_streams": len(container.streams.video),
        }
        rate = _rate(stream)
        info["fps"] = float(rate) if rate else None
        # Count packets when the header gives no frame count (WebM, streams without an index).
        num_frames = stream.frames
        exact = num_frames > 0
        first_pts = None
        last_pts = None
        if num_frames <= 0:
            num_frames = 0
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                num_frames += 1
                if packet.pts is not None:
                    first_pts = packet.pts if first_pts is None else min(first_pts, packet.pts)
                    last_pts = packet.pts if last_pts is None else max(last_pts, packet.pts)
                if num_frames % 256 == 0:
                    heartbeat()
            if num_frames == 0:
                kind = _container_magic(uri)
                if kind is not None:
                    raise VideoRejected(
                        RejectReason.TRUNCATED, f"{kind} header found but no video packet follows (cut off)"
                    )
                raise VideoRejected(RejectReason.TOO_FEW_FRAMES, "the video stream holds no packet")
            container.seek(0)
        # Decode the first frame: catches files whose headers parse but whose data does not.
        try:
            first = next(container.decode(stream), None)
        except (av.error.FFmpegError, OSError) as exc:
            cut = cut_off_note(uri, container, stream)
            if cut:
                raise VideoRejected(RejectReason.TRUNCATED, f"{cut}; no frame decodes ({plain_error(exc)})") from None
            raise VideoRejected(
                RejectReason.DECODE_ERROR, f"first frame does not decode: {plain_error(exc)}"
            ) from None
        if first is None:
            cut = cut_off_note(uri, container)
            if cut:
                raise VideoRejected(RejectReason.TRUNCATED, f"{cut}; no frame decodes")
            raise VideoRejected(RejectReason.TOO_FEW_FRAMES, "no frame decodes")
        info["width"] = info["width"] or first.width
        info["height"] = info["height"] or first.height
        turns = display_turns(first)
        info["rotation"] = 90 * turns  # degrees clockwise every frame is turned to stand as players show it
        if turns % 2:  # width/height as displayed
            info["width"], info["height"] = info["height"], info["width"]
        tb = stream.time_base
        start_s = float(first.pts * tb) if first.pts is not None and tb else 0.0
        info["start_s"] = start_s
        duration_s = None
        if stream.duration and tb:
            duration_s = float(stream.duration * tb)
        elif last_pts is not None and tb and rate:
            duration_s = float((last_pts - (first_pts or 0)) * tb + 1 / rate)
        elif container.duration:
            duration_s = container.duration / av.time_base
        elif rate and num_frames:
            duration_s = num_frames / float(rate)
        info["duration_s"] = duration_s
        info["num_frames"] = num_frames
        info["num_frames_exact"] = exact
        if num_frames < min_frames:
            raise VideoRejected(RejectReason.TOO_FEW_FRAMES, f"{num_frames} frame(s); at least {min_frames} needed")
        return info


@dataclass
class AnalysisFrame:
    index: int  # decode order, from 0
    time_s: float  # presentation time in seconds
    bgr: np.ndarray  # small BGR image for detectors (as stored: cuts do not depend on the display rotation)
    turns: int = 0  # display_turns of the frame
    corrupt: bool = False  # the decoder concealed errors in it (AV_FRAME_FLAG_CORRUPT)
    key: bool = False  # a keyframe: damage before it does not reach it


def _small_bgr_from_yuv420(frame: Any, step: int) -> np.ndarray:
    """Subsample the Y/U/V planes directly: several times cheaper than a full swscale pass."""
    w, h = frame.width, frame.height
    planes = frame.planes
    y = np.frombuffer(planes[0], np.uint8).reshape(-1, planes[0].line_size)[:h, :w]
    u = np.frombuffer(planes[1], np.uint8).reshape(-1, planes[1].line_size)[: (h + 1) // 2, : (w + 1) // 2]
    v = np.frombuffer(planes[2], np.uint8).reshape(-1, planes[2].line_size)[: (h + 1) // 2, : (w + 1) // 2]
    ys = y[::step, ::step]
    sh, sw = (ys.shape[0] // 2) * 2, (ys.shape[1] // 2) * 2
    i420 = np.empty((sh * 3 // 2, sw), np.uint8)
    i420[:sh] = ys[:sh, :sw]
    quarter = (sh // 2) * (sw // 2)
    flat = i420[sh:].reshape(-1)
    flat[:quarter] = u[::step, ::step][: sh // 2, : sw // 2].reshape(-1)
    flat[quarter:] = v[::step, ::step][: sh // 2, : sw // 2].reshape(-1)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)


_FAST_FORMATS = {"yuv420p", "yuvj420p"}


def iter_analysis_frames(
    container: Any, analysis_width: int = 256, decode_threads: int = 1, exact_size: tuple[int, int] | None = None
) -> Iterator[AnalysisFrame]:
    """Decode every frame of the first video stream, yielding small BGR images.

    Frames are numbered in decode (presentation) order from 0, which is the numbering of the
    `clips` table. `exact_size` (w, h) forces a resize (TransNetV2 wants 48x27).
    """
    stream = container.streams.video[0]
    stream.thread_count = decode_threads
    tb = stream.time_base
    rate = _rate(stream) or Fraction(25)
    last_time = None
    for index, frame in enumerate(container.decode(stream)):
        if frame.pts is not None and tb:
            time_s = float(frame.pts * tb)
        elif last_time is not None:
            time_s = last_time + 1 / float(rate)
        else:
            time_s = 0.0
        last_time = time_s
        if exact_size is not None:
            image = frame.to_ndarray(width=exact_size[0], height=exact_size[1], format="rgb24", interpolation="AREA")
        else:
            step = max(1, -(-frame.width // analysis_width))  # ceil: never wider than analysis_width
            if frame.format.name in _FAST_FORMATS and frame.width >= 2 and frame.height >= 2:
                image = _small_bgr_from_yuv420(frame, step)
            else:
                image = frame.to_ndarray(
                    width=max(2, frame.width // step),
                    height=max(2, frame.height // step),
                    format="bgr24",
                    interpolation="FAST_BILINEAR",
                )
        yield AnalysisFrame(index, time_s, image, display_turns(frame), frame.is_corrupt, frame.key_frame)
        if index % 32 == 31:
            heartbeat()


def decode_from(container: Any, start_s: float) -> Iterator[tuple[Any, float]]:
    """(frame, presentation time) from `start_s` on: one seek to the keyframe before it, then decode.

    Frames decoded between that keyframe and `start_s` belong to the previous clip and are skipped;
    frames without a timestamp cannot be placed and are skipped too.
    """
    stream = container.streams.video[0]
    if stream.thread_count != 1:  # settable only before the first decode: a container may serve many clips
        stream.thread_count = 1
    tb = stream.time_base
    if tb and start_s > 0:
        container.seek(int(start_s / tb), stream=stream, backward=True, any_frame=False)
    for count, frame in enumerate(container.decode(stream)):
        if frame.pts is None or not tb:
            continue
        t = float(frame.pts * tb)
        if t < start_s - 1e-6:
            continue
        yield frame, t
        if count % 16 == 15:
            heartbeat()


def read_frames_decord(uri: str, positions: list[int]) -> dict[int, np.ndarray] | None:
    """RGB frames at decoded-frame indices `positions` through decord's `VideoReader.get_batch` (upright: decord
    applies the display matrix). None when decord is not installed or cannot serve them: the caller falls back to
    PyAV. Runs in the isolated child, which contains decord's crashes on damaged files and its leaks."""
    if "://" in uri and not uri.startswith("file://"):
        return None  # decord reads local files only; object-store URIs go through PyAV's fsspec reader
    try:
        import decord
    except ImportError:
        return None
    try:
        reader = _decord_reader(decord, uri.removeprefix("file://"))
        if not positions or max(positions) >= len(reader):
            return None
        batch = reader.get_batch(positions).asnumpy()
    except (decord.DECORDError, RuntimeError, ValueError, OSError):
        _DECORD_READER.clear()
        return None
    return {p: np.ascontiguousarray(batch[k]) for k, p in enumerate(positions)}


# The last file's VideoReader, kept open in this (child) process: clips reach a prep worker in the order of the clips
# table, so the next clip of the same file goes on decoding from where the last one stopped instead of seeking back to
# a keyframe and decoding its way forward again (a fifth to a third less decoding on the shared videos; the frames are
# the same). Keyed by path, mtime and size, so a file replaced in place is opened afresh.
_DECORD_READER: dict[tuple[str, int, int], Any] = {}


def _decord_reader(decord: Any, path: str) -> Any:
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _DECORD_READER:
        _DECORD_READER.clear()  # closes the last file's reader before this one opens
        _DECORD_READER[key] = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return _DECORD_READER[key]
