"""Size- and count-bounded WebDataset tar shards, one open shard per latent shape (bucket).

A shard is a plain POSIX ustar archive (a pax header only for a member name or size that ustar cannot
hold): each member `KEY.ext` in sorted order of `ext`, mtime 0, uid/gid 0, user/group `bigdata`, mode
0444, so the same samples give the same bytes. It is written under a temporary name, fsynced, and
renamed to `shard-NNNNNN.tar` only when complete; its sha256 and size are computed while writing.
Parallel writers never collide: writer `w` of `n` uses shard numbers w, w+n, w+2n, ... Local paths and
fsspec URIs both work (remote shards are staged locally, uploaded to `.NAME.partial`, then moved).

Speed: each sample goes to the file in one `os.writev` (tar headers and padding around the payload
buffers, no copy of large payloads); sha256 runs on the same buffers in a thread per open shard
(hashlib releases the GIL on large buffers), so hashing overlaps writing and shards of different
buckets hash in parallel; a local shard asks the kernel to start writeback as it grows, so the one
fsync per shard has little left to wait for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline.io.sources import is_local, local_path

TAR_END = 10240  # tarfile pads the end of an archive to a 10 KiB record

_BLOCK = tarfile.BLOCKSIZE  # 512: headers and payloads are padded to whole blocks
_RECORD = tarfile.RECORDSIZE  # 10240: the archive ends on a whole record
_ZEROS = bytes(_RECORD + 2 * _BLOCK)
_SMALL = 64 << 10  # pieces below this are joined into one buffer before writing and hashing
_MAX_PENDING = 64  # writes not hashed yet (all shards of a writer) ...
_MAX_PENDING_BYTES = 64 << 20  # ... and their bytes: bounds the memory held for hashing
_IOV_MAX = 1024
_WRITEBACK_EVERY = 8 << 20  # a local shard asks the kernel to start writing back every 8 MiB
_USER = "bigdata"  # user and group names in every header (as webdataset.TarWriter writes them)
_MODE = 0o444
# The fixed fields of a ustar header after name, mode, uid, gid, size: mtime 0, the checksum
# placeholder (8 spaces), a regular file, no link, magic "ustar\0" version "00", user and group names,
# no device numbers, no prefix, and padding to 512 bytes.
_HEAD_MODE = b"%07o\x00" % _MODE + b"0000000\x00" * 2
_HEAD_TAIL = (
    b"00000000000\x00"
    + b" " * 8
    + tarfile.REGTYPE
    + bytes(100)
    + tarfile.POSIX_MAGIC
    + _USER.encode().ljust(32, b"\x00") * 2
    + bytes(16 + 155 + 12)
)
_MAX_USTAR_SIZE = 8**11  # 11 octal digits


@dataclass
class ShardInfo:
    shard: str
    num_samples: int
    bytes: int
    sha256: str
    bucket: str


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular-file member: ustar, or pax when ustar cannot hold name or size.

    Byte-identical to `tarfile.TarInfo.tobuf` for the same fields; the common case is built directly
    (tobuf costs more than writing a small member).
    """
    raw = name.encode("utf-8")
    if len(raw) <= 100 and 0 <= size < _MAX_USTAR_SIZE:
        head = bytearray(raw.ljust(100, b"\x00") + _HEAD_MODE + b"%011o\x00" % size + _HEAD_TAIL)
        head[148:156] = b"%06o\x00 " % sum(head)  # the checksum counts its own field as 8 spaces
        return bytes(head)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, _MODE, _USER, _USER
    try:
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")  # a long name with a '/' splits
    except ValueError:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def end_size(offset: int) -> int:
    """Bytes that close an archive of `offset` bytes: two zero blocks, then zeros to a whole record."""
    end = offset + 2 * _BLOCK
    return end + (-end % _RECORD) - offset


def tar_pieces(sample: dict[str, Any]) -> list[bytes]:
    """The tar bytes of one sample as a few buffers: members `KEY.ext` in sorted order of `ext`.

    Keys starting with `_` (`__key__`, `__url__`, ...) are not members. Small pieces (headers, padding,
    short payloads) are joined; a large payload stays its own buffer, not copied.
    """
    if "__key__" not in sample:
        raise ValueError("sample must contain a __key__")
    key = sample["__key__"]
    pieces: list[bytes] = []
    small: list[bytes] = []
    for ext in sorted(sample):
        if ext.startswith("_"):
            continue
        value = sample[ext]
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, bytes):
            if not isinstance(value, (bytearray, memoryview)):
                raise ValueError(f"{ext} must be bytes, got {type(value)}")
            value = bytes(value)  # hashed after write() returns: never a buffer the caller may change
        size = len(value)
        small.append(tar_header(f"{key}.{ext}", size))
        if size < _SMALL:
            small.append(value)
        else:
            pieces.append(b"".join(small))
            pieces.append(value)
            small = []
        if size % _BLOCK:
            small.append(_ZEROS[: _BLOCK - size % _BLOCK])
    if small:
        pieces.append(b"".join(small))
    return pieces


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """Write every piece in order: one writev call per up to IOV_MAX pieces, resuming short writes."""
    views: list[Any] = list(pieces)
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        done = 0
        for piece in batch:
            if written < len(piece):
                break
            written -= len(piece)
            done += 1
        del views[:done]
        if written:
            views[0] = memoryview(views[0])[written:]


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
    """One shard being written: its temporary file, running size, and sha256 computed in its own thread.

    Each open shard hashes in its own thread, in write order, so shards of different buckets hash in
    parallel while the writing thread goes on.
    """

    def __init__(self, number: int, bucket: str, tmp_dir: str):
        self.name = f"shard-{number:06d}.tar"
        self.bucket = bucket
        self.tmp_path = os.path.join(tmp_dir, f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.fd: int | None = os.open(self.tmp_path, flags, 0o666)
        self._close_fd = weakref.finalize(self, os.close, self.fd)  # also if the writer is dropped unclosed
        self.digest = hashlib.sha256()
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="recap-shard-sha256")
        self.hashing: list[Future[None]] = []
        self.size = 0  # bytes written so far
        self.count = 0
        self.written_back = 0  # bytes handed to early writeback (by the hashing thread)

    def write(self, pieces: list[bytes], nbytes: int, writeback: bool) -> Future[None]:
        """Write `pieces` at the end of the file; hash them (and hint writeback) in the shard's thread."""
        assert self.fd is not None
        _write_all(self.fd, pieces)
        self.size += nbytes
        future = self.hasher.submit(self._hash, pieces, self.size if writeback else 0)
        self.hashing.append(future)
        return future

    def _hash(self, pieces: list[bytes], written: int) -> None:
        for piece in pieces:
            self.digest.update(piece)
        if written - self.written_back >= _WRITEBACK_EVERY:
            self._start_writeback(written)

    def _start_writeback(self, written: int) -> None:
        """Ask the kernel to start writing bytes up to `written` to disk now, not all at the final fsync.

        POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty pages of the range (and drops
        the pages that are already clean: a shard is not read back soon), so most of the data is on
        disk by the time `fsync` runs. A hint only: it changes neither the bytes nor the guarantees.
        It runs in the hashing thread, off the writing thread.
        """
        if hasattr(os, "posix_fadvise") and self.fd is not None:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.written_back, written - self.written_back, os.POSIX_FADV_DONTNEED)
        self.written_back = written

    def sha256(self) -> str:
        """Wait for every queued piece to be hashed; the hex digest of all bytes written."""
        for future in self.hashing:
            future.result()
        self.hashing.clear()
        self.hasher.shutdown(wait=True)
        return self.digest.hexdigest()

    def close(self) -> None:
        self.hasher.shutdown(wait=True, cancel_futures=True)  # first: a hashing task may still use the fd
        self.fd = None
        self._close_fd()


class ShardWriter:
    """Writes samples into bounded shards under `out_dir`; `close()` returns what was written.

    A shard never exceeds `max_bytes` (its end-of-archive padding included) unless one sample alone
    is bigger, and never holds more than `max_count` samples.
    """

    def __init__(
        self,
        out_dir: str,
        max_bytes: int = 1 << 30,
        max_count: int = 10_000,
        writer_index: int = 0,
        num_writers: int = 1,
        first_number: int = 0,
        on_finish: Callable[[ShardInfo], None] | None = None,
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
        self._pending: deque[tuple[Future[None], int]] = deque()  # written, maybe not hashed yet
        self._pending_bytes = 0
        self._renamed = False
        self.on_finish = on_finish

    def _new(self, bucket: str) -> _OpenShard:
        if not self.local:
            os.makedirs(self.stage_dir, exist_ok=True)  # removed by close(); a writer may go on after it
        shard = _OpenShard(self.next_number, bucket, self.stage_dir)
        self.next_number += self.step
        return shard

    def _write(self, shard: _OpenShard, pieces: list[bytes], nbytes: int) -> None:
        """Write to `shard`, first waiting for hashing if too many written bytes are not hashed yet.

        The bound keeps the memory held for hashing small when hashing is slower than writing. Past it,
        wait until half of it is hashed: one wait per many samples, not a thread hand-off per sample
        (each hand-off costs a scheduler wake-up, long on a busy machine).
        """
        pending = self._pending
        while pending and pending[0][0].done():
            self._pending_bytes -= pending.popleft()[1]
        if len(pending) >= _MAX_PENDING or self._pending_bytes > _MAX_PENDING_BYTES:
            while pending and (len(pending) > _MAX_PENDING // 2 or self._pending_bytes > _MAX_PENDING_BYTES // 2):
                future, done_bytes = pending.popleft()
                self._pending_bytes -= done_bytes
                future.result()
        pending.append((shard.write(pieces, nbytes, self.local), nbytes))
        self._pending_bytes += nbytes

    def write(self, sample: dict[str, Any], bucket: str) -> str:
        """Add one sample (tar members by extension plus `__key__`); returns its shard's final name."""
        pieces = tar_pieces(sample)
        nbytes = sum(len(p) for p in pieces)
        shard = self.open.get(bucket)
        if (
            shard is not None
            and shard.count
            and (shard.count >= self.max_count or shard.size + nbytes + end_size(shard.size + nbytes) > self.max_bytes)
        ):
            self._finish(shard)
            shard = None
        if shard is None:
            shard = self.open[bucket] = self._new(bucket)
        self._write(shard, pieces, nbytes)
        shard.count += 1
        return shard.name

    def _finish(self, shard: _OpenShard) -> None:
        end = _ZEROS[: end_size(shard.size)]
        self._write(shard, [end], len(end))
        if self.local:
            assert shard.fd is not None
            os.fsync(shard.fd)  # the data is durable before the name appears (hashing goes on meanwhile)
        digest = shard.sha256()
        shard.close()
        if self.local:
            os.replace(shard.tmp_path, os.path.join(self.stage_dir, shard.name))
            self._renamed = True
        else:
            partial = f"{self.remote_dir}/.{shard.name}.partial"
            try:
                self.fs.put_file(shard.tmp_path, partial)
                self.fs.mv(partial, f"{self.remote_dir}/{shard.name}")
            except BaseException:
                with contextlib.suppress(Exception):
                    if self.fs.exists(partial):
                        self.fs.rm(partial)
                raise
            finally:
                os.unlink(shard.tmp_path)
        info = ShardInfo(shard.name, shard.count, shard.size, digest, shard.bucket)
        self.done.append(info)
        self.open.pop(shard.bucket, None)
        if self.on_finish is not None:  # e.g. commit the shard's samples: only once its name is durable
            self._sync_dir()
            self.on_finish(info)

    def _sync_dir(self) -> None:
        """Make the renames durable: fsync the directory once, after the last shard is in place."""
        if self.local and self._renamed and hasattr(os, "O_DIRECTORY"):
            fd = os.open(self.stage_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._renamed = False

    def close(self) -> list[ShardInfo]:
        for shard in list(self.open.values()):
            self._finish(shard)
        self._sync_dir()
        self._release()
        return self.done

    def abort(self) -> None:
        """Drop unfinished shards (their temporaries), keeping completed ones."""
        for shard in list(self.open.values()):
            shard.close()
            if os.path.exists(shard.tmp_path):
                os.unlink(shard.tmp_path)
        self.open.clear()
        self._release()

    def _release(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        if not self.local:
            shutil.rmtree(self.stage_dir, ignore_errors=True)


SHARD_COLUMNS = ("shard_bytes", "shard_sha256", "shard_bucket", "shard_num_samples")


def shard_number(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(".tar"))


def write_corpus_shards(
    out: str,
    samples: Any,
    max_bytes: int = 1 << 30,
    max_count: int = 10_000,
    samples_schema: Any = None,
    checkpoint: Any = None,
) -> dict[str, int]:
    """Write (key, latent, caption, meta) samples into `out/shards` and the `samples`/`shards` tables.

    `samples` yields dicts with `key`, `latent` (C, T, H, W), `caption`, `meta` (the clip's metadata,
    stored as KEY.json), optional `extra` (more tar members, e.g. {"text_emb.npy": bytes}) and `row` (more
    `samples` columns: vae, num_frames, ..., the clip's scores; `samples_schema` extends SAMPLES_SCHEMA for them).

    Resumable with a `checkpoint` (pipeline.resume.StageCheckpoint): each finished shard's samples are
    committed once the shard is durable under its final name. Shards of an earlier, interrupted run that were
    committed stay (the caller skips their keys); any other shard file or temporary is removed first, and new
    shards are numbered after the committed ones.
    """
    import pyarrow as pa

    from pipeline import manifest
    from pipeline.resume import StageCheckpoint
    from pipeline.schema import SAMPLES_SCHEMA, SHARDS_SCHEMA

    schema = samples_schema or SAMPLES_SCHEMA
    commit_schema = pa.schema(
        list(schema)
        + [
            pa.field("shard_bytes", pa.int64()),
            pa.field("shard_sha256", pa.string()),
            pa.field("shard_bucket", pa.string()),
            pa.field("shard_num_samples", pa.int64()),
        ]
    )
    owned = checkpoint is None
    if owned:
        checkpoint = StageCheckpoint(out, "shards", f"direct-{uuid.uuid4().hex}")
    shard_dir = f"{out.rstrip('/')}/shards"
    committed = checkpoint.read(schema=commit_schema)
    kept = set(committed.column("shard").to_pylist()) if committed is not None else set()
    _remove_uncommitted(shard_dir, kept)
    first = max((shard_number(n) for n in kept), default=-1) + 1
    rows_by_shard: dict[str, list[dict[str, Any]]] = {}

    def commit(info: ShardInfo) -> None:
        rows = rows_by_shard.pop(info.shard)
        extra = {
            "shard_bytes": info.bytes,
            "shard_sha256": info.sha256,
            "shard_bucket": info.bucket,
            "shard_num_samples": info.num_samples,
        }
        checkpoint.commit(pa.Table.from_pylist([{**r, **extra} for r in rows], schema=commit_schema))

    writer = ShardWriter(shard_dir, max_bytes=max_bytes, max_count=max_count, first_number=first, on_finish=commit)
    try:
        for item in samples:
            latent = np.asarray(item["latent"])
            members = sample_members(item["key"], latent, item["caption"], item["meta"], item.get("extra"))
            shard = writer.write(members, bucket_of(latent.shape))
            rows_by_shard.setdefault(shard, []).append(
                {
                    "latent_dtype": str(latent.dtype),  # bfloat16 latents are stored as uint16: the row names it
                    **item.get("row", {}),
                    "key": item["key"],
                    "shard": shard,
                    "caption": item["caption"],
                    "latent_shape": list(latent.shape),
                    "bytes": sum(len(v) for k, v in members.items() if k != "__key__"),
                }
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    table = checkpoint.read(schema=commit_schema)
    table = table if table is not None else commit_schema.empty_table()
    manifest.write_table(out, "samples", table.select(schema.names), prefix="samples", schema=schema)
    shards: dict[str, dict[str, Any]] = {}
    for row in table.select(["shard", *SHARD_COLUMNS]).to_pylist():
        shards[row["shard"]] = {
            "shard": row["shard"],
            "num_samples": row["shard_num_samples"],
            "bytes": row["shard_bytes"],
            "sha256": row["shard_sha256"],
            "bucket": row["shard_bucket"],
        }
    ordered = [shards[name] for name in sorted(shards)]
    manifest.write_table(out, "shards", pa.Table.from_pylist(ordered, schema=SHARDS_SCHEMA), prefix="shards")
    if owned:
        checkpoint.clear()
    return {"samples": table.num_rows, "shards": len(ordered), "resumed_shards": len(kept)}


def _remove_uncommitted(shard_dir: str, keep: set[str]) -> None:
    """Delete shard files no checkpoint commit vouches for (a crash between rename and commit), and temporaries."""
    fs, path = fsspec.core.url_to_fs(shard_dir)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        name = entry.rsplit("/", 1)[-1]
        stray = name.startswith(".") and (name.endswith((".tmp", ".partial")))
        if stray or (name.startswith("shard-") and name.endswith(".tar") and name not in keep):
            fs.rm(entry)
