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
    DECODE_DAMAGED = "decode_damaged"  # frames the decoder concealed errors in (and those predicted from them)
    DECODE_TIMEOUT = "decode_timeout"  # the decoder stopped making progress (watchdog)
    DECODER_CRASH = "decoder_crash"  # the decoding process died (segfault, abort, OOM kill)
    DUPLICATE_FILE = "duplicate_file"  # same bytes as another input file
    TOO_SHORT = "too_short"  # a scene shorter than split.min_clip_s
    TRANSCODE_ERROR = "transcode_error"
    # filter stage: one code per failed threshold (see SCORE_REJECT_REASONS)
    LOW_MOTION = "low_motion"
    HIGH_MOTION = "high_motion"
    FROZEN_FRAMES = "frozen_frames"
    CUT_INSIDE = "cut_inside"
    BLURRY = "blurry"
    TOO_DARK = "too_dark"
    TOO_BRIGHT = "too_bright"
    CLIPPED_EXPOSURE = "clipped_exposure"
    BLACK_FRAMES = "black_frames"
    TEXT_HEAVY = "text_heavy"
    LOW_AESTHETIC = "low_aesthetic"
    NSFW = "nsfw"
    WATERMARK = "watermark"
    NEAR_DUPLICATE = "near_duplicate"
    SCORE_UNAVAILABLE = "score_unavailable"  # a thresholded score came out NaN (e.g. motion of a 1-frame clip)
    # caption stage: "caption_" + the first failing QC flag (captioner.quality.CaptionFlag)
    CAPTION_EMPTY = "caption_empty"
    CAPTION_REFUSAL = "caption_refusal"
    CAPTION_REPETITION = "caption_repetition"
    CAPTION_TOO_SHORT = "caption_too_short"
    CAPTION_TOO_LONG = "caption_too_long"
    CAPTION_TRUNCATED = "caption_truncated"
    CAPTION_NO_FRAMES = "caption_no_frames"  # the clip's frames could not be decoded for captioning
    CAPTION_MODEL_ERROR = "caption_model_error"  # the model raised on this clip (e.g. too few frames for it)
    CAPTION_MISMATCH = "caption_mismatch"  # score_caption_match below caption.min_caption_match
    ENCODE_ERROR = "encode_error"  # frames could not be prepared or encoded


# score name -> (reason when below its min, reason when above its max). The order is the order in which
# thresholds are checked: a clip's `reject_reason` is its first failure (a dark clip is too_dark first, even
# though darkness also reads as blur and as no motion); `filter_reasons` lists all of them.
SCORE_REJECT_REASONS: dict[str, tuple[RejectReason, RejectReason]] = {
    "brightness": (RejectReason.TOO_DARK, RejectReason.TOO_BRIGHT),
    "black": (RejectReason.BLACK_FRAMES, RejectReason.BLACK_FRAMES),
    "clipped": (RejectReason.CLIPPED_EXPOSURE, RejectReason.CLIPPED_EXPOSURE),
    "sharpness": (RejectReason.BLURRY, RejectReason.BLURRY),
    "motion": (RejectReason.LOW_MOTION, RejectReason.HIGH_MOTION),
    "frozen": (RejectReason.FROZEN_FRAMES, RejectReason.FROZEN_FRAMES),
    "cut_inside": (RejectReason.CUT_INSIDE, RejectReason.CUT_INSIDE),
    "text": (RejectReason.TEXT_HEAVY, RejectReason.TEXT_HEAVY),
    "aesthetic": (RejectReason.LOW_AESTHETIC, RejectReason.LOW_AESTHETIC),
    "nsfw": (RejectReason.NSFW, RejectReason.NSFW),
    "watermark": (RejectReason.WATERMARK, RejectReason.WATERMARK),
}
WEIGHTS_FREE_SCORES = ("motion", "frozen", "cut_inside", "sharpness", "brightness", "clipped", "black")
MODEL_SCORES = ("text", "aesthetic", "nsfw", "watermark")


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
        ("rotation", pa.int32()),
        ("video_stream", pa.int32()),  # container index of the video stream every stage reads (the first one)
        (
            "video_streams",
            pa.int32(),
        ),  # how many video streams the file has  # degrees clockwise frames are turned to stand as players show them (0/90/180/270)
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

# Columns the filter stage adds to `clips` (all nullable: scores a config leaves off stay null).
FILTER_FIELDS = [pa.field(f"score_{name}", pa.float64()) for name in WEIGHTS_FREE_SCORES + MODEL_SCORES] + [
    pa.field("camera_motion", pa.string()),
    pa.field("phashes", pa.list_(pa.int64())),  # 64-bit pHash of each sampled frame
    pa.field("phashes_mirrored", pa.list_(pa.int64())),  # the same of each frame mirrored left-right
    pa.field("clip_embedding", pa.list_(pa.float32())),  # mean CLIP image embedding, unit norm
    pa.field("text_ocr", pa.string()),  # on-screen text recognised by PP-OCRv6 (filter.text.recognize)
    pa.field("filter_reasons", pa.list_(pa.string())),  # every failed threshold, not only the first
    pa.field("near_duplicate_of", pa.string()),
    pa.field("filter_detail", pa.string()),
]
FILTERED_CLIPS_SCHEMA = pa.schema(list(CLIPS_SCHEMA) + FILTER_FIELDS)

# Columns the caption stage adds to `clips` (the current caption version; all versions live in `captions`).
CAPTION_FIELDS = [
    pa.field("caption", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("caption_prompt_version", pa.string()),
    pa.field("caption_version", pa.string()),
    pa.field("caption_flags", pa.list_(pa.string())),
    pa.field("score_caption_match", pa.float64()),  # CLIP text-video cosine (needs the filter's CLIP model)
]

# The split stage's result per video (its clips as JSON): what its checkpoint commits and re-running rejects reopens.
SPLIT_RESULT_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("num_frames", pa.int64()),
        ("clips_json", pa.string()),
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

CAPTIONS_TABLE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("caption_version", pa.string()),
        ("caption", pa.string()),
        ("caption_raw", pa.string()),
        ("caption_model", pa.string()),
        ("caption_prompt_version", pa.string()),
        ("caption_flags", pa.list_(pa.string())),
        ("caption_failed", pa.bool_()),
        ("caption_attempts", pa.int32()),
    ]
)

SAMPLES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # = clip_id: the WebDataset __key__
        ("shard", pa.string()),  # shard file name
        ("caption", pa.string()),
        ("latent_shape", pa.list_(pa.int32())),  # (C, T, H, W)
        ("latent_dtype", pa.string()),
        ("vae", pa.string()),
        ("vae_sha256", pa.string()),
        ("has_text_emb", pa.bool_()),
        ("logvar_stored", pa.bool_()),
        ("num_frames", pa.int32()),
        ("frame_stride", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bytes", pa.int64()),  # of the sample's tar members
    ]
)

SHARDS_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("num_samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("bucket", pa.string()),  # latent shape the shard holds, e.g. "32x5x32x56"
        ("writer_node", pa.string()),  # the Ray node id of the process that wrote it (None: written outside Ray)
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES_SCHEMA,
    "shards": SHARDS_SCHEMA,
    "captions": CAPTIONS_TABLE_SCHEMA,
    "videos": VIDEOS_SCHEMA,
    "clips": CLIPS_SCHEMA,
    "filtered_clips": FILTERED_CLIPS_SCHEMA,
    "rejects": REJECTS_SCHEMA,
}


def table_of(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) as a table of `schema`; missing optional columns become null."""
    return pa.table({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)
