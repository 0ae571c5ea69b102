"""Find input videos on local disks or any fsspec filesystem (s3://, gs://, memory://, ...).

Inputs may be files, directories (searched recursively) or glob patterns.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterable
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


class InputError(ValueError):
    """An input URI that does not exist or matches nothing."""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def open_binary(uri: str, mode: str = "rb") -> IO[bytes]:
    if is_local(uri):
        return open(local_path(uri), mode)  # noqa: SIM115 - the caller closes it
    return fsspec.open(uri, mode).open()


def _join(protocol: str | tuple, path: str) -> str:
    proto = protocol[0] if isinstance(protocol, tuple) else protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _has_magic(path: str) -> bool:
    return _glob.has_magic(path)


def _skip_reason(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    ext = os.path.splitext(name)[1].lower()
    return f"extension {ext} not in ingest.extensions" if ext else "no file extension"


def discover_inputs(
    inputs: Iterable[str], extensions: Iterable[str], skipped: dict[str, int] | None = None
) -> list[str]:
    """Every video file under `inputs`, filtered by extension, deduplicated and sorted. Files under a directory or
    glob that the extension filter leaves out are counted by reason in `skipped` (a file named explicitly is
    always taken)."""
    exts = tuple(e.lower() for e in extensions)
    found: set[str] = set()
    left_out: set[str] = set()
    for raw in inputs:
        uri = str(raw)
        if is_local(uri):
            path = os.path.abspath(os.path.expanduser(local_path(uri)))
            if _has_magic(path):
                matches = [m for m in _glob.glob(path, recursive=True) if os.path.isfile(m)]
            elif os.path.isdir(path):
                matches = [os.path.join(root, name) for root, _dirs, files in os.walk(path) for name in files]
            elif os.path.isfile(path):
                matches = [path]  # a file named explicitly is taken whatever its extension
                found.add(path)
                continue
            else:
                raise InputError(f"input {uri!r} does not exist")
            if not matches and _has_magic(path):
                raise InputError(f"input pattern {uri!r} matches no file")
            found.update(m for m in matches if m.lower().endswith(exts))
            left_out.update(m for m in matches if not m.lower().endswith(exts))
            if os.path.isdir(path):  # directories named like videos (x.mp4/) are not inputs either
                left_out.update(
                    os.path.join(root, d) + "/"
                    for root, dirs, _ in os.walk(path)
                    for d in dirs
                    if d.lower().endswith(exts)
                )
            continue
        fs: Any
        fs, path = url_to_fs(uri)
        if _has_magic(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
            if not matches:
                raise InputError(f"input pattern {uri!r} matches no file")
        elif fs.isdir(path):
            matches = fs.find(path)
        elif fs.isfile(path):
            found.add(_join(fs.protocol, path))
            continue
        else:
            raise InputError(f"input {uri!r} does not exist")
        found.update(_join(fs.protocol, p) for p in matches if p.lower().endswith(exts))
        left_out.update(p for p in matches if not p.lower().endswith(exts))
    if skipped is not None:
        for path in left_out - found:
            reason = "a directory named like a video" if path.endswith("/") else _skip_reason(path)
            skipped[reason] = skipped.get(reason, 0) + 1
    return sorted(found)
