"""End-to-end benchmark of `recap run`: throughput, per-stage time share, streaming memory, Ray vs one process.

1. `recap run` (local Ray, --cpus CPUs) on the sample corpus: clips/min and each stage's share of the time.
2. The same stages called in a plain sequential loop in one process (the stage classes directly, no Ray):
   target: Ray >= 1.6x faster.
3. Peak RSS of the whole `recap run` process tree (driver, Ray, workers) for the corpus and for the corpus
   repeated 4x (distinct files: remuxed copies with another container comment): target within +20%.
Prints figures; asserts nothing.

    python bench/run.py [--cpus 2] [--config configs/smoke.yaml]
"""

from __future__ import annotations

import argparse
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


def remux_copy(src: Path, dst: Path, tag: str) -> None:
    """Same frames, other bytes (a container comment): ingest sees a new video, not a duplicate file."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        out.metadata["comment"] = tag
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = copy
            out.mux(packet)


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


def recap_run(config: str, inputs: list[str], out: Path, cpus: int) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS of the process tree, run.json stages) of one `recap run`."""
    argv = [sys.executable, "-m", "pipeline.cli", "run", "--config", config, "--output", str(out)]
    argv += ["--set", "ray.progress=off", "--set", f"ray.num_cpus={cpus}", "--input", *inputs]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

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

    from pipeline import manifest
    from pipeline.config import load_config
    from pipeline.schema import CLIPS_SCHEMA, FILTERED_CLIPS_SCHEMA
    from pipeline.shards.writer import write_corpus_shards
    from pipeline.stages.caption import CaptionModelStage, CaptionPrepStage
    from pipeline.stages.encode import EncodeModelStage, EncodePrepStage
    from pipeline.stages.filter import ClipModelStage, FilterScoreStage, _filter_decisions, _videos_with_clips
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
    manifest.write_table(str(out), "clips", pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA), prefix="split")
    scored = FilterScoreStage(c)(_videos_with_clips(str(out)).drop_columns(["num_clips"]))
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


def main() -> None:
    from pipeline.samples import generate_samples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recap-bench-run-"))
    try:
        generate_samples(str(work / "videos"))
        base = sorted(str(p) for p in (work / "videos").glob("*.mp4"))
        many = list(base)
        for i in range(1, 4):
            for src in base:
                dst = work / "videos" / f"copy{i}-{Path(src).name}"
                remux_copy(Path(src), dst, f"copy {i}")
                many.append(str(dst))

        wall, peak1, stages = recap_run(args.config, base, work / "ray", args.cpus)
        samples = stages["encode"]["counts"]["samples"]
        clips = stages["split"]["counts"]["clips"]
        seq_s, seq_samples = sequential(args.config, base, work / "seq")
        wall4, peak4, stages4 = recap_run(args.config, many, work / "ray4", args.cpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"sample corpus: {len(base)} videos, {clips} clips, {samples} samples\n")
    print(f"recap run (Ray, {args.cpus} CPUs)   {wall:7.1f} s   {clips / wall * 60:7.1f} clips/min")
    stage_total = sum(s["seconds"] for s in stages.values())
    for name, s in stages.items():
        print(f"  {name:<8} {s['seconds']:6.1f} s  {100 * s['seconds'] / stage_total:5.1f}%")
    print(f"  (outside stages: Ray start-up, planning: {wall - stage_total:.1f} s)")
    print(f"sequential, one process          {seq_s:7.1f} s   ({seq_samples} samples)")
    print(f"Ray / sequential speed-up: {seq_s / wall:.2f}x  (target >= 1.6)\n")
    print(f"peak RSS, corpus x1 ({len(base)} videos)   {peak1 / 2**20:8.1f} MiB")
    print(f"peak RSS, corpus x4 ({len(many)} videos)  {peak4 / 2**20:8.1f} MiB   ({wall4:.1f} s)")
    print(f"x4 / x1: {peak4 / peak1:.2f}  (target <= 1.20)")


if __name__ == "__main__":
    main()
