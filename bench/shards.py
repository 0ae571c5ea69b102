"""Benchmark shard writing against a raw sequential write of the same payload to the same disk.

Random float16 latents (two buckets) are written through recap's ShardWriter (tar members, sha256,
size bound, temp name + fsync + rename) and, as the floor, the same payload bytes are written to one
file and fsynced. Both run `--repeat` times, alternating, each into a fresh directory on the same
disk; the medians are reported (throughput counts the payload only: the tar headers and padding are
extra work for the writer). Target: >= 0.8x the raw write. For reference, a third run writes the raw
file with the same early-writeback hint the writer uses (POSIX_FADV_DONTNEED every 8 MiB), the
fastest a plain write + fsync gets here. Prints figures; asserts nothing. The machine's other load
moves the figures: the writer needs a second core for sha256, which a plain write does not.

    python bench/shards.py [--samples 400] [--repeat 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from pipeline.shards.writer import ShardWriter, bucket_of, sample_members

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes = [(32, 5, 32, 56), (32, 5, 56, 32)]
    samples = []
    for i in range(args.samples):
        latent = rng.standard_normal(shapes[i % 2]).astype(np.float16)
        samples.append(
            (sample_members(f"{i:016x}-0000000-0000100", latent, "a caption " * 30, {"i": i}), bucket_of(latent.shape))
        )
    payload = sum(len(v) for s, _ in samples for k, v in s.items() if k != "__key__")

    def raw(run_dir: Path, hint: bool = False) -> float:
        start = time.perf_counter()
        with open(run_dir / "raw.bin", "wb") as fh:
            hinted = written = 0
            for sample, _bucket in samples:
                for key, value in sample.items():
                    if key != "__key__":
                        fh.write(value)
                        written += len(value)
                if hint and written - hinted >= 8 << 20:
                    fh.flush()
                    os.posix_fadvise(fh.fileno(), hinted, written - hinted, os.POSIX_FADV_DONTNEED)
                    hinted = written
            fh.flush()
            os.fsync(fh.fileno())
        return time.perf_counter() - start

    def raw_hinted(run_dir: Path) -> float:
        return raw(run_dir, hint=True)

    def shards(run_dir: Path) -> float:
        start = time.perf_counter()
        writer = ShardWriter(str(run_dir / "shards"), max_bytes=64 << 20)
        for sample, bucket in samples:
            writer.write(sample, bucket)
        infos = writer.close()
        elapsed = time.perf_counter() - start
        counts.append((len(infos), sum(i.bytes for i in infos)))
        return elapsed

    work = Path(tempfile.mkdtemp(prefix="recap-bench-shards-", dir=args.dir))
    counts: list[tuple[int, int]] = []
    runs = [("raw", raw), ("shards", shards)]
    if hasattr(os, "posix_fadvise"):
        runs.append(("raw_hinted", raw_hinted))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name, _ in runs}  # all threads of this process
    try:
        for i in range(args.repeat):
            order = runs if i % 2 == 0 else runs[::-1]
            for name, fn in order:
                run_dir = work / f"{name}-{i}"
                run_dir.mkdir()
                os.sync()  # start each run with no dirty pages of an earlier one
                cpu = time.process_time()
                times[name].append(fn(run_dir))
                cpu_times[name].append(time.process_time() - cpu)
                shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw_s, shard_s = statistics.median(times["raw"]), statistics.median(times["shards"])
    mib = payload / 2**20
    num_shards, shard_bytes = counts[0]
    print(
        f"{args.samples} samples, {mib:.1f} MiB of payload, {num_shards} shards ({shard_bytes / 2**20:.1f} MiB), "
        f"median of {args.repeat} runs\n"
    )
    cpu = {name: statistics.median(v) for name, v in cpu_times.items()}
    print(f"{'raw sequential write':28s} {mib / raw_s:8.1f} MiB/s  {cpu['raw']:.2f} CPU s")
    print(f"{'recap ShardWriter':28s} {mib / shard_s:8.1f} MiB/s  {cpu['shards']:.2f} CPU s")
    if times.get("raw_hinted"):
        hinted_s = statistics.median(times["raw_hinted"])
        print(f"{'raw, writeback hinted':28s} {mib / hinted_s:8.1f} MiB/s  {cpu['raw_hinted']:.2f} CPU s (reference)")
    print(f"\nshards / raw: {raw_s / shard_s:.2f}x  (target >= 0.8)")
    figures = {
        "shards_vs_raw": round(raw_s / shard_s, 3),
        "shard_cpu_s": round(cpu["shards"], 3),
        "raw_cpu_s": round(cpu["raw"], 3),
        "goals": {"shards_vs_raw": ">= 0.8"},
    }
    if times.get("raw_hinted"):
        print(f"shards / raw, writeback hinted: {hinted_s / shard_s:.2f}x")
        figures["shards_vs_raw_hinted"] = round(hinted_s / shard_s, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
