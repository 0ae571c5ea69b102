"""Build the corpus report: read the manifest once, write `OUT/report/index.html`, thumbnails and gallery data.

The page holds the summary, histograms and bounded samples inline; the gallery's rows live in chunk files of
`page_size` rows (`report/data/clips-NNNN.js`) loaded when a page is shown, so a 100k-clip corpus opens fast.
Chunks are JSON wrapped in one function call because browsers refuse `fetch` of files opened from disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.errors import StageInputError
from pipeline.report import histogram
from pipeline.report.page import render_page
from pipeline.report.plan import STAGES, Plan, format_bytes, measure_costs, project
from pipeline.report.thumbnails import write_strips

PAGE_SIZE = 100
SAMPLES_PER_REASON = 6
MAX_DUPLICATE_GROUPS = 24
MAX_FLAGGED = 40

# clip columns the report reads (scores are found by prefix); embeddings and hashes are never loaded
_CLIP_COLUMNS = (
    "clip_id",
    "video_id",
    "uri",
    "start_frame",
    "end_frame",
    "start_s",
    "end_s",
    "duration_s",
    "passed",
    "reject_reason",
    "filter_reasons",
    "near_duplicate_of",
    "camera_motion",
    "caption",
    "caption_flags",
)


@dataclass
class PlanRequest:
    """`recap report --plan HOURS --gpus N --cpus M`."""

    video_hours: float
    gpus: int
    cpus: int

    def __post_init__(self) -> None:  # checked before any work, not after the thumbnails
        if not self.video_hours > 0:
            raise ValueError(f"--plan must be a positive number of hours of video (got {self.video_hours})")
        if self.cpus < 1 or self.gpus < 0:
            raise ValueError(f"--cpus must be at least 1 and --gpus at least 0 (got {self.cpus}, {self.gpus})")


@dataclass
class ReportResult:
    path: str  # index.html
    clips: int
    chunks: int
    thumbnails: int
    first_paint_bytes: int  # index.html + the first gallery chunk (thumbnails not counted)
    seconds: float
    plan: Plan | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _round(value: Any, digits: int = 4) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def _js_chunk(name: str, payload: Any) -> str:
    return f"recapData({json.dumps(name)},{json.dumps(payload, separators=(',', ':'))});\n"


def _write_text(path: str, text: str) -> int:
    data = text.encode()
    with open(path + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)
    return len(data)


def _stage_states(run: dict[str, Any]) -> list[dict[str, Any]]:
    states = []
    for stage in STAGES:
        info = (run.get("stages") or {}).get(stage)
        if info is None:
            status = "not run"
        else:
            status = {"done": "done", "running": "interrupted", "stale": "stale"}.get(info.get("status"), "done")
        states.append(
            {
                "stage": stage,
                "status": status,
                "seconds": (info or {}).get("seconds"),
                "counts": (info or {}).get("counts") or {},
                "finished_at": (info or {}).get("finished_at"),
            }
        )
    return states


def _read_clips(out: str) -> tuple[pa.Table, list[str]]:
    """The clips the report shows, in clip_id order, and the score columns that hold no value at all (a scorer
    that was off, e.g. CLIP scores without `filter.clip.model`): those are dropped from the table."""
    columns = manifest.table_columns(out, "clips")
    wanted = [c for c in columns if c in _CLIP_COLUMNS or c.startswith("score_")]
    table = manifest.read_table(out, "clips", columns=wanted)
    empty = [c for c in wanted if c.startswith("score_") and table.column(c).null_count == table.num_rows]
    table = table.drop_columns(empty)
    return (table.sort_by("clip_id") if table.num_rows else table), empty


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _funnel(videos: pa.Table, clips: pa.Table, samples: pa.Table | None) -> list[dict[str, Any]]:
    """The same counts as `manifest.corpus_stats` (videos -> ok -> clips -> passed -> captioned -> samples), with hours."""
    ok = pc.equal(videos.column("status"), "ok")
    hours = lambda arr: float(pc.sum(pc.fill_null(arr, 0)).as_py() or 0) / 3600  # noqa: E731
    passed = pc.fill_null(clips.column("passed"), False) if "passed" in clips.column_names else None
    rows = [
        {"key": "videos", "label": "input videos", "count": videos.num_rows, "hours": None},
        {
            "key": "videos_ok",
            "label": "videos ok",
            "count": int(pc.sum(ok).as_py() or 0),
            "hours": hours(videos.column("duration_s").filter(ok)),
        },
        {"key": "clips", "label": "clips", "count": clips.num_rows, "hours": hours(clips.column("duration_s"))},
    ]
    if passed is not None:
        rows.append(
            {
                "key": "passed",
                "label": "passed",
                "count": int(pc.sum(passed).as_py() or 0),
                "hours": hours(clips.column("duration_s").filter(passed)),
            }
        )
    if "caption" in clips.column_names and passed is not None:
        has_caption = pc.and_(passed, pc.fill_null(pc.greater(pc.utf8_length(clips.column("caption")), 0), False))
        rows.append(
            {
                "key": "captioned",
                "label": "captioned",
                "count": int(pc.sum(has_caption).as_py() or 0),
                "hours": hours(clips.column("duration_s").filter(has_caption)),
            }
        )
    if samples is not None:
        in_samples = pc.is_in(clips.column("clip_id"), value_set=samples.column("key"))
        rows.append(
            {
                "key": "samples",
                "label": "samples in shards",
                "count": samples.num_rows,
                "hours": hours(clips.column("duration_s").filter(in_samples)),
            }
        )
    return rows


def _rejects(out: str) -> list[dict[str, Any]]:
    table = manifest.read_table(out, "rejects", columns=["stage", "reason"])
    if not table.num_rows:
        return []
    grouped = table.group_by(["stage", "reason"]).aggregate([([], "count_all")])
    rows = [{"stage": s, "reason": r, "count": n} for s, r, n in zip(*grouped.to_pydict().values(), strict=True)]
    return sorted(rows, key=lambda r: (STAGES.index(r["stage"]) if r["stage"] in STAGES else 99, -r["count"]))


def _thresholds(config: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    return ((config.get("filter") or {}).get("thresholds")) or {}


def _distributions(
    config: dict[str, Any], clips: pa.Table, shards: pa.Table | None, samples: pa.Table | None
) -> list[str]:
    """Inline SVG histograms: every score with its thresholds, durations, caption words, shard sizes."""
    svgs = []
    passed = (
        np.asarray(pc.fill_null(clips.column("passed"), False).to_numpy(zero_copy_only=False), bool)
        if "passed" in clips.column_names
        else None
    )
    thresholds = _thresholds(config)

    def values(name: str) -> np.ndarray:
        return np.asarray(pc.cast(pc.fill_null(clips.column(name), float("nan")), pa.float64()).to_numpy(), float)

    for name in sorted(c for c in clips.column_names if c.startswith("score_")):
        limits = thresholds.get(name[len("score_") :]) or {}
        limits = {k: limits.get(k) for k in ("min", "max")}
        hist = histogram.histogram(values(name), passed, include=tuple(v for v in limits.values() if v is not None))
        svgs.append(histogram.render_svg(hist, name, limits))
    if clips.num_rows:
        split = config.get("split") or {}
        limits = {"min": split.get("min_clip_s"), "max": split.get("max_clip_s")}
        hist = histogram.histogram(values("duration_s"), passed)
        svgs.append(histogram.render_svg(hist, "clip duration (s)", limits))
    if "caption" in clips.column_names and passed is not None:
        words = np.asarray([len(c.split()) if c else np.nan for c in _column(clips, "caption")], float)
        qc = (config.get("caption") or {}).get("qc") or {}
        hist = histogram.histogram(words[passed & np.isfinite(words)])
        svgs.append(
            histogram.render_svg(
                hist, "caption length (words)", {"min": qc.get("min_words"), "max": qc.get("max_words")}
            )
        )
    if shards is not None and shards.num_rows:
        sizes = np.asarray(shards.column("bytes").to_numpy(), float) / 1e6
        max_bytes = (config.get("encode") or {}).get("shard_max_bytes")
        hist = histogram.histogram(sizes, bins=20)
        svgs.append(histogram.render_svg(hist, "shard size (MB)", {"max": max_bytes / 1e6 if max_bytes else None}))
    if samples is not None and samples.num_rows and "num_frames" in samples.column_names:
        hist = histogram.histogram(
            np.asarray(samples.column("num_frames").to_numpy(zero_copy_only=False), float), bins=20
        )
        svgs.append(histogram.render_svg(hist, "frames per sample"))
    return svgs


def _buckets(samples: pa.Table | None) -> dict[str, tuple[int, float]]:
    """latent shape (bucket) -> (samples, mean bytes per sample)."""
    if samples is None or not samples.num_rows:
        return {}
    shapes = ["x".join(map(str, s)) if s else "?" for s in samples.column("latent_shape").to_pylist()]
    sizes = samples.column("bytes").to_pylist() if "bytes" in samples.column_names else [None] * len(shapes)
    out: dict[str, list[float]] = {}
    for shape, size in zip(shapes, sizes, strict=True):
        out.setdefault(shape, []).append(float(size) if size is not None else math.nan)
    return {k: (len(v), float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else 0.0) for k, v in out.items()}


def _gallery_rows(clips: pa.Table, thumbs: set[str]) -> list[dict[str, Any]]:
    """One compact dict per clip, in table order: what a gallery card shows."""
    names = clips.column_names
    score_names = sorted(c for c in names if c.startswith("score_"))
    cols = {n: _column(clips, n) for n in _CLIP_COLUMNS}
    scores = {n: clips.column(n).to_pylist() for n in score_names}
    rows = []
    for i, clip_id in enumerate(cols["clip_id"]):
        uri = cols["uri"][i] or ""
        row: dict[str, Any] = {
            "i": i,
            "id": clip_id,
            "v": uri.rsplit("/", 1)[-1],
            "t": [_round(cols["start_s"][i]), _round(cols["end_s"][i])],
            "p": bool(cols["passed"][i]) if cols["passed"][i] is not None else None,
            "r": cols["reject_reason"][i],
            "s": {n[len("score_") :]: _round(scores[n][i], 3) for n in score_names if scores[n][i] is not None},
        }
        if cols["filter_reasons"][i]:
            row["fr"] = cols["filter_reasons"][i]
        if cols["caption"][i]:
            row["c"] = cols["caption"][i]
        if cols["caption_flags"][i]:
            row["f"] = cols["caption_flags"][i]
        if cols["near_duplicate_of"][i]:
            row["d"] = cols["near_duplicate_of"][i]
        if cols["camera_motion"][i]:
            row["cm"] = cols["camera_motion"][i]
        if clip_id in thumbs:
            row["img"] = f"images/{clip_id}.jpg"
        rows.append(row)
    return rows


def _filter_sections(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reject reason: clips it rejected (first failure), clips failing it at all, and a sample of them."""
    first: dict[str, list[dict[str, Any]]] = {}
    anywhere: dict[str, int] = {}
    for row in rows:
        if row.get("r"):
            first.setdefault(row["r"], []).append(row)
        for reason in set(row.get("fr") or ()):
            anywhere[reason] = anywhere.get(reason, 0) + 1
    sections = []
    for reason, dropped in sorted(first.items(), key=lambda kv: -len(kv[1])):
        # spread the sample over the corpus instead of taking the first clips of one video
        step = max(len(dropped) // SAMPLES_PER_REASON, 1)
        sections.append(
            {
                "reason": reason,
                "dropped": len(dropped),
                "failing": anywhere.get(reason, len(dropped)),
                "sample": dropped[::step][:SAMPLES_PER_REASON],
            }
        )
    return sections


def _duplicate_groups(rows: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    by_id = {row["id"]: row for row in rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("d"):
            groups.setdefault(row["d"], []).append(row)
    shown = []
    for kept, dups in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:MAX_DUPLICATE_GROUPS]:
        shown.append({"kept": kept, "kept_row": by_id.get(kept), "duplicates": dups[:6], "size": len(dups)})
    return len(groups), shown


def _flagged(rows: list[dict[str, Any]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    counts: dict[str, int] = {}
    flagged = []
    for row in rows:
        for flag in row.get("f") or ():
            counts[flag] = counts.get(flag, 0) + 1
        if row.get("f"):
            flagged.append(row)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), flagged[:MAX_FLAGGED]


def _write_columns(data_dir: str, rows: list[dict[str, Any]], clips: pa.Table, reasons: list[str]) -> None:
    """Sort/filter keys, one small file per column, loaded only when the gallery is sorted or filtered.

    Scores keep 6 significant digits here (cards show 3): enough for an order that matches the table's."""
    codes = {r: i + 1 for i, r in enumerate(reasons)}
    status = [0 if row.get("p") else codes.get(row.get("r") or "", len(reasons) + 1) for row in rows]
    _write_text(os.path.join(data_dir, "col-status.js"), _js_chunk("col-status", status))
    for column in (c for c in clips.column_names if c.startswith("score_")):
        name = column[len("score_") :]
        values = [_round(v, 6) for v in clips.column(column).to_pylist()]
        _write_text(os.path.join(data_dir, f"col-{name}.js"), _js_chunk(f"col-{name}", values))


def build_report(
    out: str,
    plan: PlanRequest | None = None,
    thumbnails: bool = True,
    page_size: int = PAGE_SIZE,
    workers: int | None = None,
) -> ReportResult:
    """Write the report of corpus `out` (a local directory) to `out/report/`; returns where and what it wrote."""
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    if not os.path.isdir(os.path.join(out, "manifest")):
        raise StageInputError(f"{out}: no manifest/ directory, nothing to report: is it a corpus `recap run` wrote?")
    report_dir = os.path.join(out, "report")
    data_dir = os.path.join(report_dir, "data")
    images_dir = os.path.join(report_dir, "images")
    shutil.rmtree(data_dir, ignore_errors=True)  # chunk counts change with the corpus: no stale pages
    os.makedirs(data_dir, exist_ok=True)

    run = manifest.read_run_json(out)
    config = run.get("config") or {}
    videos = manifest.read_table(out, "videos", columns=["video_id", "uri", "status", "reject_reason", "duration_s"])
    clips, empty_scores = _read_clips(out)
    samples = (
        manifest.read_table(
            out,
            "samples",
            columns=[
                c
                for c in manifest.table_columns(out, "samples")
                if c in ("key", "latent_shape", "bytes", "num_frames")
            ],
        )
        if manifest.table_exists(out, "samples")
        else None
    )
    shards = manifest.read_table(out, "shards") if manifest.table_exists(out, "shards") else None
    t = lap("read", started)

    thumbs: set[str] = set()
    if thumbnails and clips.num_rows:
        todo = clips.select(["clip_id", "uri", "start_s", "end_s"]).to_pylist()
        thumbs = write_strips(todo, images_dir, workers=workers)
    t = lap("thumbnails", t)

    funnel = _funnel(videos, clips, samples)
    stages = _stage_states(run)
    rows = _gallery_rows(clips, thumbs)
    score_names = sorted(c[len("score_") :] for c in clips.column_names if c.startswith("score_"))
    reasons = sorted({row["r"] for row in rows if row.get("r")})
    t = lap("rows", t)

    chunks = max(math.ceil(len(rows) / page_size), 1)
    first_chunk_bytes = 0
    for k in range(chunks):
        name = f"clips-{k:04d}"
        size = _write_text(
            os.path.join(data_dir, f"{name}.js"), _js_chunk(name, rows[k * page_size : (k + 1) * page_size])
        )
        first_chunk_bytes = first_chunk_bytes or size
    _write_columns(data_dir, rows, clips, reasons)
    t = lap("chunks", t)

    video_hours = next(f["hours"] for f in funnel if f["key"] == "videos_ok") or 0.0
    buckets = _buckets(samples)
    costs = measure_costs(run, video_hours)
    plan_result = None
    if plan is not None:
        # samples per hour of video: measured when encode ran, else the clips that got furthest stand in for them
        counts = {f["key"]: f["count"] for f in funnel}
        ran = {s["stage"] for s in stages if s["status"] == "done"}
        unit = next(
            (
                counts.get(k)
                for st, k in (("encode", "samples"), ("caption", "captioned"), ("filter", "passed"))
                if st in ran
            ),
            None,
        )
        plan_result = project(
            costs,
            video_hours,
            plan.video_hours,
            plan.gpus,
            plan.cpus,
            samples_by_bucket=buckets,
            units_per_video_hour=unit / video_hours if unit is not None and video_hours else None,
        )
        _write_text(os.path.join(report_dir, "plan.json"), json.dumps(plan_result.to_dict(), indent=2))
    n_dup_groups, dup_groups = _duplicate_groups(rows)
    flag_counts, flagged = _flagged(rows)
    meta = {
        "corpus": os.path.abspath(out),
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "total": len(rows),
        "page_size": page_size,
        "chunks": chunks,
        "scores": score_names,
        "reasons": reasons,
        "reason_counts": {r: sum(1 for row in rows if row.get("r") == r) for r in reasons},
        "passed": sum(1 for row in rows if row.get("p")),
        "filters": _filter_sections(rows),
        "duplicate_groups": dup_groups,
        "duplicate_group_count": n_dup_groups,
        "flag_counts": flag_counts,
        "flagged": flagged,
    }
    page = render_page(
        meta=meta,
        funnel=funnel,
        stages=stages,
        rejects=_rejects(out),
        histograms=_distributions(config, clips, shards, samples),
        empty_scores=empty_scores,
        buckets=[
            {"bucket": b, "samples": n, "bytes_per_sample": size, "bytes": n * size, "size": format_bytes(n * size)}
            for b, (n, size) in sorted(buckets.items(), key=lambda kv: -kv[1][0])
        ],
        costs=costs,
        plan=plan_result,
        run=run,
        video_hours=video_hours,
    )
    index = os.path.join(report_dir, "index.html")
    page_bytes = _write_text(index, page)
    lap("page", t)
    return ReportResult(
        path=index,
        clips=len(rows),
        chunks=chunks,
        thumbnails=len(thumbs),
        first_paint_bytes=page_bytes + first_chunk_bytes,
        seconds=time.perf_counter() - started,
        plan=plan_result,
        timings=timings,
    )
