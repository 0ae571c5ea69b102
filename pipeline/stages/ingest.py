"""Ingest stage: hash and probe every input file into one `videos` row, bad files included.

Hashing runs in the worker (plain reads cannot crash it); probing runs in the isolated child. `run_ingest`
finds the inputs, runs `IngestStage` on Ray, commits each batch, and writes `videos` and the ingest rejects.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from pipeline import manifest
from pipeline.config import RecapConfig
from pipeline.engine import (
    Stage,
    StageResult,
    StageRun,
    count_by,
    map_stage,
    rejects_from,
    stage_checkpoint,
    stage_progress,
)
from pipeline.io.sources import discover_inputs
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint
from pipeline.schema import VIDEOS_SCHEMA, RejectReason, VideoStatus, video_id_from_sha256
from pipeline.stages.common import IsolatedStage
from pipeline.video.decode import sha256_of


class IngestStage(IsolatedStage):
    """Batch transform: rows with `uri` -> `videos` rows."""

    name = "ingest"
    input_columns = ("uri",)
    output_schema = VIDEOS_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        super().__init__(config)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        uri = row["uri"]
        out: dict[str, Any] = {"uri": uri, "status": VideoStatus.OK.value}
        try:
            digest, size = sha256_of(uri)
        except OSError as exc:
            out.update(
                video_id=None,
                status=VideoStatus.REJECTED.value,
                reject_reason=RejectReason.UNREADABLE.value,
                reject_detail=f"cannot read file: {exc}",
            )
            return out
        out.update(video_id=video_id_from_sha256(digest), bytes=size)
        if size == 0:
            out.update(
                status=VideoStatus.REJECTED.value,
                reject_reason=RejectReason.EMPTY_FILE.value,
                reject_detail="file has 0 bytes",
            )
            return out
        outcome = self.run_isolated("pipeline.video.decode:probe_video", uri, self.config.ingest.min_frames)
        rejected = self.reject_of(outcome)
        if rejected is None:
            out.update(outcome.result)
        else:
            out.update(status=VideoStatus.REJECTED.value, reject_reason=rejected[0], reject_detail=rejected[1])
        return out


def mark_duplicates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Identical files share a video_id: keep the first by uri, reject the rest as duplicate_file."""
    first_uri: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["uri"]):
        vid = row.get("video_id")
        if vid is None or row.get("status") != VideoStatus.OK.value:
            continue
        if vid in first_uri:
            row.update(
                status=VideoStatus.REJECTED.value,
                reject_reason=RejectReason.DUPLICATE_FILE.value,
                reject_detail=f"same bytes as {first_uri[vid]}",
            )
        else:
            first_uri[vid] = row["uri"]
    return rows


def run_ingest(
    config: RecapConfig,
    inputs: list[str],
    output: str,
    uris: list[str] | None = None,
    checkpoint: StageCheckpoint | None = None,
    skipped: dict[str, int] | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    """Find input files, hash and probe each on Ray, write the `videos` table and ingest rejects. `skipped`: files
    the extension filter left out, by reason (found here when `uris` is not given). `progress`: a streaming run's
    line for this stage (what it committed is in `checkpoint`: only the rest is probed here)."""
    import ray.data

    start = time.monotonic()
    if uris is None:
        skipped = {}
        uris = discover_inputs(inputs, config.ingest.extensions, skipped)
    skipped = skipped or {}
    checkpoint = stage_checkpoint(output, "ingest", checkpoint)
    done = checkpoint.done("uri")
    todo = [u for u in uris if u not in done]
    progress = stage_progress(config, "ingest", len(todo), "files", progress=progress)
    if todo:
        ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=min(len(todo), 1000))
        ds = map_stage(ds, IngestStage, config.ingest.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            checkpoint.commit(batch)
            statuses = batch.column("status").to_pylist()
            progress.update(batch.num_rows, rejected=sum(s != "ok" for s in statuses))
    probed = checkpoint.read(schema=VIDEOS_SCHEMA)
    wanted = set(uris)
    rows = [r for r in (probed.to_pylist() if probed is not None else []) if r["uri"] in wanted]
    rejected_before = sum(r["status"] != "ok" for r in rows)
    rows = mark_duplicates(rows)
    progress.update(0, rejected=sum(r["status"] != "ok" for r in rows) - rejected_before)  # duplicates
    progress.close()
    rows.sort(key=lambda r: r["uri"])
    videos = pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA)
    manifest.write_table(output, "videos", videos, prefix="videos")
    rejects = rejects_from(videos, "ingest", "video_id")
    manifest.write_table(output, "rejects", rejects, prefix="ingest")
    ok = sum(r["status"] == "ok" for r in rows)
    return StageResult(
        "ingest",
        time.monotonic() - start,
        counts={"files": len(rows), "ok": ok, "rejected": len(rows) - ok}
        | ({"skipped": sum(skipped.values())} if skipped else {}),
        rejects_by_reason=count_by(rejects.column("reason").to_pylist()),
        info={"inputs": list(inputs)} | ({"skipped": dict(sorted(skipped.items()))} if skipped else {}),
        resumed=len(uris) - len(todo),
    )


def _run(run: StageRun) -> StageResult:
    inputs = list(run.inputs or [])
    return run_ingest(
        run.config, inputs, run.output, run.uris, checkpoint=run.checkpoint, skipped=run.skipped, progress=run.progress
    )


STAGE = Stage("ingest", _run, unit="files")
