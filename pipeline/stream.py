"""`recap run`'s first streaming pipeline: ingest -> split -> filter scoring as one Ray Data dataset.

Each stage keeps its own actor pool, resources and progress line, and starts on a video as soon as the stage before
has finished it. A row carries the results of the stages it went through (`ingest`, `split`), so the driver, at the
end of the stream, commits each video's probe, split and scores into the three stages' checkpoints as they arrive.
The stages then finish as they do alone (`run_ingest`, `run_split`, `run_filter` find only what a crash left undone),
so the tables are those of a stage-at-a-time run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RecapConfig
from pipeline.engine import Streamed, StreamGroup, conform, map_stage, pools_fit
from pipeline.errors import StorageError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint
from pipeline.schema import CLIPS_SCHEMA, FILTERED_CLIPS_SCHEMA, SPLIT_RESULT_SCHEMA, VIDEOS_SCHEMA, VideoStatus
from pipeline.stages.filter import (
    SCORED_SCHEMA,
    ClipModelStage,
    FilterScoreStage,
    NsfwDetectStage,
    TextDetectStage,
)
from pipeline.stages.ingest import IngestStage
from pipeline.stages.split import STORAGE_ERROR, SplitStage, clip_rows_from_results

INGEST, SPLIT = "ingest", "split"  # columns carrying a video's ingest row and split result down the stream
# The stream's last rows: one per video (clip_id null) with the results of ingest and split, one per scored clip.
STREAM_SCHEMA = pa.schema(
    list(SCORED_SCHEMA)
    + [pa.field(INGEST, pa.struct(list(VIDEOS_SCHEMA))), pa.field(SPLIT, pa.struct(list(SPLIT_RESULT_SCHEMA)))]
)
FILTER_INPUT_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("uri", pa.string()), ("fps", pa.float64()), ("clips_json", pa.string())]
)


def first_stream_unfit(config: RecapConfig) -> str | None:
    """Why ingest -> split -> filter cannot stream on this cluster (its pools do not fit at once), or None."""
    f = config.filter
    pools = {"ingest": config.ingest.resources, "split": config.split.resources, "filter": f.resources}
    for name, enabled, resources in (
        ("text", f.text.enabled, f.text.resources),
        ("nsfw", f.nsfw.enabled, f.nsfw.resources),
        ("clip", bool(f.clip.model), f.clip.resources),
    ):
        if enabled:
            pools[name] = resources
    return pools_fit(pools)


class IngestInStream:
    """IngestStage whose rows carry their `videos` row on (column `ingest`)."""

    name = "ingest"
    input_columns = ("uri",)
    output_columns = ("video_id", "uri", INGEST)

    def __init__(self, config: RecapConfig | dict[str, Any]):
        self.stage = IngestStage(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        videos = self.stage(batch)
        packed = pa.array(videos.to_pylist(), pa.struct(list(VIDEOS_SCHEMA)))
        return pa.table({"video_id": videos.column("video_id"), "uri": videos.column("uri"), INGEST: packed})


class SplitInStream:
    """SplitStage on the rows ingest passed (status ok); its result rides on (column `split`, null when not split).

    A duplicate file is split too: which copy ingest keeps is decided over all files, at the driver."""

    name = "split"
    input_columns = ("video_id", "uri", INGEST)
    output_columns = ("video_id", "uri", INGEST, SPLIT)

    def __init__(self, config: RecapConfig | dict[str, Any], clips_dir: str | None):
        self.stage = SplitStage(config, clips_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        videos = batch.column(INGEST).to_pylist()
        ok = [i for i, v in enumerate(videos) if v["status"] == VideoStatus.OK.value]
        results: list[dict[str, Any] | None] = [None] * batch.num_rows
        if ok:
            todo = pa.Table.from_pylist([videos[i] for i in ok], schema=VIDEOS_SCHEMA)
            todo = todo.select(["video_id", "uri", "num_frames", "num_frames_exact"])
            for i, result in zip(ok, self.stage(todo).to_pylist(), strict=True):
                results[i] = result
        return batch.select(["video_id", "uri", INGEST]).append_column(
            SPLIT, pa.array(results, pa.struct(list(SPLIT_RESULT_SCHEMA)))
        )


def clips_to_score(split_result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A split video's clips as the `clips` table holds them, which is what the filter reads when run alone."""
    if not split_result or split_result["status"] != VideoStatus.OK.value:
        return []
    return [{name: clip.get(name) for name in CLIPS_SCHEMA.names} for clip in json.loads(split_result["clips_json"])]


class FilterInStream:
    """FilterScoreStage on each split video's clips: one scored row per clip, plus one row per video (clip_id null)
    that carries its ingest and split results on to the driver."""

    name = "filter"
    input_columns = ("video_id", "uri", INGEST, SPLIT)
    output_columns = tuple(STREAM_SCHEMA.names)

    def __init__(self, config: RecapConfig | dict[str, Any]):
        self.stage = FilterScoreStage(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = []
        for row in batch.select(["video_id", "uri", SPLIT]).to_pylist():
            clips = clips_to_score(row[SPLIT])
            if clips:
                todo.append({**row, "fps": clips[0]["fps"], "clips_json": json.dumps(clips)})
        parts = [conform(batch.select(["video_id", "uri", INGEST, SPLIT]), STREAM_SCHEMA)]
        if todo:
            parts.append(conform(self.stage(pa.Table.from_pylist(todo, schema=FILTER_INPUT_SCHEMA)), STREAM_SCHEMA))
        return pa.concat_tables(parts)


class ClipRowsOnly:
    """A filter model stage (text, NSFW, CLIP) in the stream: it scores the clip rows; the video rows pass."""

    input_columns = ("clip_id", "frames_jpeg")
    output_columns = tuple(STREAM_SCHEMA.names)

    def __init__(self, stage_cls: type, config: RecapConfig | dict[str, Any]):
        self.name = stage_cls.name
        self.stage = stage_cls(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        is_clip = pc.is_valid(batch.column("clip_id"))
        clips = batch.filter(is_clip).drop_columns([INGEST, SPLIT])
        parts = [conform(batch.filter(pc.invert(is_clip)), STREAM_SCHEMA)]
        if clips.num_rows:
            parts.append(conform(self.stage(clips), STREAM_SCHEMA))
        return pa.concat_tables(parts)


def build_stream(config: RecapConfig, uris: list[str], clips_dir: str | None) -> Any:
    import ray.data

    cfg = config.to_dict()
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=min(len(uris), 1000))
    ds = map_stage(ds, IngestInStream, config.ingest.resources, (cfg,), columns=("uri",))
    ds = map_stage(ds, SplitInStream, config.split.resources, (cfg, clips_dir), columns=IngestInStream.output_columns)
    ds = map_stage(ds, FilterInStream, config.filter.resources, (cfg,), columns=SplitInStream.output_columns)
    f = config.filter
    for stage_cls, enabled, resources in (
        (TextDetectStage, f.text.enabled, f.text.resources),
        (NsfwDetectStage, f.nsfw.enabled, f.nsfw.resources),
        (ClipModelStage, bool(f.clip.model), f.clip.resources),
    ):
        if enabled:
            ds = map_stage(ds, ClipRowsOnly, resources, (stage_cls, cfg), columns=FilterInStream.output_columns)
    return ds


class StreamCommits:
    """The driver's end of the stream: each video's ingest row, split result and (once all its clips arrived) scores
    go into the three stages' checkpoints, in that order, so a crash leaves filter's videos within split's within
    ingest's; the stages finishing alone then redo exactly the rest.

    Identical files share a video_id: as `mark_duplicates` keeps the first ok one by uri (and the stream delivers
    in uri order), a video's split and scores are committed for its first ok file only, unless an earlier run
    already committed that video."""

    def __init__(self, checkpoints: dict[str, StageCheckpoint], progress: dict[str, StageProgress]):
        self.checkpoints = checkpoints
        self.progress = progress
        probed = checkpoints["ingest"].read(columns=["video_id", "status"])
        self.claimed: set[str] = set(checkpoints["split"].done("video_id")) | checkpoints["filter"].done("video_id")
        if probed is not None:
            ok = probed.filter(pc.equal(probed.column("status"), VideoStatus.OK.value))
            self.claimed |= set(ok.column("video_id").to_pylist())
        self.expected: dict[str, int] = {}  # uri of a committed split -> clips still to arrive from the filter
        self.arrived: dict[str, list[pa.Table]] = {}
        self.ready: list[pa.Table] = []
        self.last_commit = time.monotonic()

    def commit(self, batch: pa.Table) -> None:
        is_video = pc.is_null(batch.column("clip_id"))
        videos = batch.filter(is_video).select([INGEST, SPLIT]).to_pylist()
        ingested = [v[INGEST] for v in videos]
        self.checkpoints["ingest"].commit(pa.Table.from_pylist(ingested, schema=VIDEOS_SCHEMA))
        self.progress["ingest"].update(len(ingested), rejected=sum(v["status"] != "ok" for v in ingested))
        split, storage_error = [], None
        for v in videos:
            video, result = v[INGEST], v[SPLIT]
            if result is None or video["video_id"] in self.claimed:
                continue  # rejected by ingest, or the same bytes as a file committed before
            if result["status"] == STORAGE_ERROR:
                storage_error = storage_error or result["reject_detail"]
                continue
            self.claimed.add(video["video_id"])
            split.append(result)
            clips = len(clips_to_score(result))
            if clips:
                self.expected[result["uri"]] = clips
                self.arrived[result["uri"]] = []
        self.progress["split"].grow(len(split))
        if split:
            results = pa.Table.from_pylist(split, schema=SPLIT_RESULT_SCHEMA)
            self.checkpoints["split"].commit(results)
            clip_rows = clip_rows_from_results(results)
            self.progress["split"].update(
                len(split),
                frames=sum(r["num_frames"] or 0 for r in split),
                clips=len(clip_rows),
                too_short=sum(not c["passed"] for c in clip_rows),
                rejected=sum(r["status"] != "ok" for r in split),
            )
            self.progress["filter"].grow(len(clip_rows))
        if storage_error is not None:
            raise StorageError.from_message(storage_error or "writing clips failed")
        self._scored(batch.filter(pc.invert(is_video)).drop_columns([INGEST, SPLIT, "frames_jpeg"]))

    def _scored(self, clips: pa.Table) -> None:
        uris = clips.column("uri")
        for uri in pc.unique(uris).to_pylist():
            if uri not in self.expected:
                continue  # a duplicate file's clips
            rows = clips.filter(pc.equal(uris, uri))
            self.arrived[uri].append(rows)
            self.progress["filter"].update(rows.num_rows)
            if sum(t.num_rows for t in self.arrived[uri]) >= self.expected[uri]:
                self.ready.extend(self.arrived.pop(uri))
                del self.expected[uri]
        if self.ready and (sum(t.num_rows for t in self.ready) >= 1000 or time.monotonic() - self.last_commit > 30):
            self.flush()

    def flush(self) -> None:
        if self.ready:
            self.checkpoints["filter"].commit(conform(pa.concat_tables(self.ready), FILTERED_CLIPS_SCHEMA))
        self.ready, self.last_commit = [], time.monotonic()


def stream_first_stages(
    config: RecapConfig,
    output: str,
    uris: list[str],
    checkpoints: dict[str, StageCheckpoint],
    progress: dict[str, StageProgress],
) -> dict[str, Streamed]:
    """Ingest, split and score the files none of the checkpoints has, as one stream; returns how many items each
    stage had committed before (an interrupted run's: `resumed`)."""
    import ray.data

    before = {
        "ingest": Streamed(len(checkpoints["ingest"].done("uri"))),
        "split": Streamed(len(checkpoints["split"].done("video_id"))),
        "filter": Streamed(len(checkpoints["filter"].done("video_id"))),
    }
    done = checkpoints["ingest"].done("uri")
    todo = sorted(u for u in uris if u not in done)
    progress["ingest"].grow(len(todo))
    if not todo:
        return before
    commits = StreamCommits(checkpoints, progress)
    clips_dir = f"{output.rstrip('/')}/media/clips" if config.split.transcode.enabled else None
    ctx = ray.data.DataContext.get_current()
    ordered = ctx.execution_options.preserve_order
    # In uri order, so the first ok copy of a file to arrive is the one ingest keeps.
    ctx.execution_options.preserve_order = True
    try:
        ds = build_stream(config, todo, clips_dir)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            commits.commit(batch)
        commits.flush()
    finally:
        ctx.execution_options.preserve_order = ordered
    return before


# ingest -> split -> filter scoring as one pipeline; it continues stages an interrupted run left half done.
FIRST_STAGES = StreamGroup(("ingest", "split", "filter"), stream_first_stages, first_stream_unfit, resumes=True)
