"""Benchmark the encode stage against the bare VAE forward pass on the same prepared frames.

Setup (not timed): ingest + split of shared videos into a corpus. Then, in one run:
  1. the full encode stage (`run_encode`: Ray prep actors decode/stride/bucket/crop, VAE actors encode,
     float16 latents, shards + manifests written), frames/s;
  2. the bare VAE: the same clips prepared up front (`prepare_clip`) and only `Vae.encode` timed, in one
     process, with the same frames-per-batch, frames/s.
Target: the stage's overhead over the bare forward <= 15%. Prints figures; asserts nothing.

    python bench/encode.py [--vae DIR_OR_SPEC] [--area 12288] [--frames 9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("RECAP_SHARED", ROOT.parent / "shared"))
VIDEOS = ["testvideo.mp4", "big_buck_bunny_0_30.webm", "bottle-detection.mp4", "issue-134-rotate.mp4"]


def main() -> None:
    import logging

    import numpy as np
    import ray
    import torch

    from pipeline import manifest
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.stages.encode import prepare_clip, run_encode
    from pipeline.vae.load import vae_from_config, vae_geometry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=str(SHARED / "data" / "models" / "taef2"))
    parser.add_argument("--area", type=int, default=128 * 96, help="pixels per frame (bucket target area)")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    overrides = [
        "ray.progress=off",
        f"encode.vae={args.vae}",
        "encode.vae_fallback=recap-tiny:taesd",
        f"encode.target_area={args.area}",
        f"encode.num_frames={args.frames}",
        "encode.target_fps=8",
        "encode.resources.batch_size=4",
        "split.max_clip_s=4",
    ]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="recap-bench-encode-"))
    try:
        inputs = [str(SHARED / "data" / "videos" / v) for v in VIDEOS if (SHARED / "data" / "videos" / v).exists()]
        run_pipeline(cfg, str(work), inputs=inputs, stages=["ingest", "split"])
        clips = manifest.read_table(str(work), "clips").to_pylist()
        for clip in clips:  # no filter stage here: every clip that split kept is encoded
            clip["passed"] = clip["reject_reason"] is None
        import pyarrow as pa

        manifest.remove_table(str(work), "clips")
        table = pa.Table.from_pylist(clips)
        manifest.write_table(str(work), "clips", table, prefix="clips", schema=table.schema)
        todo = [c for c in clips if c["passed"]]

        run_encode(cfg, str(work))  # warm-up: actors, model load, caches
        start = time.perf_counter()
        result = run_encode(cfg, str(work))
        stage_s = time.perf_counter() - start
        samples = manifest.read_table(str(work), "samples").to_pylist()
        frames_total = sum(r["num_frames"] for r in samples)

        temporal, spatial = vae_geometry(cfg.encode)
        multiple = int(np.lcm(cfg.encode.multiple, spatial))
        enc = cfg.encode.model_dump(mode="json")
        prepared = []
        for c in todo:
            out = prepare_clip(c, enc, temporal, multiple)
            prepared.append(np.frombuffer(out["frames"], np.uint8).reshape(out["frames_shape"]))
        vae = vae_from_config(cfg.encode, "cpu")
        tensors = [torch.from_numpy(f.copy()).permute(0, 3, 1, 2).float() / 255 for f in prepared]
        vae.encode(tensors[0])  # warm-up
        start = time.perf_counter()
        for x in tensors:
            vae.encode(x)
        bare_s = time.perf_counter() - start
        bare_frames = sum(x.shape[0] for x in tensors)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(todo)} clips, {frames_total} frames, {result.counts.get('shards')} shards, VAE {vae.vae_id}\n")
    print(f"{'bare Vae.encode (1 process)':34s} {bare_frames / bare_s:8.1f} frames/s")
    print(f"{'encode stage (Ray, + shards)':34s} {frames_total / stage_s:8.1f} frames/s")
    overhead = (stage_s / frames_total) / (bare_s / bare_frames) - 1
    print(f"\nstage overhead over the bare forward: {overhead * 100:+.0f}%  (target <= +15%)")
    figures = {
        "bare_frames_per_s": round(bare_frames / bare_s, 2),
        "stage_frames_per_s": round(frames_total / stage_s, 2),
        "stage_vs_bare": round((frames_total / stage_s) / (bare_frames / bare_s), 3),
        "clips": len(todo),
        "frames": frames_total,
        "goals": {"stage_vs_bare": ">= 0.8"},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
