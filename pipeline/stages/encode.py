"""Encode stage: CPU actors prepare each clip's frames (stride, bucket, crop); VAE actors encode them.

Latents are stored as float16 (C, T, H, W) with no random augmentation, so they are the same on every
run; the VAE's id and a hash of its weights go into every sample and into run.json.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa

from pipeline.config import EncodeConfig, RecapConfig
from pipeline.schema import RejectReason, table_of
from pipeline.stages.common import IsolatedStage, rows_of
from pipeline.video.decode import VideoRejected, decode_from, open_video
from pipeline.video.frames import frame_positions, make_buckets, nearest_bucket, resize_center_crop

PREP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("frames", pa.binary()),  # uint8 (T, H, W, 3), C order
        ("frames_shape", pa.list_(pa.int32())),
        ("frame_indices", pa.list_(pa.int64())),
        ("frame_stride", pa.int32()),
        ("prep_error", pa.string()),
    ]
)

LATENT_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("latent", pa.binary()),  # .npy bytes
        ("latent_shape", pa.list_(pa.int32())),
        ("frame_indices", pa.list_(pa.int64())),
        ("frame_stride", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("vae", pa.string()),
        ("vae_sha256", pa.string()),
        ("error", pa.string()),
    ]
)


def read_frames_at(uri: str, start_frame: int, start_s: float, positions: list[int]) -> dict[int, np.ndarray]:
    """RGB frames at source indices `positions` of a clip starting at (start_frame, start_s); one seek."""
    wanted = set(positions)
    last = max(positions)
    out: dict[int, np.ndarray] = {}
    with open_video(uri) as container:
        # The first frame at or after start_s is start_frame; count decoded frames from there.
        for index, (frame, _t) in enumerate(decode_from(container, start_s), start=start_frame):
            if index in wanted:
                out[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    return out


def prepare_clip(row: dict[str, Any], cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Frames of one clip ready for the VAE (in the isolated child): stride, frame grid, bucket, crop."""
    cfg = EncodeConfig.model_validate(cfg_dict)
    positions, stride = frame_positions(
        row["start_frame"], row["end_frame"], row["fps"] or 25.0, cfg.target_fps, cfg.num_frames, cfg.temporal_factor
    )
    if not positions:
        raise VideoRejected(RejectReason.TOO_FEW_FRAMES, "no frame on the VAE's frame grid")
    try:
        frames = read_frames_at(row["uri"], row["start_frame"], row["start_s"], positions)
    except av.error.FFmpegError as exc:
        raise VideoRejected(RejectReason.DECODE_ERROR, f"decoding the clip failed: {exc}") from None
    if len(frames) != len(positions):
        raise VideoRejected(RejectReason.DECODE_ERROR, f"decoded {len(frames)} of {len(positions)} frames")
    first = frames[positions[0]]
    height, width = nearest_bucket(first.shape[0], first.shape[1], make_buckets(cfg.target_area, cfg.multiple))
    stack = np.stack([resize_center_crop(frames[p], height, width) for p in positions])
    return {
        "frames": stack.tobytes(),
        "frames_shape": list(stack.shape),
        "frame_indices": positions,
        "frame_stride": stride,
    }


class EncodePrepStage(IsolatedStage):
    name = "encode-prep"
    input_columns = ("clip_id", "uri", "start_frame", "end_frame", "start_s", "fps")
    output_schema = PREP_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        super().__init__(config)
        self._cfg = self.config.encode.model_dump(mode="json")

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        outcome = self.run_isolated("pipeline.stages.encode:prepare_clip", row, self._cfg)
        rejected = self.reject_of(outcome)
        if rejected is not None:
            return {"clip_id": row["clip_id"], "prep_error": f"{rejected[0]}: {rejected[1]}"}
        return {"clip_id": row["clip_id"], **outcome.result}


def file_sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class EncodeModelStage:
    """VAE actors: prepared frames -> float16 latents (C, T, H, W), encoded in frame batches under no_grad."""

    name = "encode"
    input_columns = ("clip_id", "frames", "frames_shape")
    output_schema = LATENT_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        import torch

        from pipeline.vae.load import load_vae

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.cfg = cfg.encode
        self.device = (
            "cuda"
            if self.cfg.device == "auto" and torch.cuda.is_available()
            else ("cpu" if self.cfg.device == "auto" else self.cfg.device)
        )
        self.vae, self.vae_id, self.vae_sha256 = load_vae(self.cfg, self.device)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (C, T, h, w) latents in the configured dtype."""
        import torch

        x = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        parts = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.cfg.frames_per_batch):
                parts.append(self.vae.encode(x[start : start + self.cfg.frames_per_batch]).float().cpu())
        latents = torch.cat(parts).permute(1, 0, 2, 3).contiguous()  # (T, C, h, w) -> (C, T, h, w)
        return latents.numpy().astype(np.float16)

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        out = []
        for row in rows_of(batch):
            base = {
                "clip_id": row["clip_id"],
                "vae": self.vae_id,
                "vae_sha256": self.vae_sha256,
                "frame_indices": row.get("frame_indices"),
                "frame_stride": row.get("frame_stride"),
            }
            if row.get("prep_error") or not row.get("frames"):
                out.append({**base, "error": row.get("prep_error") or "no frames"})
                continue
            shape = tuple(row["frames_shape"])
            frames = np.frombuffer(row["frames"], np.uint8).reshape(shape).copy()  # torch wants writable memory
            latent = self.encode_frames(frames)
            buf = io.BytesIO()
            np.save(buf, latent, allow_pickle=False)
            out.append(
                {
                    **base,
                    "latent": buf.getvalue(),
                    "latent_shape": list(latent.shape),
                    "height": shape[1],
                    "width": shape[2],
                }
            )
        return table_of(out, LATENT_SCHEMA)
