"""Training batches from recap shards: a webdataset pipeline whose position can be saved and restored exactly.

The stream of each reader (rank x DataLoader worker) is cut into *windows* of a few shards. A window's shards
(drawn with replacement, or an epoch's share split by node and worker), its shuffle and its shape buckets depend
only on (seed, rank, worker, window index), so a reader's position is just (window, batches already taken from
it): resuming re-reads that window's tars and skips the batches taken, without decoding them. Leftover samples
that do not fill a batch at the end of a window are dropped (drop_last per window). This is the iterator state
webdataset itself declines to keep (webdataset#271).
"""

from __future__ import annotations

import functools
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds

from pipeline.errors import StageInputError
from pipeline.shards.tarstream import samples_of, shard_samples
from trainer.config import DataConfig

STATE_VERSION = 1
MAX_EMPTY_WINDOWS = 64  # windows in a row without one full batch before the reader gives up


class DataError(StageInputError):
    """The data to train on cannot be used as asked: no shards, mixed VAEs, an unknown filter column, ..."""


class VaeMismatchError(DataError):
    """Latents from different VAEs, or a sampling VAE that is not the one the corpus was encoded with."""


# ---------------------------------------------------------------------------------------------
# finding the shards and what they hold


@dataclass
class Corpus:
    """What the trainer needs to know before reading: shard URLs, the samples kept, the VAE and text layout."""

    urls: list[str]
    roots: list[str] = field(default_factory=list)  # corpus directories read through their manifests
    keys: frozenset[str] | None = None  # samples kept by the manifest filters; None: all
    vae: dict[str, Any] = field(default_factory=dict)  # vae, vae_sha256, vae_spec, vae_scaling_factor, ...
    latent_channels: int = 0
    latent_shape: tuple[int, ...] = ()  # the most common shape (the sampler's default)
    text_emb_dim: int | None = None  # samples carry KEY.text_emb.npy of this width
    text_encoder: str | None = None  # the encoder that made them, as recorded in KEY.json
    num_samples: int | None = None

    def summary(self) -> str:
        kept = f"{self.num_samples} samples" if self.num_samples is not None else "samples: unknown (no manifest)"
        text = f"text_emb.npy (D={self.text_emb_dim})" if self.text_emb_dim else "captions (encoded while training)"
        return f"{len(self.urls)} shards, {kept}, VAE {self.vae.get('vae')}, latent C={self.latent_channels}, {text}"


def _is_corpus(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(f"{p}/manifest") and fs.isdir(f"{p}/shards")


def _corpus_root(spec: str) -> str | None:
    spec = spec.rstrip("/")
    if spec.endswith("/manifest/run.json"):
        return spec[: -len("/manifest/run.json")]
    if spec.endswith("/manifest") and _is_corpus(spec[: -len("/manifest")]):
        return spec[: -len("/manifest")]
    return spec if _is_corpus(spec) else None


def _expand(spec: str) -> list[str]:
    """Shard URLs named by a directory, a glob, a brace pattern (shard-{000000..000009}.tar) or one URL."""
    if spec.startswith("pipe:"):
        return wds.shardlists.expand_urls(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
    if fs.isdir(path):
        found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    elif any(ch in spec for ch in "*?["):
        found = sorted(fs.glob(path))
    elif "{" in spec:
        return wds.shardlists.expand_urls(spec)
    else:
        found = [path] if fs.exists(path) else []
    if not found:
        raise DataError(f"--data {spec!r}: no shards found (give a corpus, a directory of .tar, a glob or URLs)")
    return [protocol + p if protocol and "://" not in p else p for p in found]


def resolve_data(data: str | list[str]) -> tuple[list[str], list[str]]:
    """(shard URLs, corpus roots): each spec is a corpus directory or its manifest (read through its manifest), or
    a shard directory, a glob, a brace pattern or a URL (read as is). Several specs may mix both kinds."""
    specs = [data] if isinstance(data, str) else list(data)
    if not specs:
        raise DataError("--data: nothing given")
    urls: list[str] = []
    roots: list[str] = []
    for spec in specs:
        root = _corpus_root(spec)
        if root is not None:
            if root not in roots:
                roots.append(root)
        else:
            urls.extend(u for u in _expand(spec) if u not in urls)
    return urls, roots


def first_sample(url: str) -> dict[str, Any]:
    """The first sample of a shard, its members as raw bytes."""
    for sample in shard_samples(url):
        return sample
    raise DataError(f"shard {url} holds no samples")


@functools.lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype, bool]:
    buf = io.BytesIO(header)
    version = np.lib.format.read_magic(buf)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(buf)
    return tuple(int(d) for d in shape), dtype, fortran


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of .npy bytes. Samples of one bucket share the header bytes,
    so parsing (numpy's is an ast.literal_eval) happens once per shape, not once per sample."""
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    length = int.from_bytes(data[8 : 8 + size_bytes], "little")
    offset = 8 + size_bytes + length
    return (*_parse_npy_header(bytes(data[:offset])), offset)


def npy_shape(data: bytes) -> tuple[int, ...]:
    """The shape in a .npy header, without reading the array."""
    return _npy_header(data)[0]


def load_npy(data: bytes) -> np.ndarray:
    """A .npy array, never unpickled: C-order numeric arrays are viewed in place, anything else goes through
    np.load(allow_pickle=False)."""
    shape, dtype, fortran, offset = _npy_header(data)
    if fortran or dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def _score_filter(root: str, samples: Any, cfg: DataConfig) -> Any:
    """The samples table restricted to rows meeting data.min_scores / data.max_scores (clips' scores joined in)."""
    import pyarrow.compute as pc

    from pipeline import manifest

    wanted = {**cfg.min_scores, **cfg.max_scores}
    missing = [name for name in wanted if name not in samples.column_names]
    if missing:
        clip_cols = manifest.table_columns(root, "clips")
        have = [m for m in missing if m in clip_cols]
        if have:
            clips = manifest.read_table(root, "clips", columns=["clip_id", *have])
            rows = pc.index_in(samples.column("key"), value_set=clips.column("clip_id"))  # key = clip_id
            for name in have:
                samples = samples.append_column(name, pc.take(clips.column(name), rows))
        unknown = [m for m in missing if m not in clip_cols]
        if unknown:
            scores = sorted({c for c in [*samples.column_names, *clip_cols] if c.startswith("score_")})
            section = "min_scores" if unknown[0] in cfg.min_scores else "max_scores"
            raise DataError(
                f"data.{section}.{unknown[0]}: no such column in the samples or clips tables of {root}; "
                f"score columns there: {', '.join(scores) or 'none'}"
            )
    mask = None
    for name, bound in cfg.min_scores.items():
        cond = pc.fill_null(pc.greater_equal(samples.column(name), bound), False)
        mask = cond if mask is None else pc.and_(mask, cond)
    for name, bound in cfg.max_scores.items():
        cond = pc.fill_null(pc.less_equal(samples.column(name), bound), False)
        mask = cond if mask is None else pc.and_(mask, cond)
    return samples.filter(mask) if mask is not None else samples


def _vae_of(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k.startswith("vae")}


def _read_corpus(root: str, cfg: DataConfig, corpus: Corpus, shapes: Any) -> None:
    """Add one corpus directory's kept shards, samples and VAE to `corpus` (raising on a second VAE)."""
    from collections import Counter

    from pipeline import manifest

    shard_names = manifest.read_table(root, "shards", columns=["shard"]).column("shard").to_pylist()
    if not shard_names:
        raise DataError(f"{root}: the manifest lists no shards (run `recap encode` first)")
    samples = _score_filter(root, manifest.read_table(root, "samples"), cfg)
    if samples.num_rows == 0:
        raise DataError(f"{root}: no sample is left after the manifest filters {cfg.min_scores or ''}")
    vaes = Counter(v for v in samples.column("vae").to_pylist() if v)
    if len(vaes) > 1:
        listed = ", ".join(f"{v} ({n} samples)" for v, n in vaes.most_common())
        raise VaeMismatchError(
            f"{root} mixes latents from {len(vaes)} VAEs: {listed}; train on one (filter the corpus)"
        )
    vae = _vae_of(manifest.read_run_json(root).get("stages", {}).get("encode", {}))
    if corpus.roots:
        for name in ("vae", "vae_sha256"):
            want, got = corpus.vae.get(name), vae.get(name)
            if want and got and want != got:
                raise VaeMismatchError(
                    f"{root} was encoded by {name}={got!r} but {corpus.roots[0]} by {name}={want!r}: "
                    "one run never mixes latents from different VAEs"
                )
    kept_shards = set(samples.column("shard").to_pylist())
    corpus.urls.extend(f"{root.rstrip('/')}/shards/{s}" for s in shard_names if s in kept_shards)
    corpus.num_samples = (corpus.num_samples or 0) + samples.num_rows
    if cfg.min_scores or cfg.max_scores:
        corpus.keys = (corpus.keys or frozenset()) | frozenset(samples.column("key").to_pylist())
    shapes.update(tuple(s) for s in samples.column("latent_shape").to_pylist())
    corpus.vae = {**vae, **corpus.vae}
    corpus.roots.append(root)


def open_corpus(data: str | list[str], cfg: DataConfig) -> Corpus:
    """Resolve `data` (one or several corpora, shard dirs, globs or URLs), apply the manifest filters and check
    that one VAE made every latent, across all of them."""
    from collections import Counter

    urls, roots = resolve_data(data)
    corpus = Corpus(urls=[])
    shapes: Counter = Counter()
    probes: list[str] = []  # the first shard of each corpus, and bare shards
    for root in roots:
        first = len(corpus.urls)
        _read_corpus(root, cfg, corpus, shapes)
        probes.append(corpus.urls[first])
    if urls and (cfg.min_scores or cfg.max_scores):
        raise DataError(
            f"data.min_scores/max_scores filter by the manifest, but --data {urls[0]!r} is a bare shard with "
            "none: give corpus directories (or drop the score filters)"
        )
    corpus.urls.extend(urls)
    if urls:
        corpus.num_samples = None  # bare shards are counted only while reading
    if not corpus.urls:
        raise DataError(f"--data {data!r}: no shards to read")
    # The first sample tells the latent channels and whether captions come embedded; the first shard of each
    # corpus and (up to 256) bare shards are checked for their VAE and text layout here, and every sample's VAE
    # while reading.
    probes.extend(urls if len(urls) <= 256 else urls[:1])
    for i, url in enumerate(probes):
        sample = first_sample(url)
        meta = json.loads(sample.get("json", b"{}"))
        check_vae(corpus.vae, meta, sample["__key__"], url)
        corpus.vae = {**_vae_of(meta), **corpus.vae}
        shape = npy_shape(sample["latent.npy"])
        emb = (npy_shape(sample["text_emb.npy"])[-1], meta.get("text_encoder")) if "text_emb.npy" in sample else None
        if i == 0:
            corpus.latent_channels = shape[0]
            shapes.setdefault(shape, 0)
            if emb is not None:
                corpus.text_emb_dim, corpus.text_encoder = emb
        elif shape[0] != corpus.latent_channels or emb != (
            (corpus.text_emb_dim, corpus.text_encoder) if corpus.text_emb_dim else None
        ):
            first = f"{corpus.latent_channels} latent channels, text_emb {corpus.text_emb_dim or 'none'}"
            this = f"{shape[0]} latent channels, text_emb {emb[0] if emb else 'none'}"
            raise DataError(
                f"{url} holds samples unlike {probes[0]} ({this} against {first}): the data of one run must share "
                "its latent layout and caption embeddings (same VAE, same text encoder or none)"
            )
    corpus.latent_shape = shapes.most_common(1)[0][0]
    if corpus.text_emb_dim is None and not cfg.text_encoder:
        raise DataError(
            "the samples carry no KEY.text_emb.npy: set data.text_encoder to a transformers text encoder "
            "(e.g. google/t5-v1_1-base) to embed captions while training"
        )
    if corpus.text_emb_dim is not None and cfg.text_encoder and corpus.text_encoder not in (None, cfg.text_encoder):
        raise DataError(
            f"data.text_encoder: {cfg.text_encoder!r} differs from {corpus.text_encoder!r}, which embedded the "
            "captions in these shards; leave it unset (or set it to that encoder)"
        )
    return corpus


def check_vae(reference: dict[str, Any], meta: dict[str, Any], key: str, url: str) -> None:
    """Raise VaeMismatchError when a sample's VAE (id, weights hash) differs from the reference's."""
    for name in ("vae", "vae_sha256"):
        want, got = reference.get(name), meta.get(name)
        if want and got and want != got:
            raise VaeMismatchError(
                f"sample {key} in {url} was encoded by {name}={got!r}, but this run trains on latents of "
                f"{name}={want!r}: one run never mixes latents from different VAEs"
            )


# ---------------------------------------------------------------------------------------------
# the stream


@dataclass
class StreamSpec:
    """Everything a reader process needs (picklable: it travels to DataLoader workers)."""

    urls: list[str]
    keys: frozenset[str] | None
    vae: dict[str, Any]
    batch_size: int
    resampled: bool
    window_shards: int
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    num_readers: int  # DataLoader workers per rank (1 without workers)
    text_emb: bool
    pipe_bytes: int = 2 << 20  # batches up to this size cross from a worker through its pipe (0: never)


def window_urls(spec: StreamSpec, reader: int, window: int) -> list[str]:
    """The shards of one window of one reader: a pure function of (seed, rank, reader, window)."""
    g = spec.window_shards
    if spec.resampled:
        rng = random.Random(f"{spec.seed}/{spec.rank}/{reader}/{window}/shards")
        return [rng.choice(spec.urls) for _ in range(g)]
    # Epochs: every epoch is a fresh permutation, split by node then by worker as wds.split_by_node and
    # wds.split_by_worker would (urls[rank::world] then [worker::workers]), with the worker index made explicit
    # so a resumed loader can hand a reader's position to whichever DataLoader worker continues it.
    readers = spec.world_size * spec.num_readers
    index = spec.rank * spec.num_readers + reader
    mine_len = len(range(index, len(spec.urls), readers))
    if mine_len == 0:
        raise DataError(
            f"{len(spec.urls)} shards cannot feed {readers} readers (world size x data.num_workers) in epoch mode: "
            "use data.resampled: true, fewer workers, or more shards"
        )
    chunks = -(-mine_len // g)
    epoch, chunk = divmod(window, chunks)
    order = random.Random(f"{spec.seed}/epoch/{epoch}").sample(spec.urls, len(spec.urls))
    mine = order[index::readers]
    return mine[chunk * g : (chunk + 1) * g]


def window_batches(spec: StreamSpec, reader: int, window: int) -> Iterator[list[dict[str, Any]]]:
    """Raw (undecoded) batches of one window: shuffled, grouped by latent shape, leftovers dropped."""
    stages: list[Any] = [wds.SimpleShardList(window_urls(spec, reader, window)), samples_of]
    if spec.keys is not None:
        keys = spec.keys
        stages.append(wds.select(lambda s: s["__key__"] in keys))
    rng = random.Random(f"{spec.seed}/{spec.rank}/{reader}/{window}/shuffle")
    stages.append(wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng))
    buckets: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for sample in wds.DataPipeline(*stages):
        shape = npy_shape(sample["latent.npy"])
        bucket = buckets.setdefault(shape, [])
        bucket.append(sample)
        if len(bucket) == spec.batch_size:
            del buckets[shape]
            yield bucket


def decode_batch(spec: StreamSpec, raw: list[dict[str, Any]]) -> dict[str, Any]:
    """Latents (B, C, T, H, W) float16 or float32, keys, captions and, when stored, caption embeddings padded to
    (B, L, D) with their mask. The arrays travel packed in one buffer (see `PackedArrays`)."""
    from pipeline.shards.latents import latent_from_storage

    latents, keys, captions, embs = [], [], [], []
    for sample in raw:
        meta = json.loads(sample.get("json", b"{}"))
        check_vae(spec.vae, meta, sample["__key__"], sample.get("__url__", "?"))
        stored = load_npy(sample["latent.npy"])
        # float16 stays float16 (half the bytes through the DataLoader; the step casts on its device)
        latents.append(stored if stored.dtype == np.float16 else latent_from_storage(stored, meta.get("latent_dtype")))
        keys.append(sample["__key__"])
        captions.append(sample.get("txt", b"").decode("utf-8"))
        if spec.text_emb:
            if "text_emb.npy" not in sample:
                raise DataError(f"sample {sample['__key__']} in {sample.get('__url__')} has no text_emb.npy")
            embs.append(load_npy(sample["text_emb.npy"]))
    packed = PackedArrays()
    packed.stack("latents", latents)
    if spec.text_emb:
        packed.pad("text", "text_mask", embs)
    return {"arrays": packed.finish(spec.pipe_bytes), "keys": keys, "captions": captions}


_ALIGN = 64


class PackedArrays:
    """The arrays of one batch copied into a single uint8 tensor, with their (name, dtype, shape, offset).

    A DataLoader worker hands a batch to the training process through shared memory, and torch pays for every
    shared tensor: a shared-memory segment, a file descriptor sent over a socket and an mmap on the other side
    (about 0.5 ms each on this machine, more than decoding a batch of small latents). One segment per batch
    instead of one per array halves that; a batch of at most `pipe_bytes` skips shared memory altogether and is
    pickled through the worker's pipe as a bytearray, which costs less than a segment below a few MiB (not when
    the DataLoader pins memory: it pins tensors only).
    `unpack_arrays` turns it back into tensors (views, no copy).
    """

    def __init__(self) -> None:
        self.parts: list[tuple[str, np.dtype, tuple[int, ...], Any]] = []  # (name, dtype, shape, fill)

    def stack(self, name: str, arrays: list[np.ndarray]) -> None:
        first = arrays[0]

        def fill(view: np.ndarray) -> None:
            for i, array in enumerate(arrays):
                view[i] = array

        self.parts.append((name, first.dtype, (len(arrays), *first.shape), fill))

    def pad(self, name: str, mask_name: str, embs: list[np.ndarray]) -> None:
        """Per-caption (L_i, D) arrays -> (B, max L, D) zero-padded (float32) and a (B, max L) bool mask; L >= 1."""
        length = max(1, max(e.shape[0] for e in embs))
        dim = embs[0].shape[1]

        def fill_text(view: np.ndarray) -> None:
            view[:] = 0
            for i, e in enumerate(embs):
                view[i, : e.shape[0]] = e

        def fill_mask(view: np.ndarray) -> None:
            view[:] = False
            for i, e in enumerate(embs):
                view[i, : e.shape[0]] = True

        self.parts.append((name, np.dtype(np.float32), (len(embs), length, dim), fill_text))
        self.parts.append((mask_name, np.dtype(np.bool_), (len(embs), length), fill_mask))

    def finish(self, pipe_bytes: int = 0) -> dict[str, Any]:
        layout, offset = [], 0
        for name, dtype, shape, _ in self.parts:
            layout.append((name, dtype.str, shape, offset))
            offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker and offset <= pipe_bytes:
            buffer: Any = bytearray(offset)  # pickled through the worker's pipe: no shared-memory segment
            raw = np.frombuffer(buffer, dtype=np.uint8)
        else:
            buffer = torch.empty(offset, dtype=torch.uint8)
            if in_worker:
                buffer.share_memory_()  # the DataLoader would copy it there; written in place instead
            raw = buffer.numpy()
        for (_, dtype, shape, fill), (_, _, _, start) in zip(self.parts, layout, strict=True):
            nbytes = math.prod(shape) * dtype.itemsize
            fill(raw[start : start + nbytes].view(dtype).reshape(shape))
        return {"buffer": buffer, "layout": layout}


def unpack_arrays(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{name: tensor} views into a `PackedArrays` buffer (pinned if the DataLoader pinned the buffer)."""
    buffer = packed["buffer"]
    if isinstance(buffer, bytearray):
        buffer = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, dtype_str, shape, offset in packed["layout"]:
        dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype_str))).dtype
        nbytes = math.prod(shape) * np.dtype(dtype_str).itemsize
        out[name] = buffer[offset : offset + nbytes].view(dtype).view(tuple(shape))
    return out


def pad_embeddings(embs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption (L_i, D) arrays -> (B, max L, D) zero-padded and a (B, max L) mask; L >= 1."""
    packed = PackedArrays()
    packed.pad("text", "text_mask", embs)
    arrays = unpack_arrays(packed.finish())
    return arrays["text"], arrays["text_mask"]


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of decoded batches for one rank; each batch carries its reader's position.

    DataLoader worker w plays reader (w + rotation) % num_readers: a resumed loader rotates the assignment so
    its first batch comes from the reader whose turn was next, and the round-robin order is the same as before.
    """

    def __init__(self, spec: StreamSpec, start: list[list[int]], rotation: int = 0):
        super().__init__()
        self.spec = spec
        self.start = start
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        reader = ((info.id if info else 0) + self.rotation) % self.spec.num_readers
        window, skip = self.start[reader]
        empty = 0
        while True:
            produced = 0
            for index, raw in enumerate(window_batches(self.spec, reader, window)):
                produced += 1
                if index < skip:
                    continue  # taken before the checkpoint: skipped undecoded
                batch = decode_batch(self.spec, raw)
                batch["position"] = (reader, window, index + 1)
                yield batch
            empty = 0 if produced else empty + 1
            if empty >= MAX_EMPTY_WINDOWS:
                raise DataError(
                    f"{MAX_EMPTY_WINDOWS} windows of {self.spec.window_shards} shards gave no batch of "
                    f"{self.spec.batch_size} same-shape samples: lower data.batch_size or raise data.window_shards"
                )
            window, skip = window + 1, 0


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's per-item conversion: none (batches are built whole, and default_convert would turn the
    packed bytearray into a list of ints)."""
    return batch


class ResumableLoader:
    """Iterates decoded batches of one rank; `state_dict()` is the position after the last batch handed out."""

    def __init__(
        self,
        corpus: Corpus,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
        pin_memory: bool = False,
    ):
        readers = max(1, cfg.num_workers)
        self.spec = StreamSpec(
            urls=list(corpus.urls),
            keys=corpus.keys,
            vae=dict(corpus.vae),
            batch_size=cfg.batch_size,
            resampled=cfg.resampled,
            window_shards=cfg.window_shards,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            num_readers=readers,
            text_emb=corpus.text_emb_dim is not None,
            pipe_bytes=0 if pin_memory else 2 << 20,
        )
        self.num_workers = cfg.num_workers
        self.pin_memory = pin_memory
        self.positions = [[0, 0] for _ in range(readers)]
        self.next_reader = 0
        self.batches = 0
        if state is not None:
            self.load_state_dict(state)
        self._iterator: Iterator[dict[str, Any]] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or len(state["positions"]) != self.spec.num_readers:
            raise DataError(
                f"the saved data position is for {len(state.get('positions', []))} readers per rank; this run has "
                f"{self.spec.num_readers} (data.num_workers): keep data.num_workers to resume exactly"
            )
        self.positions = [list(p) for p in state["positions"]]
        self.next_reader = int(state["next_reader"])
        self.batches = int(state["batches"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "positions": [list(p) for p in self.positions],
            "next_reader": self.next_reader,
            "batches": self.batches,
        }

    def _start(self) -> Iterator[dict[str, Any]]:
        dataset = ShardStream(self.spec, [list(p) for p in self.positions], rotation=self.next_reader)
        if self.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        batch.update(unpack_arrays(batch.pop("arrays")))
        reader, window, taken = (int(v) for v in batch.pop("position"))
        self.positions[reader] = [window, taken]
        self.next_reader = (reader + 1) % self.spec.num_readers
        self.batches += 1
        return batch

    def close(self) -> None:
        self._iterator = None  # drops the DataLoader iterator, which shuts its workers down
