"""Benchmark the weights-free filter scorers against decoding the same frames alone (the floor).

Both rows decode every clip's video once and convert the same sampled frames; the second also
runs every weights-free scorer (flow, sharpness, exposure, text, cut check, pHash). Target:
scoring adds at most 50% over the floor. Prints figures and the ratio; asserts nothing.

    python bench/filter.py [--videos DIR] [--clip-s 4]
"""

from __future__ import annotations

import argparse
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
        frames = sum(1 for _ in container.decode(stream))
    step = max(2, int(clip_s * fps))
    clips = [
        {"clip_id": f"c{s}", "start_frame": s, "end_frame": min(frames, s + step)} for s in range(0, frames, step)
    ]
    return clips, fps


def main() -> None:
    from pipeline.config import FilterConfig
    from pipeline.stages.filter import iter_clip_frames, score_frames

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--videos", default=str(Path(os.environ.get("RECAP_SHARED", ROOT.parent / "shared")) / "data" / "videos")
    )
    parser.add_argument("--clip-s", type=float, default=4.0, help="clip length the videos are cut into")
    parser.add_argument("--repeat", type=int, default=3)
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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
