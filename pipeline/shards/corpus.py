"""A corpus's shards and their manifest rows: written where the samples are, committed from small records.

A shard's writer (a Ray actor on the node that holds the latents, or the one process of `write_corpus_shards`)
writes the shard under `shards/` (temporary name, renamed when complete, named by its sorted keys), then the
shard's rows of the `samples` table as one Parquet file `samples/<shard>.parquet` in the stage's work directory
(`manifest/_work/<stage>/`), and hands back one small record per shard: its row of the `shards` table (name,
count, bytes, sha256, bucket, writer node). The driver commits the records to the stage checkpoint as they come;
a shard belongs to the corpus once its record is committed. A shard file or samples file without a committed
record is left over from a crash or a lost writer, and `remove_orphans` deletes it. At the end `publish` makes
the committed samples files the `samples` table (hard-linked on local disks, copied by the store elsewhere: the
driver never rewrites them) and the records the `shards` table.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest
from pipeline.schema import SAMPLES_SCHEMA, SHARDS_SCHEMA
from pipeline.shards.writer import ShardInfo, ShardWriter, bucket_of, sample_members


def shard_dir(out: str) -> str:
    return f"{out.rstrip('/')}/shards"


def samples_dir(work_uri: str) -> str:
    """Where the writers of a stage put each finished shard's samples rows."""
    return f"{work_uri.rstrip('/')}/samples"


def _stem(shard: str) -> str:
    return shard.removesuffix(".tar")


class CorpusShardWriter:
    """Shards plus each shard's samples rows, for one writer; `take()` returns the records of the shards finished
    since the last call (the caller commits them), `close()` finishes the open ones and returns theirs."""

    def __init__(
        self,
        out: str,
        work_uri: str,
        samples_schema: pa.Schema | None = None,
        max_bytes: int = 1 << 30,
        max_count: int = 10_000,
        node_id: str | None = None,
    ):
        self.schema = samples_schema or SAMPLES_SCHEMA
        self.node_id = node_id
        self.samples_uri = samples_dir(work_uri)
        self.shards = ShardWriter(shard_dir(out), max_bytes=max_bytes, max_count=max_count, on_finish=self._finished)
        self._rows: dict[str, dict[str, Any]] = {}  # samples rows of the open shards, by key (no payloads)
        self._records: list[dict[str, Any]] = []

    @property
    def pending(self) -> int:
        """Samples written into shards that are not finished yet."""
        return len(self._rows)

    def add(self, members: dict[str, Any], bucket: str, row: dict[str, Any]) -> None:
        """One sample: its tar `members` (with `__key__`) into the open shard of `bucket`, `row` for `samples`."""
        key = members["__key__"]
        if key in self._rows:
            raise ValueError(f"sample {key} was given twice to one shard writer")
        size = sum(len(v) for k, v in members.items() if not k.startswith("_"))
        self.shards.write(members, bucket)
        self._rows[key] = {**row, "key": key, "bytes": size}

    def _finished(self, info: ShardInfo) -> None:
        rows = [{**self._rows.pop(key), "shard": info.shard} for key in info.keys]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        manifest.write_part(self.samples_uri, f"{_stem(info.shard)}.parquet", table)
        self._records.append(
            {
                "shard": info.shard,
                "num_samples": info.num_samples,
                "bytes": info.bytes,
                "sha256": info.sha256,
                "bucket": info.bucket,
                "writer_node": self.node_id,
            }
        )

    def take(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records

    def close(self) -> list[dict[str, Any]]:
        self.shards.close()
        return self.take()

    def abort(self) -> None:
        self.shards.abort()
        self._rows.clear()


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SHARDS_SCHEMA)


def committed_records(checkpoint: Any) -> pa.Table:
    """The `shards` rows committed to a stage checkpoint so far (one per shard)."""
    table = checkpoint.read(schema=SHARDS_SCHEMA)
    return table if table is not None else SHARDS_SCHEMA.empty_table()


def committed_keys(checkpoint: Any, records: pa.Table | None = None) -> pa.Array:
    """The sample keys of the committed shards, read from their samples files (one Arrow column, no rows)."""
    records = committed_records(checkpoint) if records is None else records
    names = records.column("shard").to_pylist()
    if not names:
        return pa.array([], pa.string())
    fs, path = fsspec.core.url_to_fs(samples_dir(checkpoint.uri))
    keys = []
    for name in names:
        with fs.open(f"{path}/{_stem(name)}.parquet", "rb") as fh:
            keys.append(pq.read_table(fh, columns=["key"]).column("key"))
    return pa.chunked_array(keys, pa.string()).combine_chunks()


def remove_orphans(out: str, checkpoint: Any, keep: set[str]) -> int:
    """Delete shard files and samples files that no committed record vouches for, and temporaries of both.

    Safe only while no writer of the stage runs (at its start, and after its writers closed). Returns how
    many files were removed."""
    return manifest.remove_unlisted(shard_dir(out), keep, ".tar") + manifest.remove_unlisted(
        samples_dir(checkpoint.uri), {f"{_stem(name)}.parquet" for name in keep}
    )


def publish(out: str, checkpoint: Any, samples_schema: pa.Schema | None = None) -> dict[str, int]:
    """Make the committed shards the corpus's `samples` and `shards` tables (each swapped in whole)."""
    records = committed_records(checkpoint).sort_by("shard")
    names = records.column("shard").to_pylist()
    parts = [f"{samples_dir(checkpoint.uri)}/{_stem(name)}.parquet" for name in names]
    manifest.publish_parts(out, "samples", "samples", parts, samples_schema or SAMPLES_SCHEMA)
    manifest.write_table(out, "shards", records, prefix="shards")
    return {"samples": int(pc.sum(records.column("num_samples")).as_py() or 0), "shards": records.num_rows}


def keep_intact_shards(out: str, checkpoint: Any, damaged: set[str]) -> int:
    """Seed a checkpoint with a finished corpus's shards other than `damaged` (their records and samples files),
    so a re-run re-encodes only the samples of the damaged ones. Returns how many samples were kept."""
    shards = manifest.read_table(out, "shards").select(SHARDS_SCHEMA.names)
    shards = shards.filter(pc.invert(pc.is_in(shards.column("shard"), pa.array(sorted(damaged), pa.string()))))
    fs, path = fsspec.core.url_to_fs(samples_dir(checkpoint.uri))
    fs.makedirs(path, exist_ok=True)
    # `publish` made each shard's samples file a part of the table (`part-<shard stem>.parquet`): linked back,
    # not read. A table written otherwise (older runs) is split by shard here.
    _, published = fsspec.core.url_to_fs(f"{manifest.table_dir(out, 'samples')}/samples")
    names = shards.column("shard").to_pylist()
    linked = [n for n in names if fs.exists(f"{published}/part-{_stem(n)}.parquet")]
    for name in linked:
        manifest._link_or_copy(fs, f"{published}/part-{_stem(name)}.parquet", f"{path}/{_stem(name)}.parquet")
    rest = [n for n in names if n not in set(linked)]
    if rest:
        samples = manifest.read_table(out, "samples")
        for name in rest:
            with fs.open(f"{path}/{_stem(name)}.parquet", "wb") as fh:
                pq.write_table(samples.filter(pc.equal(samples.column("shard"), name)), fh, compression="zstd")
    checkpoint.commit(shards)
    return int(pc.sum(shards.column("num_samples")).as_py() or 0)


def write_corpus_shards(
    out: str,
    samples: Iterable[dict[str, Any]],
    max_bytes: int = 1 << 30,
    max_count: int = 10_000,
    samples_schema: pa.Schema | None = None,
    checkpoint: Any = None,
) -> dict[str, int]:
    """Write (key, latent, caption, meta) samples into `out/shards` and the `samples`/`shards` tables, in this
    process (the encode stage does the same on its Ray workers).

    `samples` yields dicts with `key`, `latent` (C, T, H, W), `caption`, `meta` (stored as KEY.json), optional
    `extra` (more tar members, e.g. {"text_emb.npy": bytes}) and `row` (more `samples` columns; `samples_schema`
    extends SAMPLES_SCHEMA for them). Resumable with a `checkpoint` (pipeline.resume.StageCheckpoint): each
    finished shard is committed once durable; shards an interrupted run committed stay (the caller skips their
    keys), other shard files are removed first.
    """
    from pipeline.resume import StageCheckpoint

    owned = checkpoint is None
    if owned:
        checkpoint = StageCheckpoint(out, "shards", f"direct-{uuid.uuid4().hex}")
    kept = set(committed_records(checkpoint).column("shard").to_pylist())
    remove_orphans(out, checkpoint, kept)
    writer = CorpusShardWriter(out, checkpoint.uri, samples_schema, max_bytes, max_count)

    def commit(records: list[dict[str, Any]]) -> None:
        if records:
            checkpoint.commit(records_table(records))

    try:
        for item in samples:
            latent = np.asarray(item["latent"])
            members = sample_members(item["key"], latent, item["caption"], item["meta"], item.get("extra"))
            row = {
                "latent_dtype": str(latent.dtype),  # bfloat16 latents are stored as uint16: the row names it
                **item.get("row", {}),
                "caption": item["caption"],
                "latent_shape": list(latent.shape),
            }
            writer.add(members, bucket_of(latent.shape), row)
            commit(writer.take())
        commit(writer.close())
    except BaseException:
        writer.abort()
        raise
    counts = publish(out, checkpoint, samples_schema)
    if owned:
        checkpoint.clear()
    return {**counts, "resumed_shards": len(kept)}
