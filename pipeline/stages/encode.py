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

from pipeline import manifest
from pipeline.config import EncodeConfig, RecapConfig
from pipeline.engine import StageResult, count_by, map_stage, stage_checkpoint, stage_progress
from pipeline.errors import StageInputError
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
        caption = row.get("caption")
        rejected = self.reject_of(outcome)
        if rejected is not None:
            return {"clip_id": row["clip_id"], "caption": caption, "prep_error": f"{rejected[0]}: {rejected[1]}"}
        return {"clip_id": row["clip_id"], "caption": caption, **outcome.result}


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
# the stage on Ray: encode the passing clips, write shards and the samples/shards tables


def _sample_meta(clip: dict[str, Any], latent_row: dict[str, Any]) -> dict[str, Any]:
    """KEY.json: the clip's ids, source, times, scores and caption model, plus how its latent was made."""
    keep = {k: v for k, v in clip.items() if k not in ("phashes", "clip_embedding") and not isinstance(v, bytes)}
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


def run_encode(config: RecapConfig, output: str, checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Encode every passing (and, when captioned, captioned) clip and write shards plus samples/shards tables."""
    import ray.data

    from pipeline.shards.writer import write_corpus_shards
    from pipeline.vae.load import fallback_note

    start = time.monotonic()
    cfg = config.encode
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run the earlier stages first")
    fallback = fallback_note(cfg.vae, cfg.vae_fallback)
    if fallback:
        log.warning("recap: WARNING: %s", fallback)
    clips = manifest.read_table(output, "clips")
    mask = pc.equal(clips.column("passed"), True)
    if "caption" in clips.column_names:
        mask = pc.and_(mask, pc.is_valid(clips.column("caption")))
    todo = clips.filter(mask)
    checkpoint = stage_checkpoint(output, "encode", checkpoint)
    done = checkpoint.done("key")  # samples in shards an interrupted run finished
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("clip_id"), pa.array(sorted(done), pa.string()))))
    by_id = {r["clip_id"]: r for r in todo.to_pylist()}
    # The clip's scores ride along in the samples table, so a trainer can filter on them before reading shards.
    score_fields = [f for f in clips.schema if f.name.startswith("score_")]
    score_columns = [f.name for f in score_fields]
    samples_schema = pa.schema(list(SAMPLES_SCHEMA) + score_fields)
    progress = stage_progress(config, "encode", todo.num_rows, "clips")
    reject_rows: list[dict[str, Any]] = []
    vae_info: dict[str, Any] = {}

    def samples():
        if not todo.num_rows:
            return
        cols = ["clip_id", "uri", "start_frame", "end_frame", "start_s", "fps"]
        if "caption" in todo.column_names:
            cols.append("caption")
        ds = ray.data.from_arrow(todo.select(cols), override_num_blocks=min(todo.num_rows, 1000))
        ds = map_stage(ds, EncodePrepStage, cfg.prep_resources, (config.to_dict(),))
        ds = map_stage(ds, EncodeModelStage, cfg.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                clip = by_id[row["clip_id"]]
                if not vae_info:
                    vae_info.update(json.loads(row["vae_info"]), **_vae_spec(cfg))
                    if fallback:
                        vae_info["vae_fallback_note"] = fallback
                    checkpoint.save_meta(vae_info)
                if row["error"]:
                    reject_rows.append(
                        {
                            "stage": "encode",
                            "item_id": row["clip_id"],
                            "uri": clip["uri"],
                            "reason": RejectReason.ENCODE_ERROR.value,
                            "detail": row["error"],
                        }
                    )
                    continue
                latent = np.load(io.BytesIO(row["latent"]), allow_pickle=False)
                extra = {name: row[col] for name, col in (("logvar.npy", "logvar"), ("text_emb.npy", "text_emb"))}
                yield {
                    "key": row["clip_id"],
                    "latent": latent,
                    "caption": clip.get("caption") or "",
                    "meta": _sample_meta(clip, row),
                    "extra": {name: data for name, data in extra.items() if data},
                    "row": {
                        **{name: clip.get(name) for name in score_columns},
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
                }
            progress.update(batch.num_rows, rejected=sum(1 for e in batch.column("error").to_pylist() if e))

    counts = write_corpus_shards(
        output,
        samples(),
        max_bytes=cfg.shard_max_bytes,
        max_count=cfg.shard_max_count,
        samples_schema=samples_schema,
        checkpoint=checkpoint,
    )
    if not vae_info:  # nothing new encoded (all resumed): what the interrupted run recorded
        vae_info.update(checkpoint.load_meta())
    progress.close()
    manifest.write_table(output, "rejects", pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA), prefix="encode")
    return StageResult(
        "encode",
        time.monotonic() - start,
        counts={"clips": todo.num_rows + len(done), **counts, "rejected": len(reject_rows)},
        rejects_by_reason=count_by([r["reason"] for r in reject_rows]),
        info=vae_info,
        resumed=len(done),
    )
