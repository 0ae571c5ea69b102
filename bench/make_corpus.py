"""A benchmark corpus of distinct content: procedurally generated 640x360 videos made of hard-cut shots.

Every shot is its own scene: a multi-octave noise texture in a random palette, seen through a camera that pans
and zooms at its own speed, with a few moving shapes in front. No two shots share frames, so near-duplicate
detection keeps them all (remuxed copies of the same videos, as the old 4x corpus was, are mostly dropped by
dedup and do little work), and the filters' thresholds (motion, sharpness, brightness) pass most of them.
Deterministic for a seed: the same command makes the same files (same bytes with the same PyAV/x264).

    python bench/make_corpus.py OUT_DIR [--minutes 10] [--videos 10] [--seed 0]

The last line printed is one JSON object: files, seconds of video, and how long making them took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT, FPS = 640, 360, 24


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: noise summed over octaves, mapped through a random three-colour palette."""
    import cv2

    field = np.zeros((height, width), np.float32)
    for octave in range(8):
        cells = 3 * 2**octave
        coarse = rng.standard_normal((cells, cells * width // height + 1)).astype(np.float32)
        field += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) / (1.25**octave)
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    # dark, middle and light colours, blended along the field: contrast enough for the sharpness filter
    palette = np.stack([rng.uniform(15, 80, 3), rng.uniform(70, 180, 3), rng.uniform(170, 245, 3)]).astype(np.float32)
    low = np.clip(1 - 2 * field, 0, 1)[..., None]
    high = np.clip(2 * field - 1, 0, 1)[..., None]
    mid = 1 - low - high
    return (low * palette[0] + mid * palette[1] + high * palette[2]).astype(np.uint8)


def shot_frames(rng: np.random.Generator, count: int):
    """`count` RGB frames of one shot: a pan and zoom over a texture, shapes moving in front."""
    import cv2

    texture = _texture(rng, 2 * HEIGHT, 2 * WIDTH)
    start = rng.uniform([0, 0], [WIDTH, HEIGHT])
    velocity = rng.uniform(-1, 1, 2) * rng.uniform(1.5, 6.0)  # pixels per frame
    zoom0, zoom1 = rng.uniform(1.0, 1.6, 2)
    shapes = [
        (rng.uniform([0, 0], [WIDTH, HEIGHT]), rng.uniform(-4, 4, 2), int(rng.integers(12, 60)),
         tuple(int(c) for c in rng.integers(0, 256, 3)))
        for _ in range(int(rng.integers(1, 5)))
    ]  # fmt: skip
    for i in range(count):
        a = i / max(1, count - 1)
        zoom = zoom0 + (zoom1 - zoom0) * a
        x, y = np.clip(start + velocity * i, 0, [WIDTH, HEIGHT])
        m = np.float32([[zoom, 0, -x * zoom], [0, zoom, -y * zoom]])
        frame = cv2.warpAffine(texture, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for center, speed, radius, color in shapes:
            cx, cy = (center + speed * i) % [WIDTH, HEIGHT]
            cv2.circle(frame, (int(cx), int(cy)), radius, color, thickness=-1, lineType=cv2.LINE_AA)
        yield frame


def make_video(path: Path, seconds: float, rng: np.random.Generator) -> int:
    """One video of about `seconds`, hard cuts between shots of 3-8 s; returns the number of shots."""
    import av

    total = int(seconds * FPS)
    shots = 0
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        written = 0
        while written < total:
            length = min(total - written, int(rng.uniform(3, 8) * FPS))
            for frame in shot_frames(rng, length):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            written += length
            shots += 1
        for packet in stream.encode():
            out.mux(packet)
    return shots


def make_corpus(out: Path, minutes: float = 10.0, videos: int = 10, seed: int = 0) -> list[Path]:
    """`videos` files of distinct content adding up to `minutes`; files already there are kept (same seed, same
    content), so a benchmark can call this every time."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(videos):
        path = out / f"distinct-{seed}-{v:03d}.mp4"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.partial.mp4")
            make_video(tmp, 60 * minutes / videos, np.random.default_rng([seed, v]))
            tmp.replace(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    paths = make_corpus(args.out, args.minutes, args.videos, args.seed)
    elapsed = time.perf_counter() - start
    import av

    seconds = 0.0
    for p in paths:
        with av.open(str(p)) as c:
            seconds += float(c.duration or 0) / av.time_base
    print(f"{len(paths)} videos, {seconds / 60:.1f} min of {WIDTH}x{HEIGHT} in {args.out} ({elapsed:.0f} s)")
    print(json.dumps({"files": len(paths), "seconds": round(seconds, 1), "make_s": round(elapsed, 1)}))


if __name__ == "__main__":
    main()
