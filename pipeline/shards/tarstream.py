"""Reading recap shards fast: tar members grouped into samples, as webdataset's `tarfile_to_samples` does.

The trainer's loader spends most of its time here, and Python's `tarfile` parses every header field of every
member (names, modes, owners, times, two checksums) through general code: on latent shards of a few tens of KiB
per member that was half of the loader's time. Shards are plain ustar (pipeline/shards/writer.py), so a member is
a 512-byte header, its bytes and padding to 512; this reader takes only name, size and type from the header and
verifies its checksum, which is all grouping needs. pax headers (`x`: path and size), GNU long names (`L`) and
global headers are understood, so any POSIX tar of a webdataset layout reads too; anything else that is not a
regular file (directories, links) is skipped, as webdataset skips it. Streams are opened by webdataset's own
`gopen` (local paths, `pipe:`, http, ...), so URLs mean what they mean to webdataset, and through fsspec for the
object stores gopen has no handler for (s3://, memory://, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import webdataset as wds
from webdataset.gopen import gopen_schemes

from pipeline.errors import StageInputError

BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # key = path up to the first dot of the base name, as webdataset


class ShardReadError(StageInputError):
    """A shard is not a readable tar of samples: truncated, a bad header, a member twice in one sample. Named with
    its URL; `recap manifest validate` tells which shards of a corpus are damaged."""


def _octal(field: bytes, url: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU): big sizes
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardReadError(f"{url}: bad number {field!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    return want == sum(header) - sum(header[148:156]) + 8 * 32


def _read(stream: BinaryIO, size: int, url: str, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ShardReadError(f"{url}: truncated in {what} ({len(data)} of {size} bytes)")
    return data


def _pax(data: bytes, url: str) -> dict[str, str]:
    """pax extended header records: '%d key=value\\n'."""
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length <= space - pos:
                raise ValueError(f"record length {length}")
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
            out[key.decode("utf-8")] = value.decode("utf-8")
            pos += length
    except ValueError as e:  # UnicodeDecodeError is one
        raise ShardReadError(f"{url}: bad pax extended header ({e})") from None
    return out


def _text(field: bytes, url: str) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ShardReadError(f"{url}: a member name is not UTF-8 (damaged shard?)") from None


def tar_members(stream: BinaryIO, url: str = "?") -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in a tar stream, in order."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if not header or header == bytes(BLOCK):
            return  # end of archive (or a stream cut exactly at a member boundary, as tarfile accepts)
        if len(header) != BLOCK:
            raise ShardReadError(f"{url}: truncated tar header")
        if not _checksum_ok(header):
            raise ShardReadError(f"{url}: tar header checksum mismatch (damaged shard)")
        kind = header[156:157]
        size = _octal(header[124:136], url)
        if "size" in pax:
            size = int(pax["size"])
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L", b"g"):
            data = _read(stream, padded, url, "an extended header")[:size]
            if kind == b"x":
                pax = _pax(data, url)
            elif kind == b"L":
                long_name = _text(data, url)
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = _text(header[0:100], url)
            prefix = _text(header[345:500], url) if header[257:262] == b"ustar" else ""
            if prefix:
                name = prefix + "/" + name
        long_name, pax = None, {}
        if kind not in (b"0", b"\0", b"7"):
            stream.read(padded)  # directories, links, devices: no bytes of a sample
            continue
        data = _read(stream, size, url, name)
        if padded != size:
            _read(stream, padded - size, url, "padding")
        yield name, data


def group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key -> {'__key__', '__url__', ext: bytes}, as webdataset's group_by_keys."""
    current: dict[str, Any] | None = None
    for name, data in members:
        match = _KEY.match(name)
        if match is None:
            continue  # no extension: not part of any sample (webdataset drops these too)
        key, ext = match.groups()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise ShardReadError(f"{url}: member {name} twice in one sample")
        current[ext] = data
    if current is not None:
        yield current


def open_shard(url: str) -> BinaryIO:
    """A shard's byte stream: webdataset's `gopen` for what it handles (local paths, `pipe:`, http, gs, ...), fsspec
    for any other URL scheme (s3://, gcs://, memory://, file://, ...), which `gopen` refuses."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url.startswith("pipe:") or not scheme or scheme in gopen_schemes:
        return wds.gopen(url, "rb", bufsize=1 << 20)
    import fsspec

    return fsspec.open(url, "rb", block_size=1 << 22).open()


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, members as raw bytes."""
    stream = open_shard(url)
    try:
        yield from group_samples(tar_members(stream, url), url)
    finally:
        stream.close()


def samples_of(urls: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A webdataset pipeline stage: {'url': ...} items (wds.SimpleShardList) -> samples."""
    for item in urls:
        yield from shard_samples(item["url"])
