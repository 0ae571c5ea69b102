"""Benchmark the weights-free filter scorers against decoding the same frames alone (the floor), and
the model detectors' cost per clip (PP-OCRv6 text, NudeNet) on the frames the CPU actors hand them, and
sparse frame reads by index (encode) with each `video.backend` (pyav, decord).

Both rows decode every clip's video once and convert the same sampled frames; the second also
runs every weights-free scorer (flow, sharpness, exposure, cut check, pHash). Target:
scoring adds at most 50% over the floor. Prints figures and the ratio, then one JSON line; asserts nothing.

    python bench/filter.py [--videos DIR] [--clip-s 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIDEOS = [
    "testvideo.mp4",
    "big_buck_bunny_0_30.webm",
    "issue-134-rotate.mp4",
    "bottle-detection.mp4",
    "mmaction2_test.avi",
    "issue-236-split-copy.mkv",
]


def clips_of(path: str, clip_s: float) -> tuple[list[dict], float]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        times = [float(f.pts * f.time_base) if f.pts is not None else 0.0 for f in container.decode(stream)]
    frames = len(times)
    step = max(2, int(clip_s * fps))
    clips = [
        {"clip_id": f"c{s}", "start_frame": s, "end_frame": min(frames, s + step), "start_s": times[s]}
        for s in range(0, frames, step)
    ]
    return clips, fps


def main() -> None:
    from pipeline.config import FilterConfig
    from pipeline.scoring.nsfw import NsfwDetector
    from pipeline.scoring.ocr import TextDetector
    from pipeline.stages.encode import read_frames_at
    from pipeline.stages.filter import frames_of, iter_clip_frames, sample_positions, score_frames, score_video_clips

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--videos", default=str(Path(os.environ.get("RECAP_SHARED", ROOT.parent / "shared")) / "data" / "videos")
    )
    parser.add_argument("--clip-s", type=float, default=4.0, help="clip length the videos are cut into")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the detectors")
    args = parser.parse_args()
    cfg = FilterConfig()
    work = [
        (str(Path(args.videos) / v), *clips_of(str(Path(args.videos) / v), args.clip_s))
        for v in VIDEOS
        if (Path(args.videos) / v).exists()
    ]
    n_clips = sum(len(c) for _p, c, _f in work)

    def floor() -> None:
        for path, clips, fps in work:
            for _ in iter_clip_frames(path, clips, cfg, fps):
                pass

    def scored() -> None:
        for path, clips, fps in work:
            for _i, state in iter_clip_frames(path, clips, cfg, fps):
                score_frames(state, fps, cfg, want_frames=False)

    timings = {}
    for name, fn in (("decode + sample (floor)", floor), ("decode + sample + score", scored)):
        fn()  # warm-up
        best = min(_timed(fn) for _ in range(args.repeat))
        timings[name] = best
    print(f"{len(work)} videos cut into {n_clips} clips of {args.clip_s:g}s; {cfg.frames_per_clip} frames per clip\n")
    print(f"{'':28s} {'clips/s':>9s}")
    for name, seconds in timings.items():
        print(f"{name:28s} {n_clips / seconds:9.1f}")
    base, full = timings.values()
    print(f"\nscoring overhead over the floor: {100 * (full / base - 1):+.0f}%  (target <= +50%)")

    # Sparse frame access by index (what encode does), per video.backend: the sampled frames of every clip.
    sparse = {}
    for backend in ("pyav", "decord"):

        def read(backend: str = backend) -> None:
            for path, clips, _fps in work:
                for c in clips:
                    positions = sample_positions(c["start_frame"], c["end_frame"], cfg.frames_per_clip)
                    read_frames_at(path, c["start_frame"], c["start_s"], positions, backend)

        read()
        sparse[backend] = n_clips * cfg.frames_per_clip / min(_timed(read) for _ in range(args.repeat))
        print(f"sparse reads, video.backend={backend:6s}: {sparse[backend]:7.1f} sampled frames/s")

    # The detectors on the JPEG frames the scoring actors hand over (decoding them is part of the cost).
    rows = [r for path, clips, fps in work for r in score_video_clips(path, clips, cfg.model_dump(), fps, True)]
    threads = args.threads
    text = TextDetector(max_side=cfg.text.max_side, threads=threads, batch_size=cfg.text.batch_size)
    nsfw = NsfwDetector(threads=threads, batch_size=cfg.nsfw.batch_size)
    text.score_clips([frames_of(rows[0], cfg.text.frames, rgb=False)])  # warm-up
    nsfw.score_clips([frames_of(rows[0], rgb=False)])
    start = time.perf_counter()
    text.score_clips([frames_of(r, cfg.text.frames, rgb=False) for r in rows])
    ocr_s = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    nsfw.score_clips([frames_of(r, rgb=False) for r in rows])
    nsfw_s = (time.perf_counter() - start) / len(rows)
    print(
        f"PP-OCRv6 text ({cfg.text.frames} frames, {cfg.text.max_side} px): {1000 * ocr_s:.0f} ms/clip; "
        f"NudeNet ({cfg.frames_per_clip} frames): {1000 * nsfw_s:.0f} ms/clip ({threads} onnxruntime threads)"
    )
    print(
        json.dumps(
            {
                "bench": "filter",
                "clips": n_clips,
                "frames_per_clip": cfg.frames_per_clip,
                "clips_per_s_floor": round(n_clips / base, 2),
                "clips_per_s_scored": round(n_clips / full, 2),
                "scoring_overhead": round(full / base - 1, 3),
                "sampled_frames_per_s_pyav": round(sparse["pyav"], 1),
                "sampled_frames_per_s_decord": round(sparse["decord"], 1),
                "ocr_ms_per_clip": round(1000 * ocr_s, 1),
                "nsfw_ms_per_clip": round(1000 * nsfw_s, 1),
                "onnx_threads": threads,
            }
        )
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
