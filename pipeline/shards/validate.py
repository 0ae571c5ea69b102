"""Check a corpus's shards against its manifest: presence, size, sha256, members, every sample loadable.

Returns a list of precise problems (empty when the corpus is sound); `recap manifest validate` exits
non-zero when there is any.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from typing import Any

import fsspec
import numpy as np

from pipeline import manifest

REQUIRED_MEMBERS = ("latent.npy", "txt", "json")


def _shard_dir(out: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(f"{out.rstrip('/')}/shards")


def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def validate_corpus(out: str, check_samples: bool = True) -> list[str]:
    from pipeline.errors import CorruptTableError
    from pipeline.schema import TABLES

    problems: list[str] = []
    for table in TABLES:  # every table's files open as Parquet (a damaged one is named, never skipped)
        try:
            manifest.table_columns(out, table)
            if manifest.table_exists(out, table):
                manifest.read_table(out, table, columns=[])
        except CorruptTableError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    if not manifest.table_exists(out, "shards"):
        return [f"{out}: no shards table in the manifest"]
    shards = manifest.read_table(out, "shards").to_pylist()
    samples = manifest.read_table(out, "samples").to_pylist() if manifest.table_exists(out, "samples") else []
    fs, shard_dir = _shard_dir(out)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(shard_dir, detail=False)} if fs.exists(shard_dir) else set()
    listed = {s["shard"] for s in shards}
    for name in sorted(present - listed):
        problems.append(f"shards/{name}: file not in the manifest (unknown or left over from a crash)")
    vaes = {(s.get("vae"), s.get("vae_sha256")) for s in samples if s.get("vae_sha256")}
    if len(vaes) > 1:
        problems.append(f"samples: latents from {len(vaes)} different VAEs: {sorted(v for v, _ in vaes)}")
    key_counts = Counter(s["key"] for s in samples)
    for key, n in sorted(key_counts.items()):
        if n > 1:
            problems.append(f"samples: key {key} listed {n} times")
    expected_keys: dict[str, dict[str, dict[str, Any]]] = {}
    for s in samples:
        expected_keys.setdefault(s["shard"], {})[s["key"]] = s
    seen_keys: Counter[str] = Counter()
    for shard in shards:
        name = shard["shard"]
        if name not in present:
            problems.append(f"shards/{name}: missing")
            continue
        path = f"{shard_dir}/{name}"
        with fs.open(path, "rb") as fh:
            data = fh.read()
        if len(data) != shard["bytes"]:
            problems.append(f"shards/{name}: {len(data)} bytes, manifest says {shard['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            problems.append(f"shards/{name}: sha256 {digest[:12]}…, manifest says {shard['sha256'][:12]}…")
        problems += _check_members(name, data, shard, expected_keys.get(name, {}), seen_keys, check_samples)
    for key, n in sorted(seen_keys.items()):
        if n > 1:
            problems.append(f"key {key} appears in {n} shards")
    return problems


def _check_members(
    name: str,
    data: bytes,
    shard: dict[str, Any],
    expected: dict[str, dict[str, Any]],
    seen_keys: Counter[str],
    check_samples: bool,
) -> list[str]:
    problems: list[str] = []
    members: dict[str, dict[str, bytes]] = {}
    names: Counter[str] = Counter()  # every member name once: a repeated one would collapse in `members`
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                names[info.name] += 1
                key, ext = _split_member(info.name)
                fh = tar.extractfile(info)
                members.setdefault(key, {})[ext] = fh.read() if fh else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        return [f"shards/{name}: not a readable tar ({exc})"]
    times: dict[str, int] = {}  # how often each key's samples appear: its most repeated member
    repeated: dict[str, list[str]] = {}
    for member, n in names.items():
        key, ext = _split_member(member)
        times[key] = max(times.get(key, 0), n)
        if n > 1:
            repeated.setdefault(key, []).append(ext)
    for key, exts in sorted(repeated.items()):
        problems.append(
            f"shards/{name}: sample {key} appears {times[key]} times (members {', '.join(sorted(exts))} repeated); "
            "a reader yields it more than once"
        )
    stored_samples = sum(times.values())
    if stored_samples != shard["num_samples"]:
        problems.append(f"shards/{name}: {stored_samples} samples, manifest says {shard['num_samples']}")
    for key in sorted(set(expected) - set(members)):
        problems.append(f"shards/{name}: sample {key} listed in the manifest is missing")
    for key in sorted(set(members) - set(expected)):
        problems.append(f"shards/{name}: sample {key} is not in the samples table")
    for key, parts in sorted(members.items()):
        seen_keys[key] += 1
        missing = [m for m in REQUIRED_MEMBERS if m not in parts]
        if missing:
            problems.append(f"shards/{name}: sample {key} lacks {', '.join(missing)}")
            continue
        if not check_samples:
            continue
        try:
            arrays = {
                ext: np.load(io.BytesIO(v), allow_pickle=False) for ext, v in parts.items() if ext.endswith(".npy")
            }
            json.loads(parts["json"])
            parts["txt"].decode("utf-8")
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            problems.append(f"shards/{name}: sample {key} does not load ({exc})")
            continue
        row = expected.get(key)
        if row is not None:
            problems += [f"shards/{name}: sample {key} {p}" for p in _check_arrays(arrays, row)]
            caption = parts["txt"].decode("utf-8")
            if row.get("caption") is not None and caption != row["caption"]:
                problems.append(
                    f"shards/{name}: sample {key} caption {_clip(caption)} differs from samples.caption "
                    f"{_clip(row['caption'])}"
                )
    return problems


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _check_arrays(arrays: dict[str, np.ndarray], row: dict[str, Any]) -> list[str]:
    """A sample's arrays against its samples-table row: shape, stored dtype, the optional members it promises."""
    latent = arrays["latent.npy"]
    problems = []
    if list(latent.shape) != list(row["latent_shape"]):
        problems.append(f"latent {latent.shape}, manifest says {row['latent_shape']}")
    stored = {"bfloat16": "uint16"}.get(row.get("latent_dtype") or "", row.get("latent_dtype"))
    if stored and latent.dtype.name != stored:
        problems.append(f"latent dtype {latent.dtype.name}, manifest says {row['latent_dtype']}")
    if row.get("logvar_stored"):
        logvar = arrays.get("logvar.npy")
        if logvar is None or logvar.shape != latent.shape:
            problems.append(f"logvar.npy {'missing' if logvar is None else logvar.shape}, expected {latent.shape}")
    if row.get("has_text_emb"):
        emb = arrays.get("text_emb.npy")
        if emb is None or emb.ndim != 2:
            problems.append(f"text_emb.npy {'missing' if emb is None else emb.shape}, expected (tokens, dim)")
    return problems
