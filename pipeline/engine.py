"""The engine under every stage: the Ray session, wiring a stage class into Ray Data, commits and progress.

It knows no stage: `pipeline.stages.<stage>` modules build on it, and `pipeline.runner` (`recap run`) lists
them. Each stage declares its input columns; `map_stage` checks them when the pipeline is built.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RecapConfig, Resources
from pipeline.errors import DecoderUnavailable, StageInputError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint, stage_part
from pipeline.schema import REJECTS_SCHEMA, VideoStatus


@dataclass
class StageResult:
    stage: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # more for run.json (caption version, VAE, ...)
    skipped: bool = False  # finished by an earlier run with the same settings
    resumed: int = 0  # work items an earlier, interrupted run had already committed

    def summary_line(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_reason.items())) or "none"
        note = (
            " (done earlier, skipped)"
            if self.skipped
            else (f" (resumed: {self.resumed:,} done before)" if self.resumed else "")
        )
        return f"{self.stage:<7} {self.seconds:7.1f}s  {counts}; rejects: {rejects}{note}"


@dataclass
class StageRun:
    """What a stage's run function is given: the command's settings, this stage's checkpoint, and (a stream's
    stages) the progress line already counting. `inputs`, `uris`, `skipped`: what ingest reads."""

    config: RecapConfig
    output: str
    checkpoint: StageCheckpoint
    inputs: list[str] | None = None
    uris: list[str] | None = None
    skipped: dict[str, int] | None = None
    progress: StageProgress | None = None


@dataclass(frozen=True)
class Stage:
    """A stage as `recap run` lists it. `run` does the whole stage (reads, transforms on Ray, writes, commits);
    `unit`/`rate`: what its progress line counts; `needs`: the table it reads and what to say when it is missing
    (checked before anything starts when the command begins with this stage); `dry_run`: a run that writes
    nothing; `repairable`/`repair`: when outputs it made are missing, whether it can redo only those, seeding its
    checkpoint with what is intact (else it runs again whole); `reopen`: `--retry-rejected`'s rebuild of its
    checkpoint from its table, for the videos it keeps (see `resume.reopen_rejected`)."""

    name: str
    run: Callable[[StageRun], StageResult]
    unit: str
    rate: str | None = None
    needs: tuple[str, str] | None = None
    dry_run: Callable[[RecapConfig, str], StageResult] | None = None
    repairable: Callable[[list[str]], bool] | None = None
    repair: Callable[[str, StageCheckpoint, dict[str, Any]], None] | None = None
    reopen: Callable[[str, pa.Table, list[str], StageCheckpoint], None] | None = None


@dataclass
class Streamed:
    """What a stream did for one of its stages, for that stage's result: items an interrupted run had committed
    before (`resumed`) and counts to report instead of the stage's own (e.g. nothing was resumed)."""

    resumed: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamGroup:
    """Consecutive stages `recap run` runs as ONE streaming Ray Data pipeline when it runs all of them: `run`
    streams the work into the stages' checkpoints (config, output, input uris, checkpoints, progress lines ->
    what it did per stage), then each stage's own `run` finishes it as it would alone. `unfit`: why the pools do
    not fit the cluster at once (then the stages run one at a time); `resumes`: whether the stream can continue
    stages with committed work (else it streams only stages that start fresh)."""

    stages: tuple[str, ...]
    run: Callable[
        [RecapConfig, str, list[str], dict[str, StageCheckpoint], dict[str, StageProgress]], dict[str, Streamed]
    ]
    unfit: Callable[[RecapConfig], str | None]
    resumes: bool = False


class RaySession:
    """Connects to a cluster (`address` or RAY_ADDRESS) or starts a local Ray; reuses a live one."""

    def __init__(self, config: RecapConfig, address: str | None = None):
        self.config = config
        self.address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
        self._started = False
        self._reaper: Any = None

    def __enter__(self) -> RaySession:
        import ray
        import ray.data

        if not ray.is_initialized():
            # Ray's notice that a local cluster turned token auth on is for cluster admins, not a recap user: the
            # auth stays on, the line stays off the terminal.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            # Ray's C++ logs at INFO append statistics every minute and a line per actor event: over a long run
            # that is most of what this process writes (see bench/run.py's driver-bytes figure).
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", self.config.ray.system_log_level)
            if self.address:
                kwargs["address"] = self.address
            elif self.config.ray.num_cpus:
                kwargs["num_cpus"] = self.config.ray.num_cpus
            ray.init(**kwargs)
            self._started = True
            if not self.address:  # a local Ray goes down with this process, even if it is SIGKILLed
                from pipeline.ray_reaper import start_reaper

                self._reaper = start_reaper()
        ctx = ray.data.DataContext.get_current()
        # recap prints its own per-stage progress; Ray's bars (or INFO blocks off a terminal) are noise.
        ctx.enable_progress_bars = False
        # A decoding process that cannot start is the worker's trouble, not the batch's: Ray runs the batch
        # again before the run gives up (DecoderUnavailable at the driver).
        retried = ctx.retried_map_errors
        if retried is not True:
            retried = list(retried or [])
            if DecoderUnavailable.MARKER not in retried:
                retried.append(DecoderUnavailable.MARKER)
            ctx.retried_map_errors = retried
        ctx.max_map_retries = max(ctx.max_map_retries, self.config.isolation.infrastructure_retries)
        for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            from pipeline.ray_reaper import stop_reaper

            ray.shutdown()
            stop_reaper(self._reaper)


def infrastructure_failure(exc: BaseException) -> DecoderUnavailable | None:
    """The DecoderUnavailable a stage actor raised, found in the error Ray Data reports (it keeps only text)."""
    import re

    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        if isinstance(current, DecoderUnavailable) and type(current) is DecoderUnavailable:
            return current
        seen.append(current)
        found = re.search(
            r"DecoderUnavailable: (.*?)(?:\n\nThe above exception|\nFailed to apply UDF|\Z)", str(current), re.S
        )
        if found:
            return DecoderUnavailable(found.group(1).strip())
        nxt = getattr(current, "cause", None)
        current = nxt if isinstance(nxt, BaseException) else (current.__cause__ or current.__context__)
    return None


def map_stage(
    ds: Any,
    stage_cls: type,
    resources: Resources,
    constructor_args: tuple,
    runtime_env: dict | None = None,
    columns: tuple[str, ...] | None = None,
    post: tuple[type, tuple] | None = None,
) -> Any:
    """`stage_cls` as an actor pool over `ds`. `columns`: what the stage before declares it outputs, so the check
    of the stage's input columns needs no execution (`ds.schema()` of a mapped dataset runs its first block).
    `post` (a class and its arguments): a last step built in the same actors and applied to each output batch
    (writing the batch's results where they belong, returning what the driver commits)."""
    import ray.data

    names = list(columns) if columns is not None else ds.schema().names
    missing = [c for c in stage_cls.input_columns if c not in names]
    if missing:
        raise StageInputError(f"stage {stage_cls.name} needs columns {missing}; the input has {names}")
    return ds.map_batches(
        then(stage_cls, post) if post is not None else stage_cls,
        fn_constructor_args=constructor_args,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
        runtime_env=runtime_env,
    )


def then(stage_cls: type, post: tuple[type, tuple]) -> type:
    """`stage_cls` whose output batches go through `post[0](*post[1])`, built once per actor."""

    class Then(stage_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._post = post[0](*post[1])

        def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
            return self._post(super().__call__(batch))

    Then.__name__ = Then.__qualname__ = stage_cls.__name__  # Ray names the operator after it
    return Then


def through(
    stage_cls: type,
    passthrough: tuple[str, ...],
    skip: str | None = None,
    post: tuple[type, tuple] | None = None,
    key: str = "clip_id",
) -> type:
    """`stage_cls` in a streaming pipeline: its output rows keep the input's `passthrough` columns (matched by
    `key`), and rows whose `skip` column is true are not given to it (they come out with its columns null).
    `post` (a class and its arguments) is built in the same actor and applied to each output batch: a last step
    (e.g. writing the batch's results) that needs no pool of its own.

    Stages of two recap stages chained in one Ray Data pipeline carry what the later one needs this way; a row
    an earlier stage rejected passes the later ones untouched. Columns whose names start with `_` are the
    pipeline's own (commit records, the skip flag), never a table's."""

    class Through(stage_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
            batch = batch if isinstance(batch, pa.Table) else pa.table(batch)
            skipped = None
            work = batch
            if skip is not None and skip in batch.column_names:
                mask = pc.fill_null(batch.column(skip), False)
                work, skipped = batch.filter(pc.invert(mask)), batch.filter(mask)
            out = super().__call__(work) if work.num_rows else stage_cls.output_schema.empty_table()
            if skipped is not None and skipped.num_rows:
                filler = {
                    f.name: skipped.column(key) if f.name == key else pa.nulls(skipped.num_rows, f.type)
                    for f in out.schema
                }
                out = pa.concat_tables([out, pa.table(filler, schema=out.schema)])
            where = pc.index_in(out.column(key), value_set=batch.column(key))
            for name in passthrough:
                if name not in out.column_names:
                    out = out.append_column(batch.schema.field(name), batch.column(name).take(where))
            return out

    Through.__name__ = Through.__qualname__ = stage_cls.__name__  # Ray names the operator after it
    Through.output_schema = stage_cls.output_schema
    return then(Through, post) if post else Through


def map_through(
    ds: Any,
    names: list[str],
    stage_cls: type,
    resources: Resources,
    constructor_args: tuple,
    passthrough: tuple[str, ...] = (),
    skip: str | None = None,
    runtime_env: dict | None = None,
    post: tuple[type, tuple] | None = None,
) -> tuple[Any, list[str]]:
    """`map_stage` for a chain whose columns are known (`names`: the input's), without asking Ray for the
    schema (which would run part of the pipeline); returns the dataset and its columns (`post`'s class
    says what it makes of them with `output_names`)."""
    kept = tuple(c for c in passthrough if c in names and c not in stage_cls.output_schema.names)
    wrapped = through(stage_cls, kept, skip, post) if kept or skip or post else stage_cls
    ds = map_stage(ds, wrapped, resources, constructor_args, runtime_env, columns=tuple(names))
    names = [*stage_cls.output_schema.names, *kept]
    return ds, post[0].output_names(names) if post else names


STAGED_RECORD_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64())])


class StagedRows:
    """A stage's last step (`map_stage(post=...)`): writes each output batch, as `schema`, as a staged part of the
    stage's checkpoint (`work_uri`, parts named by the `key` columns' values); the driver gets one record per
    batch (STAGED_RECORD_SCHEMA) and adopts the part, so the rows never reach it."""

    def __init__(self, work_uri: str, schema: pa.Schema, key: tuple[str, ...]):
        self.work, self.schema, self.key = work_uri, schema, key

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = conform(batch, self.schema)
        name = stage_part(self.work, rows, self.key)
        return pa.table({"part": [name], "rows": [rows.num_rows]}, schema=STAGED_RECORD_SCHEMA)


def pools_fit(pools: dict[str, Resources]) -> str | None:
    """None when the Ray cluster can hold every pool of a streaming pipeline at once, else why not.

    A stream's actor pools all start together; pools that ask for more CPUs or GPUs than the cluster has can
    starve an upstream pool of its place while downstream ones wait for its output (a deadlock), so such a
    pipeline runs one stage at a time instead."""
    import ray

    have = ray.cluster_resources()
    need = {
        "CPU": sum(r.num_cpus * r.concurrency for r in pools.values()),
        "GPU": sum(r.num_gpus * r.concurrency for r in pools.values()),
    }
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0) + 1e-9]
    if not short:
        return None
    asked = ", ".join(f"{name} {r.concurrency}x({r.num_cpus:g} CPU, {r.num_gpus:g} GPU)" for name, r in pools.items())
    return f"its pools ask for {' and '.join(short)}: {asked}"


# A table rebuild: Ray tasks turn a stage's committed results into the rows of a table (and its rejects) and
# write them as Parquet parts; the driver only links the parts in. What each task asks for, how many run at once
# (the Ray Data path), and how many rows go into one part.
REBUILD_RESOURCES = Resources(num_cpus=0.5, concurrency=2, batch_size=50_000)
REBUILD_RECORD_SCHEMA = pa.schema(
    [("part", pa.string()), ("rows", pa.int64()), ("passed", pa.int64()), ("rejects", pa.string())]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order and types; columns it lacks are null."""
    n = table.num_rows
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


def write_table_part(
    batch: pa.Table | dict[str, Any], transform: Any, args: tuple, work_uri: str, schema: pa.Schema, key: str
) -> pa.Table:
    """One batch of a table rebuild, as a Ray task: `transform(*args)` (None: the batch as it is) gives the batch's
    table rows and reject rows (or None); both are written as Parquet parts named by the rows' keys, so a retried
    batch rewrites the same files. Returns one record: the part, its rows, how many passed, and the reject counts
    by reason (JSON). Tasks, not actors: a rebuild starts no process of its own."""
    import hashlib
    import json

    from pipeline import manifest

    batch = batch if isinstance(batch, pa.Table) else pa.table(batch)
    rows, rejects = transform(*args)(batch) if transform is not None else (batch, None)
    rows = conform(rows, schema)
    rejects = conform(rejects, REJECTS_SCHEMA) if rejects is not None else REJECTS_SCHEMA.empty_table()
    ids = rows.column(key) if rows.num_rows else rejects.column("item_id")
    if not len(ids):
        return REBUILD_RECORD_SCHEMA.empty_table()
    name = hashlib.sha256("\n".join(sorted(ids.to_pylist())).encode()).hexdigest()[:16] + ".parquet"
    work = work_uri.rstrip("/")
    if rows.num_rows:
        manifest.write_part(f"{work}/rows", name, rows)
    if rejects.num_rows:
        manifest.write_part(f"{work}/rejects", name, rejects)
    passed = int(pc.sum(rows.column("passed")).as_py() or 0) if "passed" in rows.column_names else rows.num_rows
    reasons = pc.value_counts(rejects.column("reason")).to_pylist() if rejects.num_rows else []
    record = {
        "part": [name],
        "rows": [rows.num_rows],
        "passed": [passed],
        "rejects": [json.dumps({r["values"]: r["counts"] for r in reasons}, sort_keys=True)],
    }
    return pa.table(record, schema=REBUILD_RECORD_SCHEMA)


@dataclass(frozen=True)
class Source:
    """Parquet files a table rebuild reads (on the workers): their filesystem (fsspec), the schema to read them
    with, and `prepare`, a function applied to each batch read before the rebuild's transform (e.g. keep only
    some rows)."""

    paths: list[str]
    fs: Any
    schema: pa.Schema | None = None
    prepare: Callable[[pa.Table], pa.Table] | None = None
    columns: list[str] | None = None  # read only these

    def dataset(self) -> Any:
        """A Ray Data dataset over the files, read (and prepared) by workers, streaming (a table rebuild's input)."""
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        paths = [self.fs._strip_protocol(p) for p in self.paths]
        ds = ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(self.fs)), schema=self.schema)
        if self.columns is not None:
            ds = ds.select_columns(self.columns)  # what read_parquet(columns=) now does itself, deprecated
        if self.prepare is not None:
            ds = ds.map_batches(self.prepare, batch_format="pyarrow", batch_size=None)
        return ds

    def blocks(self, rows_per_block: int) -> Any:
        """A stage's input: a Ray Data dataset of the prepared rows in blocks of at most `rows_per_block` (an
        actor pool hands a block to one actor whole, so this is how the pool's actors all get work), read and
        prepared by Ray tasks, one a file, that ask for no CPU: the stage's pools may hold every CPU of the
        cluster (a pipeline is sized to fit) and a read waiting for one would never feed them (Ray Data's own
        read and repartition operators ask for a CPU each). The blocks go to the object store; the driver
        holds their references only."""
        import dataclasses

        import ray
        import ray.data

        read = ray.remote(num_cpus=0, num_returns="streaming")(_prepared_blocks)
        streams = [read.remote(dataclasses.replace(self, paths=[path]), rows_per_block) for path in self.paths]
        return ray.data.from_arrow_refs([block for stream in streams for block in stream])

    def read_schema(self) -> pa.Schema:
        """The files' schema (their footers; nothing read)."""
        import pyarrow.dataset as pads

        return self.schema or pads.dataset([self.fs._strip_protocol(p) for p in self.paths], filesystem=self.fs).schema

    def read(self) -> pa.Table | None:
        """All of it as one table, in this process (a worker's: see `rebuild_table`)."""
        import pyarrow.parquet as pq

        tables = []
        for path in self.paths:
            with self.fs.open(self.fs._strip_protocol(path), "rb") as fh:
                table = pq.read_table(fh, schema=self.schema, columns=self.columns)
            tables.append(self.prepare(table) if self.prepare is not None else table)
        return pa.concat_tables(tables, promote_options="permissive") if tables else None

    def size(self) -> int:
        return sum(self.fs.size(self.fs._strip_protocol(p)) for p in self.paths)

    def num_rows(self, where: pc.Expression | None = None) -> int:
        """Rows in the files (from their footers, nothing read), or those matching `where` (a scan of the columns
        it names, batch by batch)."""
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        if where is not None:
            paths = [self.fs._strip_protocol(p) for p in self.paths]
            return pads.dataset(paths, filesystem=self.fs, format="parquet").count_rows(filter=where) if paths else 0
        rows = 0
        for path in self.paths:
            with self.fs.open(self.fs._strip_protocol(path), "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        return rows

    @classmethod
    def table(cls, output: str, name: str, **kwargs: Any) -> Source:
        """The files a reader of table `name` sees."""
        from pipeline import manifest

        fs, _ = manifest._fs(manifest.table_dir(output, name))
        return cls(manifest.table_files(output, name), fs, **kwargs)


def _prepared_blocks(source: Source, rows_per_block: int) -> Any:
    """`Source.blocks`'s task: the source's rows, prepared, in slices of `rows_per_block` (at least one slice, empty
    when nothing is left, so a dataset always has a block and its schema)."""
    table = source.read()
    if table is None:
        table = pa.table({})
    yield table.slice(0, rows_per_block)
    for start in range(rows_per_block, table.num_rows, rows_per_block):
        yield table.slice(start, rows_per_block)


class RowsWhere:
    """A `Source`'s `prepare` that keeps the rows matching an Arrow expression (e.g. not done yet)."""

    def __init__(self, where: pc.Expression):
        self.where = where

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(self.where)


def _rebuild_in_one_task(sources: list[Source], *args: Any) -> pa.Table:
    """A small rebuild's one batch: the sources read whole in this (worker) process, then `write_table_part`."""
    tables = [t for t in (src.read() for src in sources) if t is not None and t.num_rows]
    if not tables:
        return REBUILD_RECORD_SCHEMA.empty_table()
    return write_table_part(pa.concat_tables(tables, promote_options="permissive"), *args)


# Inputs up to this many bytes of Parquet are rebuilt by one Ray task (a Ray Data pipeline's start-up would cost
# more than the work); larger ones by Ray Data, in parts of REBUILD_RESOURCES.batch_size rows.
REBUILD_ONE_TASK_BYTES = 32 << 20


@dataclass
class Rebuilt:
    rows: int = 0
    passed: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


def rebuild_table(
    output: str,
    name: str,
    stage: str,
    sources: list[Source],
    schema: pa.Schema,
    transform: Any = None,
    args: tuple = (),
    key: str = "clip_id",
    more_rejects: pa.Table | None = None,
    reject_parts: tuple[str, ...] = (),
    one_task_bytes: int = REBUILD_ONE_TASK_BYTES,
) -> Rebuilt:
    """Replace table `name` with the rows Ray workers make of `sources` (none: an empty table) through
    `transform` (see write_table_part), and the `stage` parts of `rejects` with the reject rows they make, plus
    `more_rejects` (the driver's own, small) and `reject_parts` (files the stage's workers wrote). The workers
    read the sources and write the parts under `manifest/_work/<stage>/rebuild/` (one Ray task for inputs up to
    `one_task_bytes`, else a Ray Data pipeline); the driver sees one small record per part and swaps the parts
    in (linked, not copied). Run again after a crash, it starts over and replaces the same tables: nothing is
    appended twice."""
    import json

    import pyarrow.dataset as pads
    import ray

    from pipeline import manifest

    work = f"{output.rstrip('/')}/manifest/_work/{stage}/rebuild"
    fs, path = manifest._fs(work)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    done = Rebuilt()
    parts: list[str] = []
    rejects = list(reject_parts)

    def count(reasons: dict[str, int]) -> None:
        for reason, n in reasons.items():
            done.rejects_by_reason[reason] = done.rejects_by_reason.get(reason, 0) + n

    def value_counts(column: Any) -> dict[str, int]:
        return {e["values"]: e["counts"] for e in pc.value_counts(column).to_pylist()}

    sources = [src for src in sources if src.paths]
    part_args = (transform, args, work, schema, key)
    r = REBUILD_RESOURCES
    if not sources:
        batches: list[pa.Table] = []
    elif sum(src.size() for src in sources) <= one_task_bytes:
        task = ray.remote(num_cpus=r.num_cpus)(_rebuild_in_one_task)
        batches = [ray.get(task.remote(sources, *part_args))]
    else:
        datasets = [src.dataset() for src in sources]
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        ds = ds.map_batches(
            write_table_part,
            fn_args=part_args,
            batch_size=r.batch_size,
            batch_format="pyarrow",
            concurrency=r.concurrency,
            num_cpus=r.num_cpus,
        )
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    for batch in batches:
        for record in batch.to_pylist():
            done.rows += record["rows"]
            done.passed += record["passed"]
            if record["rows"]:
                parts.append(f"{work}/rows/{record['part']}")
            counts = json.loads(record["rejects"])
            if counts:
                rejects.append(f"{work}/rejects/{record['part']}")
            count(counts)
    if reject_parts:
        reasons = pads.dataset([manifest._fs(p)[1] for p in reject_parts], format="parquet", filesystem=fs)
        count(value_counts(reasons.to_table(columns=["reason"]).column("reason")))
    if more_rejects is not None and more_rejects.num_rows:
        manifest.write_part(f"{work}/rejects", "driver.parquet", more_rejects.cast(REJECTS_SCHEMA))
        rejects.append(f"{work}/rejects/driver.parquet")
        count(value_counts(more_rejects.column("reason")))
    manifest.publish_parts(output, name, stage, sorted(parts), schema, replace_table=True)
    manifest.publish_parts(output, "rejects", stage, sorted(rejects), REJECTS_SCHEMA)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    return done


def rejects_from(table: pa.Table, stage: str, id_column: str) -> pa.Table:
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


def count_by(values: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return counts


def stage_progress(
    config: RecapConfig,
    stage: str,
    total: int,
    unit: str,
    rate: str | None = None,
    progress: StageProgress | None = None,
) -> StageProgress:
    """A new progress line for `stage`, or `progress` (a streaming run's, already counting) grown by `total`."""
    if progress is not None:
        progress.grow(total)
        return progress
    return StageProgress(
        stage, total, unit, mode=config.ray.progress, log_interval_s=config.ray.log_interval_s, rate_counter=rate
    )


def stage_checkpoint(output: str, stage: str, checkpoint: StageCheckpoint | None) -> StageCheckpoint:
    """The run's checkpoint, or (a stage function called on its own) a fresh one for this call."""
    return checkpoint if checkpoint is not None else StageCheckpoint(output, stage, f"direct-{time.time_ns()}")
