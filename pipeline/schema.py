"""The data contract in code: ids, reject reason codes and the pyarrow schema of every table.

../shared/DESIGN.md is the prose version; stages import from here instead of spelling columns.
"""

from __future__ import annotations

import enum

import pyarrow as pa

TABLES = ("videos", "clips", "samples", "shards", "rejects")


class RejectReason(enum.StrEnum):
    """Stable codes for every way a video or clip can be dropped."""

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"  # the bytes could not be read (I/O or permission error)
    NOT_A_VIDEO = "not_a_video"  # no container FFmpeg can open
    NO_VIDEO_STREAM = "no_video_stream"  # e.g. audio only
    TOO_FEW_FRAMES = "too_few_frames"
    TRUNCATED = "truncated"  # a container that ends early: header found, data missing
    DECODE_ERROR = "decode_error"  # the decoder failed before or during the stream
    DECODE_TIMEOUT = "decode_timeout"  # the decoder stopped making progress (watchdog)
    DECODER_CRASH = "decoder_crash"  # the decoding process died (segfault, abort, OOM kill)
    DUPLICATE_FILE = "duplicate_file"  # same bytes as another input file
    TOO_SHORT = "too_short"  # a scene shorter than split.min_clip_s
    TRANSCODE_ERROR = "transcode_error"


class VideoStatus(enum.StrEnum):
    OK = "ok"
    REJECTED = "rejected"


def video_id_from_sha256(hexdigest: str) -> str:
    return hexdigest[:16]


def make_clip_id(video_id: str, start_frame: int, end_frame: int) -> str:
    """`{video_id}-{start:07d}-{end:07d}`, end exclusive; also the WebDataset key of the clip."""
    return f"{video_id}-{start_frame:07d}-{end_frame:07d}"


VIDEOS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("codec", pa.string()),
        ("num_frames", pa.int64()),
        ("status", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("container", pa.string()),
        ("pix_fmt", pa.string()),
        ("start_s", pa.float64()),  # presentation time of the first frame (not always 0)
        ("has_audio", pa.bool_()),
        ("num_frames_exact", pa.bool_()),  # False: counted from packets, not decoded
    ]
)

CLIPS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("scene_index", pa.int32()),
        ("scene_start_frame", pa.int64()),
        ("scene_end_frame", pa.int64()),
        ("start_frame", pa.int64()),  # decode-order index in the source, inclusive
        ("end_frame", pa.int64()),  # exclusive
        ("start_s", pa.float64()),  # presentation time of start_frame in the source
        ("end_s", pa.float64()),  # presentation time of end_frame (or the end of the last frame)
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("detector", pa.string()),
        ("passed", pa.bool_()),  # False when rejected by split (too_short); filter refines it
        ("reject_reason", pa.string()),
        ("clip_uri", pa.string()),  # the transcoded clip, when split.transcode is on
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("item_id", pa.string()),
        ("uri", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "videos": VIDEOS_SCHEMA,
    "clips": CLIPS_SCHEMA,
    "rejects": REJECTS_SCHEMA,
}


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].empty_table()


def table_from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to a table of the named schema; missing optional columns become null."""
    schema = SCHEMAS[name]
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.table(columns, schema=schema)
