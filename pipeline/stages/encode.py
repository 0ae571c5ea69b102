"""Encode stage: CPU actors prepare each clip's frames (stride, bucket, crop); VAE actors encode them.

Latents are stored as float16 (C, T, H, W) with no random augmentation, so they are the same on every
run; the VAE's id and a hash of its weights go into every sample and into run.json. `run_encode` runs both pools
on Ray over the passing (and captioned) clips and writes the shards, `samples`, `shards` and encode rejects.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults, manifest
from pipeline.config import EncodeConfig, RecapConfig
from pipeline.engine import (
    RowsWhere,
    Source,
    Stage,
    StageResult,
    StageRun,
    Streamed,
    StreamGroup,
    count_by,
    pools_fit,
    stage_checkpoint,
    stage_progress,
)
from pipeline.errors import StageInputError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint
from pipeline.schema import REJECTS_SCHEMA, SAMPLES_SCHEMA, RejectReason, table_of
from pipeline.stages.common import IsolatedStage, rows_of
from pipeline.video.decode import (
    VideoRejected,
    decode_from,
    display_turns,
    open_video,
    read_frames_decord,
    upright,
)
from pipeline.video.frames import frame_positions, make_buckets, nearest_bucket, resize_center_crop

log = logging.getLogger("recap")

PREP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("frames", pa.binary()),  # uint8 (T, H, W, 3), C order
        ("frames_shape", pa.list_(pa.int32())),
        ("frame_indices", pa.list_(pa.int64())),
        ("frame_stride", pa.int32()),
        ("caption", pa.string()),
        ("prep_error", pa.string()),
        ("clip_json", pa.string()),  # the clip's manifest row, for the shard writer (KEY.json, samples columns)
    ]
)

LATENT_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("latent", pa.binary()),  # .npy bytes, (C, T', h, w) in latent_dtype
        ("logvar", pa.binary()),  # .npy bytes, same shape, KL VAEs with store_logvar only
        ("text_emb", pa.binary()),  # .npy bytes, (L, D) float16, with a text encoder only
        ("latent_shape", pa.list_(pa.int32())),
        ("latent_dtype", pa.string()),
        ("frame_indices", pa.list_(pa.int64())),
        ("frame_stride", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("vae", pa.string()),
        ("vae_sha256", pa.string()),
        ("vae_info", pa.string()),  # JSON: Vae.info() plus what was stored
        ("error", pa.string()),
        ("clip_json", pa.string()),  # passed through from PREP_SCHEMA
    ]
)


def read_frames_at(
    uri: str, start_frame: int, start_s: float, positions: list[int], backend: str = "pyav"
) -> dict[int, np.ndarray]:
    """RGB frames at source indices `positions` of a clip starting at (start_frame, start_s): decord's
    `get_batch` (backend decord), or PyAV with one seek (backend pyav, and wherever decord cannot serve them)."""
    if backend == "decord":
        frames = read_frames_decord(uri, positions)
        if frames is not None:
            return frames
    wanted = set(positions)
    last = max(positions)
    out: dict[int, np.ndarray] = {}
    with open_video(uri) as container:
        # The first frame at or after start_s is start_frame; count decoded frames from there.
        for index, (frame, _t) in enumerate(decode_from(container, start_s), start=start_frame):
            if index in wanted:
                out[index] = upright(frame.to_ndarray(format="rgb24"), display_turns(frame))
            if index >= last:
                break
    return out


def prepare_clip(
    row: dict[str, Any], cfg_dict: dict[str, Any], temporal_factor: int, multiple: int, backend: str = "pyav"
) -> dict[str, Any]:
    """Frames of one clip ready for the VAE (in the isolated child): stride, frame grid, bucket, crop."""
    cfg = EncodeConfig.model_validate(cfg_dict)
    positions, stride = frame_positions(
        row["start_frame"], row["end_frame"], row["fps"] or 25.0, cfg.target_fps, cfg.num_frames, temporal_factor
    )
    floor = max(cfg.min_frames, 1 + temporal_factor if temporal_factor > 1 else 1)
    if len(positions) < floor:
        raise VideoRejected(
            RejectReason.TOO_FEW_FRAMES,
            f"{len(positions)} frame(s) on the VAE's frame grid, fewer than {floor} (encode.min_frames="
            f"{cfg.min_frames}, VAE temporal factor {temporal_factor})",
        )
    try:
        frames = read_frames_at(row["uri"], row["start_frame"], row["start_s"], positions, backend)
    except av.error.FFmpegError as exc:
        raise VideoRejected(RejectReason.DECODE_ERROR, f"decoding the clip failed: {exc}") from None
    if len(frames) != len(positions):
        raise VideoRejected(RejectReason.DECODE_ERROR, f"decoded {len(frames)} of {len(positions)} frames")
    first = frames[positions[0]]
    height, width = nearest_bucket(first.shape[0], first.shape[1], make_buckets(cfg.target_area, multiple))
    stack = np.stack([resize_center_crop(frames[p], height, width) for p in positions])
    return {
        "frames": stack.tobytes(),
        "frames_shape": list(stack.shape),
        "frame_indices": positions,
        "frame_stride": stride,
    }


def clip_json(row: dict[str, Any]) -> str:
    """The clip's manifest fields as JSON, without its bulk columns (perceptual hashes, CLIP embedding)."""
    keep = {
        k: v
        for k, v in row.items()
        if k not in ("phashes", "clip_embedding") and not k.startswith("_") and not isinstance(v, bytes)
    }
    return json.dumps(keep, sort_keys=True)


class OutOfMemory(Exception):
    """One clip does not fit in the encoder's memory even alone."""


class EncodePrepStage(IsolatedStage):
    name = "encode-prep"
    input_columns = ("clip_id", "uri", "start_frame", "end_frame", "start_s", "fps")
    output_schema = PREP_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.vae.spec import vae_geometry  # no torch in the prep actors

        super().__init__(config)
        self._cfg = self.config.encode.model_dump(mode="json")
        # The VAE's frame grid and spatial factor, read from its config without loading weights.
        self.temporal_factor, spatial = vae_geometry(self.config.encode)
        self.multiple = math.lcm(self.config.encode.multiple, spatial)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        outcome = self.run_isolated(
            "pipeline.stages.encode:prepare_clip",
            row,
            self._cfg,
            self.temporal_factor,
            self.multiple,
            self.config.video.backend,
        )
        base = {"clip_id": row["clip_id"], "caption": row.get("caption"), "clip_json": clip_json(row)}
        rejected = self.reject_of(outcome)
        if rejected is not None:
            return {**base, "prep_error": f"{rejected[0]}: {rejected[1]}"}
        return {**base, **outcome.result}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def cpu_threads(cfg: EncodeConfig) -> int:
    """Torch threads of a VAE actor on CPU: `encode.threads`, else its pool's num_cpus rounded up (Ray's own
    OMP_NUM_THREADS rounds down, which leaves a 1.5-CPU actor one thread)."""
    return cfg.threads or max(1, math.ceil(cfg.resources.num_cpus))


class EncodeModelStage:
    """VAE actors: prepared frames -> normalised latents (C, T', h, w) in the storage dtype, under inference_mode.

    Clips of one shape in a batch are encoded together (image VAEs in chunks of frames_per_batch frames).
    With a text encoder configured, captions are embedded here too (KEY.text_emb.npy).
    """

    name = "encode"
    input_columns = ("clip_id", "frames", "frames_shape", "caption")
    output_schema = LATENT_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.vae.load import pick_device, vae_from_config

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.cfg = cfg.encode
        self.device = pick_device(self.cfg.device)
        if self.device == "cpu":
            import torch

            torch.set_num_threads(cpu_threads(self.cfg))
        self.vae = vae_from_config(self.cfg, self.device)
        self.store_logvar = self.cfg.store_logvar and self.vae.has_posterior
        self.text = None
        if self.cfg.text_encoder:
            from captioner.text_encoder import CaptionEncoder

            self.text = CaptionEncoder(
                self.cfg.text_encoder,
                device=self.device,
                max_length=self.cfg.text_max_length,
                trust_remote_code=self.cfg.trust_remote_code,
            )
        info = {
            **self.vae.info(),
            "latent_dtype": self.cfg.latent_dtype,
            "latent_kind": "posterior_mean" if self.vae.has_posterior else "deterministic",
            "logvar_stored": self.store_logvar,
            "text_encoder": self.cfg.text_encoder,
            "text_emb_dim": self.text.dim if self.text else None,
        }
        self.vae_info = json.dumps(info, sort_keys=True)

    def encode_clips(self, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """(B, T, H, W, 3) uint8 clips of one shape -> per clip stored latents and (optionally) log-variances."""
        import torch

        from pipeline.shards.latents import latent_to_storage

        x = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255.0  # (B, T, 3, H, W) in [0, 1]
        posterior = self.vae.encode(x)
        latents = [latent_to_storage(m, self.cfg.latent_dtype) for m in posterior.mean]
        if self.store_logvar and posterior.logvar is not None:
            return latents, [latent_to_storage(v, self.cfg.latent_dtype) for v in posterior.logvar]
        return latents, [None] * len(latents)

    def encode_oom_safe(self, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """encode_clips, and on out-of-memory: free the cache and encode each half apart, down to one clip; a clip
        that does not fit alone raises OutOfMemory (its group's clips are rejected, the stage goes on)."""
        import torch

        try:
            return self.encode_clips(frames)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(frames) == 1:
                raise OutOfMemory(
                    f"out of memory encoding one {tuple(frames.shape[1:4])} clip even alone: set encode.vae_tiling: "
                    f"true (now {self.vae.tiling}), or lower encode.target_area / encode.num_frames"
                ) from None
            half = len(frames) // 2
            first, second = self.encode_oom_safe(frames[:half]), self.encode_oom_safe(frames[half:])
            return first[0] + second[0], first[1] + second[1]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """One clip (T, H, W, 3) uint8 -> its stored latent (C, T', h, w)."""
        return self.encode_clips(frames[None])[0][0]

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        rows = rows_of(batch)
        out: dict[str, dict[str, Any]] = {}
        by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for row in rows:
            base = {
                "clip_id": row["clip_id"],
                "vae": self.vae.vae_id,
                "vae_sha256": self.vae.sha256,
                "vae_info": self.vae_info,
                "frame_indices": row.get("frame_indices"),
                "frame_stride": row.get("frame_stride"),
                "clip_json": row.get("clip_json"),
            }
            out[row["clip_id"]] = base
            if row.get("prep_error") or not row.get("frames"):
                base["error"] = row.get("prep_error") or "no frames"
            else:
                by_shape.setdefault(tuple(row["frames_shape"]), []).append(row)
        for shape, group in by_shape.items():
            # torch wants writable memory: copy out of the Arrow buffers.
            frames = np.stack([np.frombuffer(r["frames"], np.uint8).reshape(shape) for r in group])
            try:
                latents, logvars = self.encode_oom_safe(frames)
            except OutOfMemory as exc:  # one clip alone does not fit: its error says what to change
                for r in group:
                    out[r["clip_id"]]["error"] = str(exc)
                continue
            except (RuntimeError, ValueError) as exc:  # e.g. a shape this VAE refuses: reject the clips, go on
                for r in group:
                    out[r["clip_id"]]["error"] = f"{type(exc).__name__}: {exc}"
                continue
            for r, latent, logvar in zip(group, latents, logvars, strict=True):
                out[r["clip_id"]].update(
                    latent=npy_bytes(latent),
                    logvar=npy_bytes(logvar) if logvar is not None else None,
                    latent_shape=list(latent.shape),
                    latent_dtype=self.cfg.latent_dtype,
                    height=shape[1],
                    width=shape[2],
                )
        if self.text is not None:
            todo = [r for r in rows if "latent" in out[r["clip_id"]]]
            embeddings = self.text.encode([r.get("caption") or "" for r in todo])
            for r, emb in zip(todo, embeddings, strict=True):
                out[r["clip_id"]]["text_emb"] = npy_bytes(emb.astype(np.float16))
        return table_of([out[r["clip_id"]] for r in rows], LATENT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# the stage on Ray: encode the passing clips; shard writers on the workers write shards and samples files,
# the driver commits their records and publishes the samples/shards tables


def _sample_meta(clip: dict[str, Any], latent_row: dict[str, Any]) -> dict[str, Any]:
    """KEY.json: the clip's ids, source, times, scores and caption model, plus how its latent was made."""
    keep = dict(clip)
    keep.update(json.loads(latent_row["vae_info"]))  # vae, vae_sha256, scaling/shift, latent_dtype, logvar_stored...
    keep.update(
        frame_indices=latent_row["frame_indices"],
        frame_stride=latent_row["frame_stride"],
        resize={"height": latent_row["height"], "width": latent_row["width"], "mode": "resize+center_crop"},
        latent_shape=latent_row["latent_shape"],
    )
    return keep


def _vae_spec(cfg: Any) -> dict[str, str | None]:
    """The VAE as a later reader (the trainer's sampler) loads it again: an absolute path or hub id, subfolder."""
    from pipeline.vae.load import resolve_vae_spec

    spec, subfolder = resolve_vae_spec(cfg.vae, cfg.vae_fallback, cfg.vae_subfolder)
    return {"vae_spec": spec, "vae_subfolder": subfolder}


# What a shard writer hands the driver for each block: counts and small records, never latents or captions.
# `captions`: in a caption -> encode stream, the caption parts (name -> rows) of the block's clips.
WRITE_RESULT_KEYS = ("rows", "rejects", "shards", "vae_info", "captions")


class ShardWriteActor:
    """A Ray actor pinned to one node: encoded rows (LATENT_SCHEMA) -> samples in content-named shards on the output
    filesystem, each finished shard's samples rows in the stage's work directory (pipeline.shards.corpus).

    `write_block` returns only WRITE_RESULT_KEYS: how many rows it took, the encode rejects (ids and reasons), the
    records of the shards it finished, and (once) the VAE's description."""

    def __init__(self, output: str, work_uri: str, config: dict[str, Any], samples_schema: pa.Schema, node_id: str):
        from pipeline.shards.corpus import CorpusShardWriter

        cfg = EncodeConfig.model_validate(config["encode"])
        self.score_columns = [name for name in samples_schema.names if name.startswith("score_")]
        self.writer = CorpusShardWriter(
            output, work_uri, samples_schema, cfg.shard_max_bytes, cfg.shard_max_count, node_id
        )
        self._told_vae = False

    def write_block(self, block: pa.Table, start: int | None = None, end: int | None = None) -> dict[str, Any]:
        from pipeline.shards.writer import bucket_of, sample_members

        if start is not None and end is not None:
            block = block.slice(start, end - start)
        if self.writer.pending:  # tests kill a writer here: mid-shard, with samples written but not committed
            faults.actor_call("shard-writer")
        rejects: list[dict[str, Any]] = []
        vae_info = None
        captions: dict[str, int] = {}
        rows = block.to_pylist()
        for row in rows:
            if row.get("_caption_part"):
                captions[row["_caption_part"]] = row["_caption_rows"]
            if row.get("_skip"):  # rejected by the caption stage of the same stream: its record is all there is
                continue
            clip = json.loads(row["clip_json"])
            if row["error"]:
                rejects.append(
                    {
                        "stage": "encode",
                        "item_id": row["clip_id"],
                        "uri": clip.get("uri"),
                        "reason": RejectReason.ENCODE_ERROR.value,
                        "detail": row["error"],
                    }
                )
                continue
            if not self._told_vae:
                vae_info, self._told_vae = row["vae_info"], True
            caption = clip.get("caption") or ""
            extra = {name: row[col] for name, col in (("logvar.npy", "logvar"), ("text_emb.npy", "text_emb"))}
            members = sample_members(
                row["clip_id"],
                row["latent"],
                caption,
                _sample_meta(clip, row),
                {name: data for name, data in extra.items() if data},
            )
            self.writer.add(
                members,
                bucket_of(row["latent_shape"]),
                {
                    **{name: clip.get(name) for name in self.score_columns},
                    "caption": caption,
                    "latent_shape": row["latent_shape"],
                    "latent_dtype": row["latent_dtype"],
                    "vae": row["vae"],
                    "vae_sha256": row["vae_sha256"],
                    "has_text_emb": bool(row["text_emb"]),
                    "logvar_stored": bool(row["logvar"]),
                    "num_frames": len(row["frame_indices"]),
                    "frame_stride": row["frame_stride"],
                    "height": row["height"],
                    "width": row["width"],
                },
            )
        encoded = sum(1 for row in rows if not row.get("_skip"))
        shards = self.writer.take()
        return {"rows": encoded, "rejects": rejects, "shards": shards, "vae_info": vae_info, "captions": captions}

    def close(self) -> dict[str, Any]:
        return {"rows": 0, "rejects": [], "shards": self.writer.close(), "vae_info": None, "captions": {}}


def check_write_result(result: dict[str, Any], max_text: int = 1 << 16) -> int:
    """Refuse a writer result that carries payloads (bytes, or text longer than `max_text`); its size in bytes as
    the driver received it (JSON)."""

    def walk(value: Any) -> None:
        if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
            raise TypeError(f"a shard writer sent the driver {type(value).__name__} data: only records may come back")
        if isinstance(value, str) and len(value) > max_text:
            raise TypeError(f"a shard writer sent the driver {len(value)} characters of text: only records may")
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    if set(result) != set(WRITE_RESULT_KEYS):
        raise TypeError(f"a shard writer result has keys {sorted(result)}, expected {list(WRITE_RESULT_KEYS)}")
    walk(result)
    return len(json.dumps(result))


class _Writer:
    def __init__(self, node_id: str, actor: Any):
        self.node_id = node_id
        self.actor = actor
        self.in_flight = 0


class ShardWriterPool:
    """`per_node` ShardWriteActors on each alive node with CPUs or GPUs (pinned there); a block goes to a writer on
    a node that holds it (no transfer), else to the least busy one. A writer that dies is replaced on its node."""

    def __init__(self, make: Any, per_node: int):
        import ray

        self._make = make
        nodes = [
            n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
        ]
        if not nodes:
            raise StageInputError("the Ray cluster has no alive node with CPUs or GPUs to write shards on")
        self.writers = [_Writer(node, make(node)) for node in nodes for _ in range(per_node)]
        self.lost = 0

    def pick(self, ref: Any) -> _Writer:
        import ray

        try:
            holders = set(ray.experimental.get_object_locations([ref])[ref].get("node_ids") or [])
        except Exception:  # noqa: BLE001 - locality is an optimisation: any writer can take any block
            holders = set()
        local = [w for w in self.writers if w.node_id in holders]
        return min(local or self.writers, key=lambda w: w.in_flight)

    def replace(self, dead: _Writer) -> None:
        """Drop a writer whose process died (its open shards are lost: the stage encodes their clips again)."""
        self.lost += 1
        self.writers.remove(dead)
        try:
            self.writers.append(_Writer(dead.node_id, self._make(dead.node_id)))
        except Exception:  # noqa: BLE001 - the node itself is gone: the other writers go on
            if not self.writers:
                raise

    def __len__(self) -> int:
        return len(self.writers)


def _block_refs(bundle: Any) -> list[tuple[Any, int | None, int | None]]:
    """(block ref, start, end) of each block of a Ray Data RefBundle (a slice, or the whole block)."""
    slices = getattr(bundle, "slices", None) or [None] * len(bundle.blocks)
    out = []
    for entry, piece in zip(bundle.blocks, slices, strict=True):
        ref = entry.ref if hasattr(entry, "ref") else entry[0]
        out.append((ref, None, None) if piece is None else (ref, piece.start_offset, piece.end_offset))
    return out


def write_from_workers(ds: Any, pool: ShardWriterPool, on_result: Any, max_in_flight: int = 2) -> None:
    """Stream `ds`'s blocks to the shard writers by reference (the driver never fetches a block) and hand each
    writer result to `on_result` as it arrives; then close every writer and hand on their last records."""
    import ray
    from ray.exceptions import RayActorError

    pending: dict[Any, _Writer] = {}

    def wait_one() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            writer = pending.pop(ref)
            writer.in_flight -= 1
            try:
                result = ray.get(ref)
            except RayActorError:
                if writer in pool.writers:
                    log.warning(
                        "recap: a shard writer on node %s died; its unfinished shards are redone", writer.node_id
                    )
                    pool.replace(writer)
                continue
            on_result(result)

    for bundle in ds.iter_internal_ref_bundles():
        for ref, start, end in _block_refs(bundle):
            writer = pool.pick(ref)
            pending[writer.actor.write_block.remote(ref, start, end)] = writer
            writer.in_flight += 1
            while len(pending) >= max_in_flight * len(pool):
                wait_one()
    while pending:
        wait_one()
    for writer in list(pool.writers):
        pending[writer.actor.close.remote()] = writer
    while pending:
        wait_one()


def encode_pipeline(
    ds: Any, names: list[str], config: RecapConfig, passthrough: tuple[str, ...] = (), skip: str | None = None
) -> tuple[Any, list[str]]:
    """The encode stage's part of a Ray Data pipeline over clip rows: decode/stride/bucket/crop (CPU pool) -> VAE
    (its pool, GPUs). Rows whose `skip` column is true (rejected upstream) pass untouched."""
    from pipeline.engine import map_through

    cfg_dict = config.to_dict()
    ds, names = map_through(ds, names, EncodePrepStage, config.encode.prep_resources, (cfg_dict,), passthrough, skip)
    return map_through(ds, names, EncodeModelStage, config.encode.resources, (cfg_dict,), passthrough, skip)


class EncodeRun:
    """One run of the encode stage's writing side: the shard writers, the commits of their records, the rejects."""

    def __init__(self, config: RecapConfig, output: str, checkpoint: StageCheckpoint, samples_schema: pa.Schema):
        from pipeline.vae.load import fallback_note

        self.config = config
        self.output = output
        self.checkpoint = checkpoint
        self.samples_schema = samples_schema
        self.fallback = fallback_note(config.encode.vae, config.encode.vae_fallback)
        self.rejects: list[dict[str, Any]] = self._saved_rejects()
        self.vae_info: dict[str, Any] = {}
        self.received = 0  # bytes of writer results that reached the driver
        self.lost = 0  # shard writers that died
        self.progress: Any = None
        self.on_captions: Any = None  # a caption -> encode stream commits the caption parts here

    def _rejects_dir(self) -> str:
        return f"{self.checkpoint.uri}/rejects"

    def _saved_rejects(self) -> list[dict[str, Any]]:
        """Rejects an earlier pass of this stage saved (a stream's, or an interrupted run's)."""
        import pyarrow.parquet as pq

        fs, path = manifest._fs(self._rejects_dir())
        if not fs.exists(path):
            return []
        rows: list[dict[str, Any]] = []
        for entry in sorted(fs.ls(path, detail=False)):
            if entry.endswith(".parquet") and not entry.rsplit("/", 1)[-1].startswith("."):
                with fs.open(entry, "rb") as fh:
                    rows += pq.read_table(fh, schema=REJECTS_SCHEMA).to_pylist()
        return rows

    def save_rejects(self) -> None:
        if self.rejects:
            table = pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)
            manifest.remove_unlisted(self._rejects_dir(), set())
            manifest.write_part(self._rejects_dir(), "rejects.parquet", table)

    def done_ids(self) -> pa.Array:
        """Clips with a committed sample or an encode reject."""
        from pipeline.shards import corpus

        rejected = pa.array([r["item_id"] for r in self.rejects], pa.string())
        return pa.concat_arrays([corpus.committed_keys(self.checkpoint), rejected])

    def _make_writer(self, node_id: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return (
            ray.remote(ShardWriteActor)
            .options(
                num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            )
            .remote(self.output, self.checkpoint.uri, self.config.to_dict(), self.samples_schema, node_id)
        )

    def _on_result(self, result: dict[str, Any]) -> None:
        from pipeline.shards import corpus

        self.received += check_write_result(result)
        if result["vae_info"] and not self.vae_info:
            self.vae_info.update(json.loads(result["vae_info"]), **_vae_spec(self.config.encode))
            if self.fallback:
                self.vae_info["vae_fallback_note"] = self.fallback
            self.checkpoint.save_meta(self.vae_info)
        if result["captions"] and self.on_captions is not None:
            self.on_captions(result["captions"])
        if result["shards"]:
            self.checkpoint.commit(corpus.records_table(result["shards"]))
        self.rejects.extend(result["rejects"])
        if self.progress is not None:
            self.progress.update(result["rows"], rejected=len(result["rejects"]))

    def write(self, ds: Any) -> None:
        """Hand `ds`'s encoded blocks to shard writers on the nodes that hold them, committing as results come."""
        import ray

        pool = ShardWriterPool(self._make_writer, self.config.encode.shard_writers_per_node)
        try:
            write_from_workers(ds, pool, self._on_result)
        finally:
            self.lost += pool.lost
            for writer in pool.writers:
                ray.kill(writer.actor)
            self.save_rejects()


def _samples_schema(clips: pa.Schema) -> pa.Schema:
    # The clip's scores ride along in the samples table, so a trainer can filter on them before reading shards.
    return pa.schema(list(SAMPLES_SCHEMA) + [f for f in clips if f.name.startswith("score_")])


NOT_ENCODED = ("phashes", "clip_embedding")  # clip columns the encode stage does not read


def encodable(clips: pa.Schema, done: pa.Array | None = None) -> pc.Expression:
    """Which rows of `clips` the encode stage takes: passing, captioned when the corpus is, and not in `done`."""
    where = pc.field("passed") == True  # noqa: E712 - an Arrow expression, not a Python comparison
    if "caption" in clips.names:
        where = where & pc.field("caption").is_valid()
    if done is not None and len(done):
        where = where & ~pc.field("clip_id").isin(done)
    return where


def encode_input(clips: Source, done: pa.Array | None = None) -> tuple[Source, int]:
    """The clips left to encode as a Source the workers read and filter (clips: the table's files), and how many."""
    schema = clips.read_schema()
    where = encodable(schema, done)
    columns = [n for n in schema.names if n not in NOT_ENCODED]
    return Source(clips.paths, clips.fs, columns=columns, prepare=RowsWhere(where)), clips.num_rows(where)


def run_encode(
    config: RecapConfig,
    output: str,
    checkpoint: StageCheckpoint | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    """Encode every passing (and, when captioned, captioned) clip; shard writers on the workers write the shards.
    `progress`: a streaming run's line for this stage (what it committed is in `checkpoint`)."""

    from pipeline.shards import corpus

    start = time.monotonic()
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run the earlier stages first")
    clips = Source.table(output, "clips")
    checkpoint = stage_checkpoint(output, "encode", checkpoint)
    records = corpus.committed_records(checkpoint)
    corpus.remove_orphans(output, checkpoint, set(records.column("shard").to_pylist()))
    resumed_shards = records.num_rows
    resumed = len(corpus.committed_keys(checkpoint, records))  # samples in shards an earlier pass finished
    run = EncodeRun(config, output, checkpoint, _samples_schema(clips.read_schema()))
    if run.fallback:
        log.warning("recap: WARNING: %s", run.fallback)
    wanted = encode_input(clips)[1]
    todo, left = encode_input(clips, run.done_ids())
    run.progress = stage_progress(config, "encode", left, "clips", progress=progress)
    # A shard writer that dies takes its unfinished shards with it: their clips are encoded again, at most
    # isolation.infrastructure_retries more times, before the stage gives up (a re-run resumes them).
    for attempt in range(config.isolation.infrastructure_retries + 1):
        if not left:
            break
        if attempt:
            log.warning("recap: encoding %d clip(s) again that lost shard writers took with them", left)
        ds = todo.blocks(max(1, left // 1000))  # about a thousand blocks, read by the workers
        ds, _names = encode_pipeline(ds, todo.columns, config)
        run.write(ds)
        todo, left = encode_input(clips, run.done_ids())
    run.progress.close()
    if left:
        raise RuntimeError(
            f"encode: {left} clip(s) were lost with {run.lost} shard writer(s) that died; re-run the same "
            "command to encode them (the committed shards are kept)"
        )
    return finish_encode(run, wanted, resumed, resumed_shards, start)


def finish_encode(run: EncodeRun, wanted: int, resumed: int, resumed_shards: int, start: float) -> StageResult:
    """Remove what no commit vouches for, publish `samples` and `shards`, write the encode rejects."""
    from pipeline.shards import corpus

    output, checkpoint = run.output, run.checkpoint
    records = corpus.committed_records(checkpoint)
    corpus.remove_orphans(output, checkpoint, set(records.column("shard").to_pylist()))
    counts = corpus.publish(output, checkpoint, run.samples_schema)
    if not run.vae_info:  # nothing new encoded (all resumed): what the interrupted run recorded
        run.vae_info.update(checkpoint.load_meta())
    rejects = pa.Table.from_pylist(run.rejects, schema=REJECTS_SCHEMA)
    manifest.write_table(output, "rejects", rejects, prefix="encode")
    shard_bytes = int(pc.sum(records.column("bytes")).as_py() or 0)
    writers = {"lost": run.lost, "driver_received_bytes": run.received, "shard_bytes": shard_bytes}
    return StageResult(
        "encode",
        time.monotonic() - start,
        counts={"clips": wanted, **counts, "resumed_shards": resumed_shards, "rejected": len(run.rejects)},
        rejects_by_reason=count_by([r["reason"] for r in run.rejects]),
        info={**run.vae_info, "writers": writers},
        resumed=resumed,
    )


def caption_encode_unfit(config: RecapConfig) -> str | None:
    """Why caption -> encode cannot stream on this cluster (its pools do not fit at once), or None."""
    from pipeline.stages.caption import caption_pools

    pools = caption_pools(config, bool(config.filter.clip.model))
    pools.update({"encode-prep": config.encode.prep_resources, "encode": config.encode.resources})
    return pools_fit(pools)


def stream_caption_encode(
    config: RecapConfig,
    output: str,
    uris: list[str],
    checkpoints: dict[str, StageCheckpoint],
    progress: dict[str, StageProgress],
) -> dict[str, Streamed]:
    """Caption and encode as ONE streaming Ray Data pipeline: clips -> caption decode -> caption model (-> CLIP
    match) -> encode decode -> VAE -> shard writers, each pool working while the one before it still produces.

    Both stages' checkpoints are filled as the writers' records arrive (caption parts, shards); the stages then
    finish as usual (`run_caption`, `run_encode` resume, finding (almost) nothing left). Only for fresh
    checkpoints: a half-done stage resumes stage by stage. `uris` is not used (the stream reads `clips`)."""

    from pipeline.stages.caption import RECORD_COLUMNS, caption_pipeline, caption_todo, commit_parts

    caption_checkpoint, encode_checkpoint = checkpoints["caption"], checkpoints["encode"]
    schema, todo, count, _resumed = caption_todo(config, output, caption_checkpoint)
    # Both started fresh: nothing was resumed, and the shards encode finds committed are this stream's.
    done = {"caption": Streamed(), "encode": Streamed(counts={"resumed_shards": 0})}
    if not count:
        return done
    caption_progress = progress["caption"]
    caption_progress.grow(count)
    run = EncodeRun(config, output, encode_checkpoint, _samples_schema(schema))
    run.progress = progress["encode"]
    run.progress.grow(count)

    def on_captions(parts: dict[str, int]) -> None:
        new = {name: rows for name, rows in parts.items() if name not in seen}
        seen.update(new)
        commit_parts(caption_checkpoint, new)
        caption_progress.update(sum(new.values()))

    seen: dict[str, int] = {}
    run.on_captions = on_captions
    ds = todo.blocks(max(1, count // 1000))
    ds, names = caption_pipeline(ds, schema.names, config, caption_checkpoint.uri, schema)
    ds, _names = encode_pipeline(ds, names, config, passthrough=RECORD_COLUMNS, skip="_skip")
    run.write(ds)
    return done


def _run(run: StageRun) -> StageResult:
    return run_encode(run.config, run.output, checkpoint=run.checkpoint, progress=run.progress)


def _repairable(gone: list[str]) -> bool:
    """Missing or damaged shards are redone alone (their samples encoded again); a missing table, whole."""
    return gone[0].startswith("shards/")


def _repair(output: str, checkpoint: StageCheckpoint, previous: dict[str, Any]) -> None:
    """Seed the checkpoint with the intact shards and the VAE facts the finished run recorded (a repair that
    encodes nothing new reports them again)."""
    from pipeline.resume import seed_encode_checkpoint

    bookkeeping = {"seconds", "counts", "rejects_by_reason", "status", "fingerprint", "settings", "updated_at"}
    bookkeeping |= {"started_at", "finished_at", "repaired"}
    seed_encode_checkpoint(output, checkpoint, {k: v for k, v in previous.items() if k not in bookkeeping})


STAGE = Stage(
    "encode",
    _run,
    unit="clips",
    needs=("clips", "no clips table under {output}/manifest: run the earlier stages first"),
    repairable=_repairable,
    repair=_repair,
)
# caption -> encode as one pipeline (only when both start fresh).
CAPTION_ENCODE = StreamGroup(("caption", "encode"), stream_caption_encode, caption_encode_unfit, resumes=False)
