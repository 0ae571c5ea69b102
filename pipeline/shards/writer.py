"""Size- and count-bounded WebDataset tar shards, one open shard per latent shape (bucket).

A shard is written under a temporary name and renamed to `shard-NNNNNN.tar` only when complete; the
sha256 is computed while writing. Parallel writers never collide: writer `w` of `n` uses shard
numbers w, w+n, w+2n, ... Local paths and fsspec URIs both work (remote shards are staged locally).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np

from pipeline.io.sources import is_local, local_path

TAR_END = 10240  # tarfile pads the end of an archive to a 10 KiB record


@dataclass
class ShardInfo:
    shard: str
    num_samples: int
    bytes: int
    sha256: str
    bucket: str


class _HashingFile(io.RawIOBase):
    """Counts and hashes every byte written through it."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.fh.write(view)


def encode_latent(latent: np.ndarray) -> bytes:
    """`.npy` bytes (float16, or bfloat16 stored as uint16 by the caller); never pickled."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent), allow_pickle=False)
    return buf.getvalue()


def sample_members(
    key: str, latent: np.ndarray, caption: str, meta: dict[str, Any], extra: dict[str, bytes] | None = None
) -> dict[str, Any]:
    """The tar members of one sample, in the layout of ../shared/DESIGN.md."""
    if not key or "." in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no dot")
    sample = {
        "__key__": key,
        "latent.npy": encode_latent(latent),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    sample.update(extra or {})
    return sample


def bucket_of(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(d)) for d in shape)


class _OpenShard:
    def __init__(self, number: int, bucket: str, tmp_dir: str):
        import webdataset as wds

        self.name = f"shard-{number:06d}.tar"
        self.bucket = bucket
        self.tmp_path = os.path.join(tmp_dir, f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.raw = open(self.tmp_path, "wb", buffering=8 << 20)  # noqa: SIM115 - closed in finish()
        self.hashing = _HashingFile(self.raw)
        self.tar = wds.TarWriter(self.hashing, encoder=False, mtime=0.0)  # mtime 0: same bytes on re-runs
        self.count = 0

    def add(self, sample: dict[str, Any]) -> None:
        self.tar.write(sample)
        self.count += 1

    def finish(self) -> None:
        self.tar.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()


class ShardWriter:
    """Writes samples into bounded shards under `out_dir`; `close()` returns what was written."""

    def __init__(
        self,
        out_dir: str,
        max_bytes: int = 1 << 30,
        max_count: int = 10_000,
        writer_index: int = 0,
        num_writers: int = 1,
        first_number: int = 0,
    ):
        if not 0 <= writer_index < num_writers:
            raise ValueError(f"writer_index {writer_index} must be in [0, {num_writers})")
        self.out_dir = out_dir.rstrip("/")
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.step = num_writers
        self.next_number = first_number + writer_index
        self.local = is_local(out_dir)
        if self.local:
            self.stage_dir = local_path(self.out_dir)
            os.makedirs(self.stage_dir, exist_ok=True)
        else:
            self.stage_dir = tempfile.mkdtemp(prefix="recap-shards-")
            self.fs, self.remote_dir = fsspec.core.url_to_fs(self.out_dir)
            self.fs.makedirs(self.remote_dir, exist_ok=True)
        self.open: dict[str, _OpenShard] = {}
        self.done: list[ShardInfo] = []

    def _new(self, bucket: str) -> _OpenShard:
        shard = _OpenShard(self.next_number, bucket, self.stage_dir)
        self.next_number += self.step
        return shard

    def write(self, sample: dict[str, Any], bucket: str) -> str:
        """Add one sample (tar members by extension plus `__key__`); returns its shard's final name."""
        size = sum(len(v) for k, v in sample.items() if k != "__key__") + 512 * (len(sample) - 1) * 2
        shard = self.open.get(bucket)
        if (
            shard is not None
            and shard.count
            and (shard.count >= self.max_count or shard.hashing.size + size + TAR_END > self.max_bytes)
        ):
            self._finish(shard)
            shard = None
        if shard is None:
            shard = self.open[bucket] = self._new(bucket)
        shard.add(sample)
        return shard.name

    def _finish(self, shard: _OpenShard) -> None:
        shard.finish()
        if self.local:
            os.replace(shard.tmp_path, os.path.join(self.stage_dir, shard.name))
        else:
            partial = f"{self.remote_dir}/.{shard.name}.partial"
            self.fs.put_file(shard.tmp_path, partial)
            self.fs.mv(partial, f"{self.remote_dir}/{shard.name}")
            os.unlink(shard.tmp_path)
        self.done.append(
            ShardInfo(shard.name, shard.count, shard.hashing.size, shard.hashing.digest.hexdigest(), shard.bucket)
        )
        self.open.pop(shard.bucket, None)

    def close(self) -> list[ShardInfo]:
        for shard in list(self.open.values()):
            self._finish(shard)
        return self.done

    def abort(self) -> None:
        """Drop unfinished shards (their temporaries), keeping completed ones."""
        for shard in list(self.open.values()):
            shard.raw.close()
            if os.path.exists(shard.tmp_path):
                os.unlink(shard.tmp_path)
        self.open.clear()


def write_corpus_shards(out: str, samples: Any, max_bytes: int = 1 << 30, max_count: int = 10_000) -> dict[str, int]:
    """Write (key, latent, caption, meta) samples into `out/shards` and the `samples`/`shards` tables.

    `samples` yields dicts with `key`, `latent` (C, T, H, W), `caption`, `meta` (the clip's metadata,
    stored as KEY.json) and `row` (extra `samples` columns: vae, num_frames, frame_stride, height, width).
    """
    import pyarrow as pa

    from pipeline import manifest
    from pipeline.schema import SAMPLES_SCHEMA, SHARDS_SCHEMA

    writer = ShardWriter(f"{out.rstrip('/')}/shards", max_bytes=max_bytes, max_count=max_count)
    manifest.clear_parts(out, "samples")
    sample_writer = manifest.TableWriter(out, "samples", prefix="samples", schema=SAMPLES_SCHEMA)
    rows: list[dict[str, Any]] = []
    try:
        for item in samples:
            latent = np.asarray(item["latent"])
            members = sample_members(item["key"], latent, item["caption"], item["meta"])
            shard = writer.write(members, bucket_of(latent.shape))
            rows.append(
                {
                    **item.get("row", {}),
                    "key": item["key"],
                    "shard": shard,
                    "caption": item["caption"],
                    "latent_shape": list(latent.shape),
                    "latent_dtype": str(latent.dtype),
                    "bytes": sum(len(v) for k, v in members.items() if k != "__key__"),
                }
            )
            if len(rows) >= 1000:
                sample_writer.write_rows(rows)
                rows = []
    except BaseException:
        writer.abort()
        raise
    sample_writer.write_rows(rows)
    infos = writer.close()
    sample_writer.close()
    manifest.write_table(
        out,
        "shards",
        pa.Table.from_pylist([vars(i) for i in infos], schema=SHARDS_SCHEMA),
        prefix="shards",
        schema=SHARDS_SCHEMA,
    )
    return {"samples": sample_writer.rows_written, "shards": len(infos)}
