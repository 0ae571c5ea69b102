"""Ingest stage: hash and probe every input file into one `videos` row, bad files included.

Hashing runs in the worker (plain reads cannot crash it); probing runs in the isolated child.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RecapConfig
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
