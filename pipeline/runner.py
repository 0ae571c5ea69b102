"""The only module that imports Ray: stages become Ray Data `map_batches` over actor pools.

Each stage declares its input columns and output schema; the runner checks them when it
builds the pipeline, streams results back to the driver, writes the manifest tables as
results arrive, and prints progress. Stage logic itself lives in `pipeline.stages`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.config import RecapConfig, Resources
from pipeline.errors import StageInputError
from pipeline.io.sources import discover_inputs
from pipeline.progress import StageProgress
from pipeline.schema import REJECTS_SCHEMA, VIDEOS_SCHEMA, VideoStatus
from pipeline.stages.ingest import IngestStage, mark_duplicates
from pipeline.stages.split import SPLIT_RESULT_SCHEMA, SplitStage, clip_rows_from_results

log = logging.getLogger("recap")

STAGE_ORDER = ("ingest", "split", "filter", "caption", "encode")
AVAILABLE_STAGES = ("ingest", "split")


@dataclass
class StageResult:
    stage: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    def summary_line(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_reason.items())) or "none"
        return f"{self.stage:<7} {self.seconds:7.1f}s  {counts}; rejects: {rejects}"


class RaySession:
    """Connects to a cluster (`address` or RAY_ADDRESS) or starts a local Ray; reuses a live one."""

    def __init__(self, config: RecapConfig, address: str | None = None):
        self.config = config
        self.address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
        self._started = False

    def __enter__(self) -> RaySession:
        import ray
        import ray.data

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if self.address:
                kwargs["address"] = self.address
            elif self.config.ray.num_cpus:
                kwargs["num_cpus"] = self.config.ray.num_cpus
            ray.init(**kwargs)
            self._started = True
        ctx = ray.data.DataContext.get_current()
        # recap prints its own per-stage progress; Ray's bars (or INFO blocks off a terminal) are noise.
        ctx.enable_progress_bars = False
        for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()


def _map_stage(ds: Any, stage_cls: type, resources: Resources, constructor_args: tuple) -> Any:
    import ray.data

    missing = [c for c in stage_cls.input_columns if c not in ds.schema().names]
    if missing:
        raise StageInputError(f"stage {stage_cls.name} needs columns {missing}; the input has {ds.schema().names}")
    return ds.map_batches(
        stage_cls,
        fn_constructor_args=constructor_args,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
    )


def _rejects_from(table: pa.Table, stage: str, id_column: str) -> pa.Table:
    mask = pc.equal(table.column("status"), VideoStatus.REJECTED.value)
    bad = table.filter(mask)
    return pa.table(
        {
            "stage": pa.array([stage] * bad.num_rows, pa.string()),
            "item_id": bad.column(id_column),
            "uri": bad.column("uri"),
            "reason": bad.column("reject_reason"),
            "detail": bad.column("reject_detail"),
        },
        schema=REJECTS_SCHEMA,
    )


def _count_by(values: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return counts


def _progress(config: RecapConfig, stage: str, total: int, unit: str, rate: str | None = None) -> StageProgress:
    return StageProgress(
        stage, total, unit, mode=config.ray.progress, log_interval_s=config.ray.log_interval_s, rate_counter=rate
    )


def run_ingest(config: RecapConfig, inputs: list[str], output: str, uris: list[str] | None = None) -> StageResult:
    """Find input files, hash and probe each on Ray, write the `videos` table and ingest rejects."""
    import ray.data

    start = time.monotonic()
    if uris is None:
        uris = discover_inputs(inputs, config.ingest.extensions)
    progress = _progress(config, "ingest", len(uris), "files")
    rows: list[dict[str, Any]] = []
    if uris:
        ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=min(len(uris), 1000))
        ds = _map_stage(ds, IngestStage, config.ingest.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch_rows = batch.to_pylist()
            rows.extend(batch_rows)
            progress.update(len(batch_rows), rejected=sum(r["status"] != "ok" for r in batch_rows))
    progress.close()
    rows = mark_duplicates(rows)
    rows.sort(key=lambda r: r["uri"])
    videos = pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA)
    manifest.write_table(output, "videos", videos, prefix="videos")
    rejects = _rejects_from(videos, "ingest", "video_id")
    manifest.write_table(output, "rejects", rejects, prefix="ingest")
    ok = sum(r["status"] == "ok" for r in rows)
    result = StageResult(
        "ingest",
        time.monotonic() - start,
        counts={"files": len(rows), "ok": ok, "rejected": len(rows) - ok},
        rejects_by_reason=_count_by(rejects.column("reason").to_pylist()),
    )
    manifest.update_run_json(
        output,
        config.to_dict(),
        "ingest",
        {"seconds": result.seconds, "counts": result.counts, "inputs": list(inputs)},
    )
    return result


def run_split(config: RecapConfig, output: str) -> StageResult:
    """Detect scenes in every ok video on Ray; write `clips`, split rejects, and update `videos`."""
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
    manifest.clear_parts(output, "clips")
    clips_writer = manifest.TableWriter(output, "clips", prefix="split")
    progress = _progress(config, "split", todo.num_rows, "videos", rate="frames")
    results: list[pa.Table] = []
    if todo.num_rows:
        ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
        ds = _map_stage(ds, SplitStage, config.split.resources, (config.to_dict(), clips_dir))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            clip_rows = clip_rows_from_results(batch)
            clips_writer.write_rows(clip_rows)
            results.append(batch.drop_columns(["clips_json"]))
            frames = sum(n or 0 for n in batch.column("num_frames").to_pylist())
            progress.update(
                batch.num_rows,
                frames=frames,
                clips=sum(c["passed"] for c in clip_rows),
                too_short=sum(not c["passed"] for c in clip_rows),
                rejected=sum(s != "ok" for s in batch.column("status").to_pylist()),
            )
    clips_writer.close()
    progress.close()
    split_results = (
        pa.concat_tables(results) if results else SPLIT_RESULT_SCHEMA.empty_table().drop_columns(["clips_json"])
    )
    video_rejects = _rejects_from(split_results, "split", "video_id")
    clips = manifest.read_table(output, "clips", columns=["clip_id", "uri", "reject_reason", "passed"])
    bad = clips.filter(pc.invert(clips.column("passed")))
    clip_rejects = pa.table(
        {
            "stage": pa.array(["split"] * bad.num_rows, pa.string()),
            "item_id": bad.column("clip_id"),
            "uri": bad.column("uri"),
            "reason": bad.column("reject_reason"),
            "detail": pa.array(
                [f"scene shorter than split.min_clip_s={config.split.min_clip_s}"] * bad.num_rows, pa.string()
            ),
        },
        schema=REJECTS_SCHEMA,
    )
    rejects = pa.concat_tables([video_rejects, clip_rejects])
    manifest.write_table(output, "rejects", rejects, prefix="split")
    _update_videos_after_split(output, videos, split_results)
    result = StageResult(
        "split",
        time.monotonic() - start,
        counts={
            "videos": todo.num_rows,
            "frames": progress.counters.get("frames", 0),
            "clips": progress.counters.get("clips", 0),
            "too_short": progress.counters.get("too_short", 0),
            "rejected_videos": video_rejects.num_rows,
        },
        rejects_by_reason=_count_by(rejects.column("reason").to_pylist()),
    )
    manifest.update_run_json(output, config.to_dict(), "split", {"seconds": result.seconds, "counts": result.counts})
    return result


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
        else:
            row.update(
                status=VideoStatus.REJECTED.value,
                reject_reason=res["reject_reason"],
                reject_detail=res["reject_detail"],
            )
    manifest.write_table(output, "videos", pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA), prefix="videos")


def resolve_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(AVAILABLE_STAGES)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; allowed: {', '.join(STAGE_ORDER)}")
    missing = [s for s in stages if s not in AVAILABLE_STAGES]
    if missing:
        raise ValueError(f"--stages: {missing} not built yet; available now: {', '.join(AVAILABLE_STAGES)}")
    return sorted(set(stages), key=STAGE_ORDER.index)


def run_pipeline(
    config: RecapConfig,
    output: str,
    inputs: list[str] | None = None,
    stages: list[str] | None = None,
    address: str | None = None,
) -> list[StageResult]:
    """Run the chosen stages in order on Ray and return what each did."""
    chosen = resolve_stages(stages)
    uris: list[str] | None = None
    if "ingest" in chosen:
        if not inputs:
            raise ValueError("the ingest stage needs --input (files, directories, globs or URIs)")
        uris = discover_inputs(inputs, config.ingest.extensions)  # fail on a bad input before Ray starts
    elif "split" in chosen and not manifest.table_exists(output, "videos"):
        raise StageInputError(f"no videos table under {output}/manifest: run `recap ingest` first")
    results: list[StageResult] = []
    with RaySession(config, address):
        for stage in chosen:
            if stage == "ingest":
                results.append(run_ingest(config, list(inputs or []), output, uris))
            elif stage == "split":
                results.append(run_split(config, output))
    return results
