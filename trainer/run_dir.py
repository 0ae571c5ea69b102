"""A run directory on a local path or on any fsspec URI (file://, memory://, s3://, gs://, ...): the few file
operations the trainer needs (join, read, write, list, rename), so checkpoints and metrics.jsonl go through one place.
"""

from __future__ import annotations

import os
from typing import Any


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path or a URI."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(path))


def protocol(path: str | os.PathLike) -> str:
    """'file' for local paths and file:// URIs, else the URI's scheme (memory, s3, gs, ...)."""
    return str(path).split("://", 1)[0] if is_uri(path) else "file"


def local_path(path: str | os.PathLike) -> str | None:
    """The path on this machine's filesystem (plain paths and file:// URIs), None for every other URI."""
    if not is_uri(path):
        return os.path.abspath(path)
    if protocol(path) == "file":
        return filesystem(path)[1]
    return None


def normalize(path: str | os.PathLike) -> str:
    """A run directory as a string: local paths made absolute, URIs kept as given (without a trailing slash)."""
    return str(path).rstrip("/") if is_uri(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) in a directory; empty when it does not exist."""
    fs, p = filesystem(path)
    if not fs.isdir(p):
        return []
    return sorted(basename(entry) for entry in fs.ls(p, detail=False))


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open(p, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    with fs.open(p, "w") as f:
        f.write(text)


def open_file(path: str, mode: str) -> Any:
    fs, p = filesystem(path)
    return fs.open(p, mode)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def move(src: str, dst: str) -> None:
    """Rename src to dst (replacing dst): one atomic rename on a local disk, a copy and delete on object stores."""
    fs, s = filesystem(src)
    d = filesystem(dst)[1]
    if fs.isdir(d):
        fs.rm(d, recursive=True)  # mv into an existing directory would nest src inside it
    fs.mv(s, d, recursive=True)
