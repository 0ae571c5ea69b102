"""Size- and count-bounded WebDataset tar shards, one open shard per latent shape (bucket).

A shard is a plain POSIX ustar archive (a pax header only for a member name or size that ustar cannot
hold): each member `KEY.ext` in sorted order of `ext`, mtime 0, uid/gid 0, user/group `bigdata`, mode
0444, so the same samples give the same bytes. It is written under a temporary name, fsynced, and
renamed only when complete to `shard-HHHHHHHHHHHHHHHH.tar`, named by a hash of its sorted sample keys: the
name is decided by the content, so parallel writers never collide and a retried write of the same samples
replaces the same file instead of adding a copy. Its sha256 and size are computed while writing. Local
paths and fsspec URIs both work (remote shards are staged locally, uploaded to `.NAME.partial`, then moved).

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
    keys: tuple[str, ...] = ()  # the samples' keys, in write order


def shard_name(keys: Any) -> str:
    """The file name of a shard holding samples `keys`: a hash of the sorted keys (keys contain no newline)."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()
    return f"shard-{digest[:16]}.tar"


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
    key: str,
    latent: np.ndarray | bytes,
    caption: str,
    meta: dict[str, Any],
    extra: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """The tar members of one sample, in the layout of ../shared/DESIGN.md (`latent`: an array, or its `.npy`
    bytes as `encode_latent` makes them)."""
    if not key or "." in key or "\n" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no dot or newline")
    sample = {
        "__key__": key,
        "latent.npy": latent if isinstance(latent, bytes) else encode_latent(latent),
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

    def __init__(self, bucket: str, tmp_dir: str):
        self.bucket = bucket
        self.keys: list[str] = []
        self.tmp_path = os.path.join(tmp_dir, f".shard-{uuid.uuid4().hex}.tmp")
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
        on_finish: Callable[[ShardInfo], None] | None = None,
    ):
        self.out_dir = out_dir.rstrip("/")
        self.max_bytes = max_bytes
        self.max_count = max_count
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
        return _OpenShard(bucket, self.stage_dir)

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

    def write(self, sample: dict[str, Any], bucket: str) -> None:
        """Add one sample (tar members by extension plus `__key__`) to the open shard of `bucket`."""
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
        shard.keys.append(sample["__key__"])

    def _finish(self, shard: _OpenShard) -> None:
        end = _ZEROS[: end_size(shard.size)]
        self._write(shard, [end], len(end))
        if self.local:
            assert shard.fd is not None
            os.fsync(shard.fd)  # the data is durable before the name appears (hashing goes on meanwhile)
        digest = shard.sha256()
        shard.close()
        name = shard_name(shard.keys)
        if self.local:
            os.replace(shard.tmp_path, os.path.join(self.stage_dir, name))
            self._renamed = True
        else:
            partial = f"{self.remote_dir}/.{name}.partial"
            try:
                self.fs.put_file(shard.tmp_path, partial)
                self.fs.mv(partial, f"{self.remote_dir}/{name}")
            except BaseException:
                with contextlib.suppress(Exception):
                    if self.fs.exists(partial):
                        self.fs.rm(partial)
                raise
            finally:
                os.unlink(shard.tmp_path)
        info = ShardInfo(name, shard.count, shard.size, digest, shard.bucket, tuple(shard.keys))
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
