"""Benchmark scene splitting on the shared real videos; prints figures and ratios, asserts nothing.

Rows, all in frames per second over the same videos:
  decode floor      PyAV decoding every frame, one thread, nothing else
  pyscenedetect     scenedetect.detect(path, ContentDetector()) with its defaults
  recap 1 process   recap's split of each video in this process (content detector)
  recap ray         `recap split` on Ray with 2 CPUs over copies of the videos
Then peak memory of splitting a short and a 10x longer video (each in a fresh process).

    python bench/split.py [--copies 16] [--videos DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIDEOS = [
    "testvideo.mp4",
    "big_buck_bunny_0_30.webm",
    "issue-134-rotate.mp4",
    "bottle-detection.mp4",
    "issue-236-split-copy.mkv",
    "fades.mp4",
]


def shared_videos(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = Path(os.environ.get("RECAP_SHARED", ROOT.parent / "shared"))
    return base / "data" / "videos"


def decode_floor(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        return sum(1 for _ in container.decode(stream))


def pyscenedetect_default(path: str) -> list[int]:
    import scenedetect

    scenes = scenedetect.detect(path, scenedetect.ContentDetector())
    return [s[0].frame_num for s in scenes[1:]]


def recap_one(path: str) -> list[int]:
    from pipeline.config import SplitConfig
    from pipeline.stages.split import detect_scenes

    found = detect_scenes(path, SplitConfig(detector="content"))
    return [s for s, _ in found["scenes"][1:]]


def timed(fn, paths: list[str], frames: int) -> tuple[float, list]:
    fn(paths[0])  # warm-up: imports, codec init
    start = time.perf_counter()
    outs = [fn(p) for p in paths]
    return frames / (time.perf_counter() - start), outs


def ray_split(paths: list[str], copies: int, frames: int) -> tuple[float, float]:
    """`recap split` on Ray with 2 CPUs over `copies` byte-distinct copies of each video."""
    from pipeline.config import load_config
    from pipeline.engine import RaySession
    from pipeline.runner import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="recap-bench-"))
    try:
        inputs = []
        for k in range(copies):
            for p in paths:
                dst = work / "in" / f"{k}-{Path(p).name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
                with open(dst, "ab") as fh:  # a trailing byte makes each copy a distinct video_id
                    fh.write(bytes([k]))
                inputs.append(str(dst))
        cfg = load_config(
            None, ["ray.num_cpus=2", "ray.progress=off", "split.resources.concurrency=2", "split.detector=content"]
        )
        out = str(work / "out")
        with RaySession(cfg):  # Ray starts once; the split timing below excludes its start-up
            run_pipeline(cfg, out, inputs=inputs, stages=["ingest"])
            start = time.perf_counter()
            results = run_pipeline(cfg, out, stages=["split"])
            wall = time.perf_counter() - start
        return frames * copies / wall, frames * copies / results[0].seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


_MEM_CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
from pipeline.config import SplitConfig
from pipeline.stages.split import detect_scenes
found = detect_scenes({path!r}, SplitConfig(detector="content"))
print(found["num_frames"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory(short_frames: int = 600, factor: int = 10) -> list[tuple[int, float]]:
    from pipeline.samples import write_sample

    work = Path(tempfile.mkdtemp(prefix="recap-mem-"))
    rows = []
    try:
        for frames in (short_frames, short_frames * factor):
            path = work / f"v{frames}.mp4"
            shots = [(frames // 4, (40 * i, 200 - 30 * i, 90)) for i in range(4)]
            write_sample(str(path), shots, width=640, height=360)
            out = subprocess.run(
                [sys.executable, "-c", _MEM_CHILD.format(root=str(ROOT), path=str(path))],
                capture_output=True,
                text=True,
                check=True,
            )
            n, kb = out.stdout.split()
            rows.append((int(n), int(kb) / 1024))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", help="directory of the shared real videos")
    parser.add_argument("--copies", type=int, default=16, help="copies of each video for the Ray run")
    args = parser.parse_args()
    root = shared_videos(args.videos)
    paths = [str(root / v) for v in VIDEOS if (root / v).exists()]
    if not paths:
        sys.exit(f"no videos found under {root}")
    frames = sum(decode_floor(p) for p in paths)
    print(f"{len(paths)} videos, {frames} frames; {os.cpu_count()} CPUs\n")

    floor, _ = timed(decode_floor, paths, frames)
    psd, psd_cuts = timed(pyscenedetect_default, paths, frames)
    one, recap_cuts = timed(recap_one, paths, frames)
    ray_wall, ray_stage = ray_split(paths, args.copies, frames)

    rows = [
        ("decode floor (PyAV, 1 thread)", floor),
        ("PySceneDetect detect() default", psd),
        ("recap split, 1 process", one),
        (f"recap split, Ray 2 CPUs ({args.copies}x videos)", ray_wall),
    ]
    print(f"{'':44s} {'frames/s':>10s}")
    for name, fps in rows:
        print(f"{name:44s} {fps:10.0f}")
    print()
    print(f"recap 1 process / PySceneDetect default : {one / psd:5.2f}x  (target >= 1.5)")
    print(f"recap 1 process / decode floor          : {one / floor:5.2f}x  (target >= 0.8)")
    print(f"recap Ray 2 CPUs / recap 1 process      : {ray_wall / one:5.2f}x  (target >= 1.6; includes actor start)")
    same = psd_cuts == recap_cuts
    print(f"same cuts as PySceneDetect: {same}" + ("" if same else f"\n  psd   {psd_cuts}\n  recap {recap_cuts}"))

    mem = peak_memory()
    print("\npeak RSS of one split (fresh process, 640x360):")
    for n, mb in mem:
        print(f"  {n:6d} frames: {mb:7.1f} MiB")
    print(f"  growth for {mem[1][0] // mem[0][0]}x the frames: {mem[1][1] - mem[0][1]:+.1f} MiB")
    print(json.dumps({"floor": floor, "pyscenedetect": psd, "recap_one": one, "recap_ray": ray_wall, "mem_mib": mem}))


if __name__ == "__main__":
    main()
