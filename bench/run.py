"""End-to-end benchmark of `recap run`: throughput, per-stage time share, driver load, Ray vs one process.

The corpus is distinct content (bench/make_corpus.py: procedurally generated 640x360 shots, hard cuts, no two
shots alike), --minutes of it, and four times that for the scaling figures. Cached in --corpus-dir if given.

1. `recap run` (local Ray, --cpus CPUs) on the corpus: clips/min and each stage's share of the time.
2. The same `recap run` with `ray.streaming=false` (one stage at a time): the streaming run's wall over the sum
   of its stage walls, target <= 0.8.
3. The same stages called in a plain sequential loop in one process (the stage classes directly, no Ray):
   target: Ray >= 1.6x faster.
4. The driver process alone: bytes it writes to storage over the shard bytes (target < 2%: workers should
   write), and its peak RSS on the 4x corpus over the 1x corpus (target <= 1.1: it must not carry the corpus).
   Peak RSS of the whole process tree (driver, Ray, workers) too. The smoke config's latents are tiny (96x128,
   5 frames), so the driver's fixed writes (run.json at each stage's start and end, its lease's heartbeat, the
   small tables, Ray's log of the driver) weigh much against them; one more run on --latent-videos videos of
   the 4x corpus with latents of a real size (TAEF2 at 256x448, 17 frames) gives the figure as a training corpus
   would have it. The driver's count leaves out its children (a local Ray's GCS and raylet): the kernel adds a
   child's writes to its parent's when the child exits.
Prints figures and ends with one JSON line of them; asserts nothing.

    python bench/run.py [--minutes 10] [--cpus 2] [--config configs/smoke.yaml] [--corpus-dir DIR] [--latent-videos 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def recap_run(
    config: str, inputs: list[str], out: Path, cpus: int, extra: tuple[str, ...] = ()
) -> tuple[float, dict[str, int], dict]:
    """(wall seconds, {tree_rss, driver_rss, driver_write_bytes} peaks, run.json stages) of one `recap run`."""
    argv = [sys.executable, "-m", "pipeline.cli", "run", "--config", config, "--output", str(out)]
    argv += ["--set", "ray.progress=off", "--set", f"ray.num_cpus={cpus}"]
    for override in extra:
        argv += ["--set", override]
    argv += ["--input", *inputs]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import psutil

    peak = {"tree_rss": 0, "driver_rss": 0, "driver_write_bytes": 0}
    stop = threading.Event()
    driver = psutil.Process(proc.pid)

    children: dict[int, int] = {}  # the driver's child processes (a local Ray's GCS, raylet, ...): last write_bytes

    def sample() -> None:
        while not stop.is_set():
            peak["tree_rss"] = max(peak["tree_rss"], tree_rss(proc.pid))
            try:
                peak["driver_rss"] = max(peak["driver_rss"], driver.memory_info().rss)
                live = set()
                for child in driver.children():
                    with contextlib.suppress(psutil.Error):
                        children[child.pid] = child.io_counters().write_bytes
                        live.add(child.pid)
                # write_bytes: what the process sent towards storage (page cache included), not pipes or sockets.
                # The kernel adds a reaped child's count (its own reaped children's included) to its parent's: the
                # local Ray's processes, reaped at shutdown, are taken out at their last count (what they wrote
                # after it stays in: the figure errs high).
                reaped = sum(n for pid, n in children.items() if pid not in live)
                own = driver.io_counters().write_bytes - reaped
                peak["driver_write_bytes"] = max(peak["driver_write_bytes"], own)
            except psutil.Error:
                pass  # exited between samples: its last values stand
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"recap run failed:\n{err[-3000:]}")
    stages = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    return wall, peak, stages


def sequential(config_path: str, inputs: list[str], out: Path) -> tuple[float, int]:
    """The same stages, one process, no Ray: (seconds, samples written)."""
    import pyarrow as pa

    from pipeline.config import load_config
    from pipeline.schema import CLIPS_SCHEMA, FILTERED_CLIPS_SCHEMA
    from pipeline.shards.corpus import write_corpus_shards
    from pipeline.stages.caption import CaptionModelStage, CaptionPrepStage
    from pipeline.stages.encode import EncodeModelStage, EncodePrepStage
    from pipeline.stages.filter import ClipModelStage, ClipsToScore, FilterScoreStage, _filter_decisions
    from pipeline.stages.ingest import IngestStage, mark_duplicates
    from pipeline.stages.split import SplitStage, clip_rows_from_results

    cfg = load_config(ROOT / config_path, ["ray.progress=off"])
    c = cfg.to_dict()
    start = time.perf_counter()
    videos = mark_duplicates(IngestStage(c)(pa.table({"uri": inputs})).to_pylist())
    ok = pa.Table.from_pylist([v for v in videos if v["status"] == "ok"])
    clips = clip_rows_from_results(
        SplitStage(c, None)(ok.select(["video_id", "uri", "num_frames", "num_frames_exact"]))
    )
    scored = FilterScoreStage(c)(ClipsToScore(False, [])(pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA)))
    if cfg.filter.clip.model:
        scored = ClipModelStage(c)(scored)
    if "frames_jpeg" in scored.column_names:
        scored = scored.drop_columns(["frames_jpeg"])
    thresholds = {k: v.model_dump() for k, v in cfg.filter.thresholds.items()}
    decided = [_filter_decisions(r, thresholds, {}) for r in scored.to_pylist()]
    passed = pa.Table.from_pylist([r for r in decided if r["passed"]], schema=FILTERED_CLIPS_SCHEMA)
    prep = CaptionPrepStage(c)(passed.select(["clip_id", "uri", "start_s", "end_s", "duration_s", "fps"]))
    captions = {r["clip_id"]: r["caption"] for r in CaptionModelStage(c)(prep).to_pylist()}
    enc_in = passed.select(["clip_id", "uri", "start_frame", "end_frame", "start_s", "fps"])
    enc_in = enc_in.append_column("caption", pa.array([captions.get(i) for i in enc_in.column("clip_id").to_pylist()]))
    latents = EncodeModelStage(c)(EncodePrepStage(c)(enc_in))

    def samples():
        import io

        import numpy as np

        for row in latents.to_pylist():
            if row["latent"]:
                latent = np.load(io.BytesIO(row["latent"]), allow_pickle=False)
                yield {
                    "key": row["clip_id"],
                    "latent": latent,
                    "caption": captions.get(row["clip_id"]) or "",
                    "meta": {},
                }

    counts = write_corpus_shards(str(out), samples(), max_bytes=cfg.encode.shard_max_bytes)
    return time.perf_counter() - start, counts["samples"]


def shard_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))


# Latents of the size a training corpus has (TAEF2 at 256x448, 17 frames), for the driver-bytes figure.
REAL_LATENTS = ("encode.target_area=114688", "encode.num_frames=17")


def main() -> None:
    from make_corpus import make_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=10.0, help="video in the 1x corpus (the 4x has 4 times)")
    parser.add_argument("--corpus-dir", type=Path, help="where to make (and keep) the corpus; default: a temp dir")
    parser.add_argument(
        "--latent-videos",
        type=int,
        default=6,
        help="videos (of the 4x corpus) of one more run with latents of a real size (TAEF2 at 256x448, 17 "
        "frames) for the driver-bytes figure, whose smoke-sized latents (96x128, 5 frames) make metadata look big; "
        "0: skip it",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recap-bench-run-"))
    videos = args.corpus_dir or work / "videos"
    try:
        per_video = 1.0  # minutes: the 1x files are the first quarter of the 4x files
        count = max(1, round(args.minutes / per_video))
        many = [str(p) for p in make_corpus(videos, per_video * 4 * count, 4 * count)]
        base = many[:count]
        wall, peak1, stages = recap_run(args.config, base, work / "ray", args.cpus)
        written = shard_bytes(work / "ray")
        samples = stages["encode"]["counts"]["samples"]
        clips = stages["split"]["counts"]["clips"]
        one_at_a_time, _, stages_apart = recap_run(
            args.config, base, work / "apart", args.cpus, ("ray.streaming=false",)
        )
        seq_s, seq_samples = sequential(args.config, base, work / "seq")
        wall4, peak4, stages4 = recap_run(args.config, many, work / "ray4", args.cpus)
        written4 = shard_bytes(work / "ray4")
        real = None
        if args.latent_videos:
            _, peak_real, _ = recap_run(
                args.config, many[: args.latent_videos], work / "real", args.cpus, REAL_LATENTS
            )
            real = (peak_real["driver_write_bytes"], shard_bytes(work / "real"), len(many[: args.latent_videos]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"distinct corpus: {len(base)} videos ({args.minutes:g} min), {clips} clips, {samples} samples\n")
    print(f"recap run (Ray, {args.cpus} CPUs)   {wall:7.1f} s   {clips / wall * 60:7.1f} clips/min")
    stage_total = sum(s["seconds"] for s in stages.values())
    for name, s in stages.items():
        print(f"  {name:<8} {s['seconds']:6.1f} s  {100 * s['seconds'] / stage_total:5.1f}%")
    if wall >= stage_total:
        print(f"  (outside stages: Ray start-up, planning: {wall - stage_total:.1f} s)")
    else:  # streamed stages run at the same time: their seconds add up to more than the wall
        print(f"  (stages overlapped: their seconds add up to {stage_total - wall:.1f} s more than the wall)")
    apart_sum = sum(s["seconds"] for s in stages_apart.values())
    print(f"one stage at a time (Ray)        {one_at_a_time:7.1f} s   (stages {apart_sum:.1f} s)")
    print(
        f"streaming / one stage at a time: {wall / one_at_a_time:.2f} of the wall, {wall / apart_sum:.2f} of the stage sum"
    )
    print(f"sequential, one process          {seq_s:7.1f} s   ({seq_samples} samples)")
    print(f"Ray / sequential speed-up: {seq_s / wall:.2f}x  (target >= 1.6)\n")
    mib = 2**20
    print(f"driver writes {peak1['driver_write_bytes'] / mib:.1f} MiB for {written / mib:.1f} MiB of shards (x1)")
    if real is not None:
        print(
            f"driver writes {real[0] / mib:.1f} MiB for {real[1] / mib:.1f} MiB of shards "
            f"({real[2]} videos, {' '.join(REAL_LATENTS)})"
        )
    print(f"peak RSS x1: driver {peak1['driver_rss'] / mib:.0f} MiB, tree {peak1['tree_rss'] / mib:.0f} MiB")
    print(
        f"peak RSS x4: driver {peak4['driver_rss'] / mib:.0f} MiB, tree {peak4['tree_rss'] / mib:.0f} MiB ({wall4:.0f} s)"
    )
    figures = {
        "ray_vs_sequential": round(seq_s / wall, 3),
        "driver_write_vs_shard_bytes": round(peak1["driver_write_bytes"] / max(1, written), 4),
        "driver_write_vs_shard_bytes_4x": round(peak4["driver_write_bytes"] / max(1, written4), 4),
        "driver_write_vs_shard_bytes_real_latents": round(real[0] / max(1, real[1]), 4) if real else None,
        "real_latent_videos": real[2] if real else 0,
        "driver_rss_4x_vs_1x": round(peak4["driver_rss"] / max(1, peak1["driver_rss"]), 3),
        "tree_rss_4x_vs_1x": round(peak4["tree_rss"] / max(1, peak1["tree_rss"]), 3),
        "streaming_vs_stage_sum": round(wall / max(apart_sum, 1e-9), 3),
        "streaming_vs_one_at_a_time_wall": round(wall / one_at_a_time, 3),
        "clips": clips,
        "samples": samples,
        "samples_4x": stages4["encode"]["counts"]["samples"],
        "wall_s": round(wall, 1),
        "wall_4x_s": round(wall4, 1),
        "goals": {
            "ray_vs_sequential": ">= 1.6",
            "driver_write_vs_shard_bytes": "< 0.02",
            "driver_write_vs_shard_bytes_real_latents": "< 0.02",
            "driver_rss_4x_vs_1x": "<= 1.1",
            "streaming_vs_stage_sum": "<= 0.8",
        },
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
