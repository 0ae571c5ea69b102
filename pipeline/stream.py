"""`recap run`'s first streaming pipeline: ingest -> split -> filter scoring as one Ray Data dataset.

Each stage keeps its own actor pool, resources and progress line, and starts on a video as soon as the stage before
has finished it. A row carries the results of the stages it went through (`ingest`, `split`); the last stage's
actors write each batch's probes, split results and scores as staged parts of the three stages' checkpoints and
send the driver small records, from which it commits the parts as they arrive (renames, in stage order). The stages
then finish as they do alone (`run_ingest`, `run_split`, `run_filter` find only what a crash left undone), so the
tables are those of a stage-at-a-time run.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RecapConfig
from pipeline.engine import Streamed, StreamGroup, conform, map_stage, pools_fit
from pipeline.errors import StorageError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint, stage_part
from pipeline.schema import CLIPS_SCHEMA, FILTERED_CLIPS_SCHEMA, SPLIT_RESULT_SCHEMA, VIDEOS_SCHEMA, VideoStatus
from pipeline.stages.filter import SCORED_SCHEMA, FilterScoreStage, model_stages
from pipeline.stages.ingest import IngestStage
from pipeline.stages.split import STORAGE_ERROR, SplitStage

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
    pools = {"ingest": config.ingest.resources, "split": config.split.resources, "filter": config.filter.resources}
    for stage_cls, resources in model_stages(config.filter):
        pools[stage_cls.name] = resources
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


# What the stream's last step returns to the driver: one record per video (its ingest status and split counts) and
# one per video's scored clips in the batch (`scored`), each naming the staged parts that hold the rows.
RECORD_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),  # ingest's; null on a scored-clips record
        ("split_status", pa.string()),  # null: not split (rejected by ingest)
        ("split_detail", pa.string()),  # why writing its clips failed (a storage error, not committed)
        ("frames", pa.int64()),
        ("clips", pa.int64()),
        ("too_short", pa.int64()),
        ("scored", pa.int64()),
        ("ingest_part", pa.string()),
        ("split_part", pa.string()),
        ("filter_part", pa.string()),
    ]
)


class StreamParts:
    """The stream's last step, in its last stage's actors: writes a batch's ingest rows, split results and scored
    clips as staged parts of the three stages' checkpoints (`work`: stage -> checkpoint uri) and returns small
    records (RECORD_SCHEMA), all the driver needs to commit them: it renames parts, it never reads their rows."""

    def __init__(self, work: dict[str, str]):
        self.work = work

    def __call__(self, batch: pa.Table) -> pa.Table:
        is_video = pc.is_null(batch.column("clip_id"))
        videos = batch.filter(is_video)
        ingested = videos.column(INGEST).to_pylist()
        results = videos.column(SPLIT).to_pylist()
        ingest_part = stage_part(self.work["ingest"], pa.Table.from_pylist(ingested, VIDEOS_SCHEMA), ("uri",))
        split = [r for r in results if r is not None and r["status"] != STORAGE_ERROR]
        split_part = stage_part(self.work["split"], pa.Table.from_pylist(split, SPLIT_RESULT_SCHEMA), ("uri",))
        records = []
        for video, result in zip(ingested, results, strict=True):
            clips = clips_to_score(result)
            failed = result is not None and result["status"] == STORAGE_ERROR
            records.append(
                {
                    "video_id": video["video_id"],
                    "uri": video["uri"],
                    "status": video["status"],
                    "split_status": result["status"] if result else None,
                    "split_detail": result["reject_detail"] if failed else None,
                    "frames": result["num_frames"] if result else None,
                    "clips": len(clips),
                    "too_short": sum(not c["passed"] for c in clips),
                    "ingest_part": ingest_part,
                    "split_part": split_part if result is not None and not failed else None,
                }
            )
        scored = conform(batch.filter(pc.invert(is_video)), FILTERED_CLIPS_SCHEMA)
        filter_part = stage_part(self.work["filter"], scored, ("uri", "clip_id"))
        if filter_part is not None:
            for group in scored.group_by(["video_id", "uri"]).aggregate([("clip_id", "count")]).to_pylist():
                records.append({**group, "scored": group["clip_id_count"], "filter_part": filter_part})
        return pa.Table.from_pylist(records, RECORD_SCHEMA)


def build_stream(config: RecapConfig, uris: list[str], clips_dir: str | None, work: dict[str, str]) -> Any:
    """The stream's dataset; its last stage's actors stage the results under `work` (stage -> checkpoint uri) and
    output only commit records."""
    import ray.data

    cfg = config.to_dict()
    models = model_stages(config.filter)
    post = (StreamParts, (work,))
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=min(len(uris), 1000))
    ds = map_stage(ds, IngestInStream, config.ingest.resources, (cfg,), columns=("uri",))
    ds = map_stage(ds, SplitInStream, config.split.resources, (cfg, clips_dir), columns=IngestInStream.output_columns)
    ds = map_stage(
        ds,
        FilterInStream,
        config.filter.resources,
        (cfg,),
        columns=SplitInStream.output_columns,
        post=None if models else post,
    )
    for i, (stage_cls, resources) in enumerate(models):
        last = i == len(models) - 1
        ds = map_stage(
            ds,
            ClipRowsOnly,
            resources,
            (stage_cls, cfg),
            columns=FilterInStream.output_columns,
            post=post if last else None,
        )
    return ds


class StreamCommits:
    """The driver's end of the stream: for each batch's records it commits the staged parts, in stage order (a
    crash leaves filter's clips within split's videos within ingest's; the stages finishing alone then redo
    exactly the rest). A rename per part: the rows stay where the workers wrote them.

    Identical files share a video_id: as `mark_duplicates` keeps the first ok one by uri (and the stream delivers
    in uri order), a video's split and scores are committed for its first ok file only, unless an earlier run
    already committed that video. A part that holds another copy's rows too is filtered by the driver (the one
    case it reads a part)."""

    def __init__(self, checkpoints: dict[str, StageCheckpoint], progress: dict[str, StageProgress]):
        self.checkpoints = checkpoints
        self.progress = progress
        probed = checkpoints["ingest"].read(columns=["video_id", "status"])
        self.claimed: set[str] = set(checkpoints["split"].done("video_id")) | checkpoints["filter"].done("video_id")
        if probed is not None:
            ok = probed.filter(pc.equal(probed.column("status"), VideoStatus.OK.value))
            self.claimed |= set(ok.column("video_id").to_pylist())
        self.split_uris: set[str] = set()  # files whose split this run committed: their scored clips are kept

    def commit(self, records: pa.Table) -> None:
        rows = records.to_pylist()
        videos = [r for r in rows if r["status"] is not None]
        for name in dict.fromkeys(v["ingest_part"] for v in videos if v["ingest_part"]):
            self.checkpoints["ingest"].adopt(name)
        self.progress["ingest"].update(len(videos), rejected=sum(v["status"] != VideoStatus.OK.value for v in videos))
        split, storage_error = [], None
        keep: dict[str, dict[str, bool]] = {}  # split part -> uri -> commit its row
        for v in videos:
            if v["split_status"] == STORAGE_ERROR:
                if v["video_id"] not in self.claimed:
                    storage_error = storage_error or v["split_detail"]
                continue
            if v["split_part"] is None:
                continue  # rejected by ingest
            kept = v["video_id"] not in self.claimed  # else the same bytes as a file committed before
            keep.setdefault(v["split_part"], {})[v["uri"]] = kept
            if kept:
                self.claimed.add(v["video_id"])
                self.split_uris.add(v["uri"])
                split.append(v)
        self._adopt("split", keep)
        self.progress["split"].grow(len(split))
        if split:
            self.progress["split"].update(
                len(split),
                frames=sum(v["frames"] or 0 for v in split),
                clips=sum(v["clips"] for v in split),
                too_short=sum(v["too_short"] for v in split),
                rejected=sum(v["split_status"] != VideoStatus.OK.value for v in split),
            )
            self.progress["filter"].grow(sum(v["clips"] for v in split))
        if storage_error is not None:
            raise StorageError.from_message(storage_error or "writing clips failed")
        keep, scored = {}, 0
        for r in rows:
            if r["filter_part"] is not None:
                kept = r["uri"] in self.split_uris  # else a duplicate file's clips
                keep.setdefault(r["filter_part"], {})[r["uri"]] = kept
                scored += r["scored"] if kept else 0
        self._adopt("filter", keep)
        self.progress["filter"].update(scored)

    def _adopt(self, stage: str, parts: dict[str, dict[str, bool]]) -> None:
        checkpoint = self.checkpoints[stage]
        for name, keep in parts.items():
            if all(keep.values()):
                checkpoint.adopt(name)
            elif not any(keep.values()):
                checkpoint.discard(name)
            else:
                checkpoint.adopt(name, keep=("uri", {uri for uri, kept in keep.items() if kept}))


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
        "filter": Streamed(len(checkpoints["filter"].done("clip_id"))),
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
        ds = build_stream(config, todo, clips_dir, {stage: c.uri for stage, c in checkpoints.items()})
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            commits.commit(batch)
    finally:
        ctx.execution_options.preserve_order = ordered
    return before


# ingest -> split -> filter scoring as one pipeline; it continues stages an interrupted run left half done.
FIRST_STAGES = StreamGroup(("ingest", "split", "filter"), stream_first_stages, first_stream_unfit, resumes=True)
