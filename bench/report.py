"""Benchmark `recap report` on a synthetic manifest: generation time and the data the page's first paint loads.

Writes a corpus manifest with no videos (default 100,000 clips over 1,000 videos: every score column, reasons,
60-word captions, caption flags, near-duplicates, samples in two latent buckets, shards, run.json) and builds its
report without thumbnails `--repeat` times. Stated bounds: generation under 30 s for 100k clips on 2 cores, and a
first paint (index.html plus the first gallery chunk; thumbnails not counted) under 1 MB whatever the corpus size.
Prints figures; asserts nothing.

    python bench/report.py [--clips 100000] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENERATION_BOUND_S = 30.0  # for 100k clips; scales linearly
FIRST_PAINT_BOUND = 1_000_000

WORDS = np.array(
    [
        "a",
        "red",
        "car",
        "drives",
        "slowly",
        "along",
        "a",
        "wet",
        "street",
        "at",
        "night",
        "while",
        "people",
        "with",
        "umbrellas",
        "cross",
    ]
)


def write_synthetic_corpus(out: Path, n_clips: int, n_videos: int = 1000, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    video_ids = [f"{i:016x}" for i in range(n_videos)]
    per_video = np.bincount(rng.integers(0, n_videos, n_clips), minlength=n_videos)
    video_of = np.repeat(np.arange(n_videos), per_video)
    index_in_video = np.concatenate([np.arange(k) for k in per_video])
    start_frame = index_in_video * 120
    scores = {
        "motion": rng.gamma(2.0, 1.0, n_clips),
        "frozen": rng.beta(1, 8, n_clips),
        "cut_inside": rng.beta(1, 6, n_clips),
        "sharpness": rng.lognormal(4, 1, n_clips),
        "brightness": rng.normal(110, 40, n_clips),
        "clipped": rng.beta(1, 20, n_clips),
        "black": rng.beta(1, 30, n_clips),
        "text": rng.beta(1, 15, n_clips),
        "aesthetic": rng.normal(5, 1, n_clips),
        "nsfw": rng.beta(1, 40, n_clips),
    }
    failing = {
        "too_dark": scores["brightness"] < 25,
        "blurry": scores["sharpness"] < 20,
        "low_motion": scores["motion"] < 0.5,
        "text_heavy": scores["text"] > 0.15,
    }
    reasons = [[name for name, mask in failing.items() if mask[i]] for i in range(n_clips)]
    duplicate = rng.random(n_clips) < 0.02
    clip_ids = [f"{video_ids[v]}-{s:07d}-{s + 120:07d}" for v, s in zip(video_of, start_frame, strict=True)]
    near = [clip_ids[max(i - 1, 0)] if duplicate[i] and not reasons[i] else None for i in range(n_clips)]
    reject = [r[0] if r else ("near_duplicate" if d else None) for r, d in zip(reasons, near, strict=True)]
    captions = [" ".join(rng.choice(WORDS, 60)) for _ in range(min(n_clips, 5000))]
    clips = pa.table(
        {
            "clip_id": clip_ids,
            "video_id": [video_ids[v] for v in video_of],
            "uri": [f"s3://bucket/raw/video-{v:05d}.mp4" for v in video_of],
            "start_frame": start_frame,
            "end_frame": start_frame + 120,
            "start_s": start_frame / 24.0,
            "end_s": (start_frame + 120) / 24.0,
            "duration_s": np.full(n_clips, 5.0),
            "passed": [r is None for r in reject],
            "reject_reason": reject,
            "filter_reasons": reasons,
            "near_duplicate_of": near,
            "camera_motion": rng.choice(["static", "pan_left", "zoom_in", "mixed"], n_clips),
            "caption": [captions[i % len(captions)] if reject[i] is None else None for i in range(n_clips)],
            "caption_flags": [["repetition"] if i % 97 == 0 and reject[i] is None else [] for i in range(n_clips)],
            **{f"score_{k}": v for k, v in scores.items()},
        }
    )
    passed_ids = [c for c, r in zip(clip_ids, reject, strict=True) if r is None]
    samples = pa.table(
        {
            "key": passed_ids,
            "shard": [f"shard-{i // 2000:06d}.tar" for i in range(len(passed_ids))],
            "latent_shape": [[32, 5, 24, 40] if i % 3 else [32, 5, 40, 24] for i in range(len(passed_ids))],
            "bytes": np.full(len(passed_ids), 307_712),
            "num_frames": np.full(len(passed_ids), 17, np.int32),
        }
    )
    n_shards = (len(passed_ids) + 1999) // 2000
    shards = pa.table({"shard": [f"shard-{i:06d}.tar" for i in range(n_shards)], "bytes": np.full(n_shards, 615e6)})
    videos = pa.table(
        {
            "video_id": video_ids,
            "uri": [f"s3://bucket/raw/video-{v:05d}.mp4" for v in range(n_videos)],
            "status": ["ok"] * n_videos,
            "reject_reason": [None] * n_videos,
            "duration_s": per_video * 5.0 + 30.0,
        }
    )
    for name, table in (("videos", videos), ("clips", clips), ("samples", samples), ("shards", shards)):
        (out / "manifest" / name / "bench").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "manifest" / name / "bench" / "part-00000.parquet")
    pool = {"num_cpus": 1, "num_gpus": 0, "concurrency": 2}
    config = {
        "filter": {"thresholds": {"motion": {"min": 0.5}, "sharpness": {"min": 20}, "brightness": {"min": 25}}},
        **{stage: {"resources": pool} for stage in ("ingest", "split", "filter", "caption", "encode")},
    }
    stages = {s: {"status": "done", "seconds": float(n_clips) / r} for s, r in zip(
        ("ingest", "split", "filter", "caption", "encode"), (900, 300, 60, 20, 40), strict=True
    )}  # fmt: skip
    (out / "manifest" / "run.json").write_text(json.dumps({"config": config, "stages": stages}))


def main() -> None:
    from pipeline.report import PlanRequest, build_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-report-"))
    corpus = root / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    write_synthetic_corpus(corpus, args.clips)
    results = [
        build_report(str(corpus), plan=PlanRequest(10_000, 64, 1024), thumbnails=False) for _ in range(args.repeat)
    ]
    seconds = statistics.median(r.seconds for r in results)
    last = results[-1]
    report = corpus / "report"
    index_bytes = (report / "index.html").stat().st_size
    data_bytes = sum(p.stat().st_size for p in (report / "data").iterdir())
    largest_column = max((p for p in (report / "data").glob("col-*.js")), key=lambda p: p.stat().st_size)
    bound = GENERATION_BOUND_S * args.clips / 100_000
    print(f"recap report on a synthetic manifest of {args.clips:,} clips (no thumbnails), {args.repeat} runs")
    print(f"  {'figure':<34} {'value':>14} {'bound':>12} {'ratio':>7}")
    print(f"  {'generation, median':<34} {seconds:>12.2f} s {bound:>10.1f} s {seconds / bound:>7.2f}")
    for phase, t in last.timings.items():
        print(f"    {phase:<32} {t:>12.2f} s")
    print(f"  {'first paint (index + 1st chunk)':<34} {last.first_paint_bytes / 1e3:>11.0f} KB "
          f"{FIRST_PAINT_BOUND / 1e3:>9.0f} KB {last.first_paint_bytes / FIRST_PAINT_BOUND:>7.2f}")  # fmt: skip
    print(f"    {'index.html':<32} {index_bytes / 1e3:>11.0f} KB")
    print(f"    {'clips-0000.js':<32} {(last.first_paint_bytes - index_bytes) / 1e3:>11.0f} KB")
    print(f"  {'gallery chunks':<34} {last.chunks:>14,}")
    print(f"  {'all data files':<34} {data_bytes / 1e6:>11.1f} MB")
    print(
        f"  {'largest sort column (' + largest_column.stem + ')':<34} {largest_column.stat().st_size / 1e3:>11.0f} KB"
    )
    plan = last.plan
    print(f"  projection for 10,000 h on 64 GPUs / 1,024 CPUs: {plan.wall_s / 3600:,.1f} h, bounded by "
          f"{plan.bounding_stage}; latent shards {plan.storage_bytes / 1e12:,.2f} TB")  # fmt: skip
    print(
        json.dumps(
            {
                "clips": args.clips,
                "generation_s": round(seconds, 2),
                "generation_vs_bound": round(seconds / bound, 3),
                "first_paint_bytes": last.first_paint_bytes,
                "first_paint_vs_bound": round(last.first_paint_bytes / FIRST_PAINT_BOUND, 3),
                "data_bytes": data_bytes,
                "goals": {"generation_vs_bound": "<= 1", "first_paint_vs_bound": "<= 1"},
            }
        )
    )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
