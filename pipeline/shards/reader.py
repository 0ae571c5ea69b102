"""Read one sample back from a corpus by key (the samples table names its shard) and decode its latents
with the corpus's VAE: what `recap manifest sample KEY` shows a person checking a corpus."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc

from pipeline import manifest


class SampleNotFound(KeyError):
    pass


def read_sample(out: str, key: str) -> dict[str, Any]:
    """{"__key__", "shard", "txt": str, "json": dict, "<name>.npy": array, ...} of sample `key`."""
    samples = manifest.read_table(out, "samples", columns=["key", "shard"])
    match = samples.filter(pc.equal(samples.column("key"), key))
    if match.num_rows == 0:
        raise SampleNotFound(f"no sample {key!r} in {out}/manifest/samples ({samples.num_rows} samples)")
    shard = match.column("shard")[0].as_py()
    sample: dict[str, Any] = {"__key__": key, "shard": shard}
    with fsspec.open(f"{out.rstrip('/')}/shards/{shard}", "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for info in tar:
            base = info.name.rsplit("/", 1)[-1]
            member_key, _, ext = base.partition(".")
            if member_key != key or not info.isfile():
                continue
            data = tar.extractfile(info).read()
            if ext.endswith(".npy"):
                sample[ext] = np.load(io.BytesIO(data), allow_pickle=False)
            elif ext == "json":
                sample[ext] = json.loads(data)
            elif ext == "txt":
                sample[ext] = data.decode("utf-8")
            else:
                sample[ext] = data
    if "latent.npy" not in sample:
        raise SampleNotFound(f"sample {key!r} is listed in shard {shard} but not found in it")
    return sample


def corpus_vae_spec(out: str) -> tuple[str, str | None]:
    """The (spec, subfolder) the corpus was encoded with, from run.json."""
    stages = manifest.read_run_json(out).get("stages", {})
    encode = stages.get("encode") or {}
    if not encode.get("vae_spec"):
        raise ValueError(f"{out}/manifest/run.json records no encode stage VAE (vae_spec): cannot decode")
    return encode["vae_spec"], encode.get("vae_subfolder")


def decode_sample(sample: dict[str, Any], vae: Any) -> np.ndarray:
    """The sample's latents decoded to RGB uint8 frames (T, H, W, 3), after checking the VAE is the one used."""
    import torch

    from pipeline.shards.latents import latent_from_storage

    meta = sample["json"]
    if meta.get("vae_sha256") and not vae.matches(meta["vae_sha256"]):
        raise ValueError(
            f"sample {sample['__key__']} was encoded by {meta.get('vae')} ({meta['vae_sha256'][:12]}…), "
            f"not by {vae.vae_id} ({vae.sha256[:12]}…): its latents would decode to garbage"
        )
    latent = torch.from_numpy(latent_from_storage(sample["latent.npy"], meta.get("latent_dtype")))
    frames = vae.decode(latent)  # (T, 3, H, W) in [0, 1]
    return (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def frame_grid(frames: np.ndarray, columns: int = 4) -> np.ndarray:
    """(T, H, W, 3) frames tiled row by row into one image, with a 2 px gap."""
    t, h, w, _ = frames.shape
    columns = min(columns, t)
    rows = -(-t // columns)
    grid = np.full((rows * (h + 2) - 2, columns * (w + 2) - 2, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = frame
    return grid


def write_sample_preview(
    out: str, key: str, dest: str, device: str = "cpu", fps: float | None = None
) -> dict[str, Any]:
    """Decode sample `key` and write it to `dest` (.mp4 video, or .png/.jpg frame grid); returns the sample."""
    import cv2

    from pipeline.vae.load import load_vae
    from pipeline.video.transcode import write_rgb_video

    sample = read_sample(out, key)
    spec, subfolder = corpus_vae_spec(out)
    frames = decode_sample(sample, load_vae(spec, device=device, subfolder=subfolder))
    suffix = Path(dest).suffix.lower()
    if suffix == ".mp4":
        meta = sample["json"]
        rate = fps or (meta.get("fps") or 24.0) / max(1, meta.get("frame_stride") or 1)
        write_rgb_video(dest, frames, rate)
    elif suffix in (".png", ".jpg", ".jpeg"):
        if not cv2.imwrite(dest, cv2.cvtColor(frame_grid(frames), cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {dest}")
    else:
        raise ValueError(f"{dest}: write .mp4 (video) or .png/.jpg (frame grid)")
    sample["decoded_shape"] = list(frames.shape)
    return sample
