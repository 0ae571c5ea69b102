"""Split stage: detect scenes in each video and turn them into clips by the clip policy.

`plan_clips` is the pure policy (min/max length, trimming, chunking); `split_video` decodes
one video and runs a detector (inside the isolated child); `SplitStage` is the batch
transform; `run_split` runs it on Ray over the ok videos, commits each finished video, and writes
`clips`, the split rejects and the exact frame counts in `videos`.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from typing import Any

import av
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.config import RecapConfig, SplitConfig
from pipeline.engine import (
    Source,
    Stage,
    StagedRows,
    StageResult,
    StageRun,
    conform,
    map_stage,
    rebuild_table,
    rejects_from,
    stage_checkpoint,
    stage_progress,
)
from pipeline.errors import StageInputError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint, stage_part
from pipeline.scenes.detectors import Scene, build_detector
from pipeline.schema import (
    CLIPS_SCHEMA,
    REJECTS_SCHEMA,
    SPLIT_RESULT_SCHEMA,
    VIDEOS_SCHEMA,
    RejectReason,
    VideoStatus,
    make_clip_id,
)
from pipeline.stages.common import IsolatedStage
from pipeline.video.decode import VideoRejected, cut_off_note, iter_analysis_frames, open_video, plain_error

STORAGE_ERROR = "storage_error"  # a result status the driver turns into a stopped run, never a reject


def _chunk(start: int, end: int, max_frames: int | None, min_frames: int = 1) -> list[tuple[int, int]]:
    """Cut [start, end) into the fewest equal chunks no longer than `max_frames`, none shorter than `min_frames`
    (which wins when the two disagree)."""
    length = end - start
    if max_frames is None or length <= max_frames:
        return [(start, end)]
    parts = max(1, min(math.ceil(length / max_frames), length // max(1, min_frames)))
    bounds = [start + round(i * length / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def plan_clips(
    video_id: str,
    scenes: list[Scene],
    frame_times: list[float] | array,
    end_time_s: float,
    fps: float,
    cfg: SplitConfig,
    num_frames: int,
) -> list[dict[str, Any]]:
    """Clips (rows of the `clips` table, without source fields) from detected scenes.

    Trimming removes `trim_frames` on each side of a detected cut (not at the video's ends);
    scenes shorter than `min_clip_s` or `min_clip_frames` after trimming stay as rows rejected `too_short`;
    longer than `max_clip_s` are cut into equal chunks that share the scene's index. No clip ends past the last
    frame's time plus one frame (`end_time_s`).
    """

    def time_at(frame: int) -> float:
        return float(frame_times[frame]) if frame < num_frames else end_time_s

    max_frames = None if cfg.max_clip_s is None else max(1, int(math.floor(cfg.max_clip_s * fps + 1e-6)))
    clips: list[dict[str, Any]] = []
    for scene_index, (scene_start, scene_end) in enumerate(scenes):
        start = scene_start + (cfg.trim_frames if scene_start > 0 else 0)
        end = scene_end - (cfg.trim_frames if scene_end < num_frames else 0)
        if end <= start:  # trimmed away entirely: keep the scene visible as too_short
            start, end = scene_start, scene_end
            too_short = True
        else:
            too_short = (time_at(end) - time_at(start)) < cfg.min_clip_s - 1e-9 or end - start < cfg.min_clip_frames
        pieces = [(start, end)] if too_short else _chunk(start, end, max_frames, cfg.min_clip_frames)
        for piece_start, piece_end in pieces:
            start_s, end_s = time_at(piece_start), time_at(piece_end)
            clips.append(
                {
                    "clip_id": make_clip_id(video_id, piece_start, piece_end),
                    "video_id": video_id,
                    "scene_index": scene_index,
                    "scene_start_frame": scene_start,
                    "scene_end_frame": scene_end,
                    "start_frame": piece_start,
                    "end_frame": piece_end,
                    "start_s": start_s,
                    "end_s": end_s,
                    "duration_s": end_s - start_s,
                    "passed": not too_short,
                    "reject_reason": RejectReason.TOO_SHORT.value if too_short else None,
                }
            )
    return clips


def detect_scenes(uri: str, cfg: SplitConfig) -> dict[str, Any]:
    """Decode a video once and run the configured detector. Streams: memory is flat in length."""
    with open_video(uri) as container:
        if not container.streams.video:
            raise VideoRejected(RejectReason.NO_VIDEO_STREAM, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 25.0
        detector = build_detector(cfg, fps)
        times = array("d")
        width = height = None
        count = 0
        stopped = None  # why decoding ended early, when the decodable part is kept
        turns = 0
        damaged: list[list[int | None]] = []  # [start, end) frame spans hit by decoder errors
        try:
            for frame in iter_analysis_frames(container, cfg.analysis_width, cfg.decode_threads, detector.exact_size):
                detector.feed(frame.index, frame.bgr)
                times.append(frame.time_s)
                count += 1
                turns = frame.turns
                # Damage runs from a frame the decoder concealed errors in to the next clean keyframe: the frames
                # between are predicted from damaged pictures and look as broken, unflagged.
                if frame.corrupt:
                    if not damaged or damaged[-1][1] is not None:
                        damaged.append([frame.index, None])
                elif frame.key and damaged and damaged[-1][1] is None:
                    damaged[-1][1] = frame.index
            width, height = stream.codec_context.width, stream.codec_context.height
        except (av.error.FFmpegError, OSError) as exc:
            cut = cut_off_note(uri, container, stream)
            failure = f"decoding stopped after {count} frames: {plain_error(exc)}"
            # A cut-off file keeps what decoded before the cut; damage mid-file rejects the video (frames
            # near garbage are concealed, not whole).
            if not (cut and cfg.keep_decodable and count >= cfg.min_clip_frames):
                reason = RejectReason.TRUNCATED if cut else RejectReason.DECODE_ERROR
                raise VideoRejected(reason, f"{cut}; {failure}" if cut else failure) from None
            stopped = f"truncated: {cut}; {failure}; clips cover the {count} frames before"
            width, height = stream.codec_context.width, stream.codec_context.height
        if count == 0:
            raise VideoRejected(RejectReason.TOO_FEW_FRAMES, "no frame decodes")
        scenes = detector.finish(count)
    if turns % 2:  # as displayed
        width, height = height, width
    frame_step = (times[-1] - times[0]) / (count - 1) if count > 1 else 1.0 / fps
    end_time = times[-1] + (frame_step if frame_step > 0 else 1.0 / fps)
    return {
        "fps": fps,
        "num_frames": count,
        "width": width,
        "height": height,
        "scenes": scenes,
        "times": times,
        "end_time_s": end_time,
        "detector": detector.name,
        "stopped": stopped,
        "damaged": [(start, count if end is None else end) for start, end in damaged],
    }


def split_video(
    uri: str, video_id: str, cfg_dict: dict[str, Any], clips_dir: str | None, expected_frames: int | None = None
) -> dict[str, Any]:
    """One video to clip rows; runs in the isolated child. Bad videos raise VideoRejected.

    `expected_frames` is the container's frame count when it states one: a decode that ends
    well short of it means the file is truncated, and its clips would silently miss footage.
    """
    cfg = SplitConfig.model_validate(cfg_dict)
    found = detect_scenes(uri, cfg)
    note = found["stopped"]
    if expected_frames and note is None:
        missing = expected_frames - found["num_frames"]
        if missing > max(2, cfg.max_missing_frames_frac * expected_frames):
            detail = f"decoded {found['num_frames']} of the {expected_frames} frames the container lists"
            if not (cfg.keep_decodable and found["num_frames"] >= cfg.min_clip_frames):
                raise VideoRejected(RejectReason.TRUNCATED, detail)
            note = f"truncated: {detail}; clips cover the decodable part"
    damaged = found["damaged"]
    damaged_frames = sum(end - start for start, end in damaged)
    if damaged and damaged_frames > cfg.max_damaged_frac * found["num_frames"]:
        raise VideoRejected(
            RejectReason.DECODE_DAMAGED,
            f"{damaged_frames} of {found['num_frames']} frames are damaged (the decoder concealed errors in "
            f"{len(damaged)} span(s)); more than split.max_damaged_frac={cfg.max_damaged_frac}",
        )
    clips = plan_clips(
        video_id, found["scenes"], found["times"], found["end_time_s"], found["fps"], cfg, found["num_frames"]
    )
    for clip in clips:  # a clip touching a damaged span never passes
        if clip["passed"] and any(s < clip["end_frame"] and clip["start_frame"] < e for s, e in damaged):
            clip.update(passed=False, reject_reason=RejectReason.DECODE_DAMAGED.value)
    if damaged:
        spans = ", ".join(f"{s}-{e}" for s, e in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        note = "; ".join(x for x in (note, f"damaged frames (decoder errors concealed): {spans}") if x)
    for clip in clips:
        clip.update(fps=found["fps"], width=found["width"], height=found["height"], detector=found["detector"])
    if cfg.transcode.enabled and clips_dir is not None:
        from pipeline.video.transcode import transcode_clips

        wanted = [c for c in clips if c["passed"]]
        written = transcode_clips(uri, wanted, clips_dir, cfg.transcode)
        for clip in clips:
            clip["clip_uri"] = written.get(clip["clip_id"])
    return {"num_frames": found["num_frames"], "clips": clips, "note": note}


class SplitStage(IsolatedStage):
    """Batch transform over `videos` rows (video_id, uri) -> one result row per video."""

    name = "split"
    input_columns = ("video_id", "uri")
    output_schema = SPLIT_RESULT_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any], clips_dir: str | None = None):
        super().__init__(config)
        self.clips_dir = clips_dir
        self._split_cfg = self.config.split.model_dump(mode="json")

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        video_id, uri = row["video_id"], row["uri"]
        out: dict[str, Any] = {
            "video_id": video_id,
            "uri": uri,
            "status": "ok",
            "num_frames": None,
            "clips_json": "[]",
        }
        expected = row.get("num_frames") if row.get("num_frames_exact") else None
        outcome = self.run_isolated(
            "pipeline.stages.split:split_video", uri, video_id, self._split_cfg, self.clips_dir, expected
        )
        if outcome.status == "error" and outcome.error_type == "StorageError":
            # The output failed, not the video: the driver stops the run (exit 3) and commits nothing for it.
            out.update(status=STORAGE_ERROR, reject_detail=outcome.message)
            return out
        rejected = self.reject_of(outcome)
        if rejected is None:
            clips = outcome.result["clips"]
            for clip in clips:
                clip["uri"] = uri
            out["num_frames"] = outcome.result["num_frames"]
            out["clips_json"] = json.dumps(clips)
            out["reject_detail"] = outcome.result.get("note")  # an ok video's note: kept the decodable part
        else:
            out.update(status="rejected", reject_reason=rejected[0], reject_detail=rejected[1])
        return out


def raise_storage_errors(results: pa.Table) -> pa.Table:
    """The rows of videos that were split; raises StorageError when writing a video's clips failed."""
    from pipeline.errors import StorageError

    failed = [r for r in results.select(["status", "reject_detail"]).to_pylist() if r["status"] == STORAGE_ERROR]
    if failed:
        raise StorageError.from_message(failed[0]["reject_detail"] or "writing clips failed")
    return results


class SplitParts:
    """`run_split`'s last step, in the split actors: writes a batch's results (those whose clips could be written)
    as a staged part of the split checkpoint (`work_uri`) and returns them without their clips, with each video's
    count of clips and of clips too short, and the part's name (`_part`): the driver adopts the part, never reads
    the clips."""

    def __init__(self, work_uri: str):
        self.work = work_uri

    def __call__(self, results: pa.Table) -> pa.Table:
        ok = results.filter(pc.not_equal(results.column("status"), STORAGE_ERROR))
        name = stage_part(self.work, ok, ("uri",))
        clips = [json.loads(text or "[]") for text in results.column("clips_json").to_pylist()]
        return (
            results.drop_columns(["clips_json"])
            .append_column("clips", pa.array([len(c) for c in clips], pa.int64()))
            .append_column("too_short", pa.array([sum(not r["passed"] for r in c) for c in clips], pa.int64()))
            .append_column("_part", pa.array([name] * results.num_rows, pa.string()))
        )


def clip_rows_from_results(results: pa.Table) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for text in results.column("clips_json").to_pylist():
        rows.extend(json.loads(text or "[]"))
    return rows


class SplitClipRows:
    """A table rebuild's transform (`engine.rebuild_table`): committed per-video split results -> the videos'
    clip rows, and a reject row for each clip split already rejected (too short, damaged frames)."""

    def __init__(self, min_clip_s: float, min_clip_frames: int):
        self.short = f"scene shorter than split.min_clip_s={min_clip_s} or split.min_clip_frames={min_clip_frames}"

    def __call__(self, results: pa.Table) -> tuple[pa.Table, pa.Table]:
        ok = results.filter(pc.equal(results.column("status"), VideoStatus.OK.value))
        rows = pa.Table.from_pylist(clip_rows_from_results(ok), schema=CLIPS_SCHEMA)
        bad = rows.filter(pc.invert(rows.column("passed")))
        damaged = "frames in it were damaged: the decoder concealed errors (see videos.reject_detail)"
        rejects = pa.table(
            {
                "stage": pa.array(["split"] * bad.num_rows, pa.string()),
                "item_id": bad.column("clip_id"),
                "uri": bad.column("uri"),
                "reason": bad.column("reject_reason"),
                "detail": pa.array(
                    [
                        damaged if r == RejectReason.DECODE_DAMAGED.value else self.short
                        for r in bad.column("reject_reason").to_pylist()
                    ],
                    pa.string(),
                ),
            },
            schema=REJECTS_SCHEMA,
        )
        return rows, rejects


# `reopen_results`'s rows: a kept video's split result (no clip) or one of its clips as split made it (JSON).
_REOPEN_SCHEMA = pa.schema(
    [*(SPLIT_RESULT_SCHEMA.field(c) for c in SPLIT_RESULT_SCHEMA.names if c != "clips_json")]
    + [pa.field("start_frame", pa.int64()), pa.field("clip_json", pa.string())]
)
SPLIT_OWN_REASONS = (RejectReason.TOO_SHORT.value, RejectReason.DECODE_DAMAGED.value)  # clip verdicts of split


class ClipsAsSplitMade:
    """`reopen_results`'s read (a `Source` prepare, on the workers): `clips` rows, less the videos split does again,
    as split made them (the later stages' verdicts undone), each as JSON in the rows of `_REOPEN_SCHEMA`."""

    def __init__(self, again: list[str]):
        self.again = again

    def __call__(self, clips: pa.Table) -> pa.Table:
        clips = clips.filter(pc.invert(pc.is_in(clips.column("video_id"), pa.array(self.again, pa.string()))))
        texts = []
        for row in clips.select(CLIPS_SCHEMA.names).to_pylist():
            own = row["reject_reason"] in SPLIT_OWN_REASONS
            row.update(reject_reason=row["reject_reason"] if own else None, passed=not own)
            texts.append(json.dumps(row))
        n = clips.num_rows
        nulls = {c: pa.nulls(n, _REOPEN_SCHEMA.field(c).type) for c in ("status", "reject_reason", "reject_detail")}
        columns = {
            "video_id": clips.column("video_id"),
            "uri": clips.column("uri"),
            **nulls,
            "num_frames": pa.nulls(n, pa.int64()),
            "start_frame": clips.column("start_frame"),
            "clip_json": pa.array(texts, pa.string()),
        }
        return pa.table(columns, schema=_REOPEN_SCHEMA)


def _split_result_of(group: pa.Table) -> pa.Table:
    """A `groupby("video_id")` group (its result row and its clip rows) -> the video's split result, its clips in
    source order; nothing for clips without a result row (a video split does again)."""
    head = group.filter(pc.is_null(group.column("clip_json")))
    if head.num_rows == 0:
        return SPLIT_RESULT_SCHEMA.empty_table()
    row = head.slice(0, 1).drop_columns(["start_frame", "clip_json"]).to_pylist()[0]
    clips = group.filter(pc.is_valid(group.column("clip_json")))
    clips = clips.take(pc.sort_indices(clips, sort_keys=[("start_frame", "ascending")]))
    ok = row["status"] == VideoStatus.OK.value
    row["clips_json"] = "[" + ", ".join(clips.column("clip_json").to_pylist()) + "]" if ok else None
    return pa.Table.from_pylist([row], schema=SPLIT_RESULT_SCHEMA)


def reopen_results(output: str, kept: pa.Table, again: list[str], checkpoint: StageCheckpoint) -> None:
    """`--retry-rejected`: commit to split's `checkpoint` the results of the videos it keeps (`kept`: their
    per-video columns, from the small `videos` table) with their clips rebuilt from `clips` by Ray workers (a
    groupby on video_id joins each video's clip rows to its result; the parts are staged by workers and adopted
    here); `again`: the video ids split does again, whose clips are left out. The driver never reads `clips`."""
    import ray.data

    if kept.num_rows == 0:
        return
    heads = kept.select([c for c in SPLIT_RESULT_SCHEMA.names if c != "clips_json"])
    heads = heads.append_column("start_frame", pa.nulls(kept.num_rows, pa.int64()))
    heads = heads.append_column("clip_json", pa.nulls(kept.num_rows, pa.string()))
    parts = [ray.data.from_arrow(heads.cast(_REOPEN_SCHEMA))]
    if manifest.table_exists(output, "clips"):
        source = Source.table(output, "clips", columns=CLIPS_SCHEMA.names, prepare=ClipsAsSplitMade(sorted(again)))
        parts.append(source.dataset())
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.groupby("video_id").map_groups(_split_result_of, batch_format="pyarrow")
    staged = StagedRows(checkpoint.uri, SPLIT_RESULT_SCHEMA, ("video_id",))
    ds = ds.map_batches(staged, batch_format="pyarrow", batch_size=1024)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for name in batch.column("part").drop_null().to_pylist():
            checkpoint.adopt(name)


def run_split(
    config: RecapConfig,
    output: str,
    checkpoint: StageCheckpoint | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    """Detect scenes in every ok video on Ray; write `clips`, split rejects, and update `videos`. `progress`: a
    streaming run's line for this stage (what it committed is in `checkpoint`: only the rest is split here)."""
    import ray.data

    start = time.monotonic()
    if not manifest.table_exists(output, "videos"):
        raise StageInputError(f"no videos table under {output}/manifest: run `recap ingest` first")
    videos = manifest.read_table(output, "videos")
    todo = videos.filter(pc.equal(videos.column("status"), VideoStatus.OK.value))
    todo = todo.select(["video_id", "uri", "num_frames", "num_frames_exact"])
    # Longest first, so a long video does not end up as the run's tail.
    todo = todo.take(pc.sort_indices(todo, sort_keys=[("num_frames", "descending"), ("video_id", "ascending")]))
    clips_dir = f"{output.rstrip('/')}/media/clips" if config.split.transcode.enabled else None
    checkpoint = stage_checkpoint(output, "split", checkpoint)
    done = checkpoint.done("video_id")
    resumed = len(done)
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("video_id"), pa.array(sorted(done), pa.string()))))
    progress = stage_progress(config, "split", todo.num_rows, "videos", rate="frames", progress=progress)
    if todo.num_rows:
        ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
        post = (SplitParts, (checkpoint.uri,))
        ds = map_stage(ds, SplitStage, config.split.resources, (config.to_dict(), clips_dir), post=post)
        # The actors write one row per finished video (its clips as JSON); the driver commits the parts' names.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for name in pc.unique(batch.column("_part").drop_null()).to_pylist():
                checkpoint.adopt(name)
            batch = raise_storage_errors(batch)
            progress.update(
                batch.num_rows,
                frames=pc.sum(batch.column("num_frames")).as_py() or 0,
                clips=pc.sum(batch.column("clips")).as_py() or 0,
                too_short=pc.sum(batch.column("too_short")).as_py() or 0,
                rejected=sum(s != "ok" for s in batch.column("status").to_pylist()),
            )
    progress.close()
    # Every video's result, this run's and those an interrupted run committed: Ray workers turn them into
    # the clips table and the clip rejects; the driver reads only the per-video columns.
    results = Source(checkpoint.parts(), checkpoint.fs, SPLIT_RESULT_SCHEMA)
    results_columns = [c for c in SPLIT_RESULT_SCHEMA.names if c != "clips_json"]
    committed = checkpoint.read(columns=results_columns)
    split_results = conform(
        committed if committed is not None else pa.table({}),
        pa.schema([SPLIT_RESULT_SCHEMA.field(c) for c in results_columns]),
    )
    video_rejects = rejects_from(split_results, "split", "video_id")
    rebuilt = rebuild_table(
        output,
        "clips",
        "split",
        [results],
        CLIPS_SCHEMA,
        SplitClipRows,
        (config.split.min_clip_s, config.split.min_clip_frames),
        more_rejects=video_rejects,
    )
    _update_videos_after_split(output, videos, split_results)
    return StageResult(
        "split",
        time.monotonic() - start,
        counts={
            "videos": split_results.num_rows,
            "frames": sum(n or 0 for n in split_results.column("num_frames").to_pylist()),
            "clips": rebuilt.rows,  # every clip row, as the funnel counts them
            "too_short": rebuilt.rejects_by_reason.get(RejectReason.TOO_SHORT.value, 0),
            "damaged": rebuilt.rejects_by_reason.get(RejectReason.DECODE_DAMAGED.value, 0),
            "rejected_videos": video_rejects.num_rows,
        },
        rejects_by_reason=rebuilt.rejects_by_reason,
        resumed=resumed,
    )


def _update_videos_after_split(output: str, videos: pa.Table, split_results: pa.Table) -> None:
    """Split decodes every frame: record exact frame counts and videos whose decode failed."""
    by_id = {r["video_id"]: r for r in split_results.to_pylist()}
    rows = videos.to_pylist()
    for row in rows:
        res = by_id.get(row["video_id"])
        if res is None or row["status"] != VideoStatus.OK.value:
            continue
        if res["status"] == VideoStatus.OK.value:
            row["num_frames"] = res["num_frames"]
            row["num_frames_exact"] = True
            if res.get("reject_detail"):  # kept, with a note (e.g. only the part before a cut-off decoded)
                row["reject_detail"] = res["reject_detail"]
        else:
            row.update(
                status=VideoStatus.REJECTED.value,
                reject_reason=res["reject_reason"],
                reject_detail=res["reject_detail"],
            )
    manifest.write_table(output, "videos", pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA), prefix="videos")


def _run(run: StageRun) -> StageResult:
    return run_split(run.config, run.output, checkpoint=run.checkpoint, progress=run.progress)


STAGE = Stage(
    "split",
    _run,
    unit="videos",
    rate="frames",
    needs=("videos", "no videos table under {output}/manifest: run `recap ingest` first"),
    reopen=reopen_results,
)
