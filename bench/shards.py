"""Benchmark shard writing against a raw sequential write of the same bytes to the same disk.

Random float16 latents (two buckets) are written through recap's ShardWriter (tar members, sha256,
size bound, temp name + rename) and, as the floor, the same payload bytes are written to one file.
Target: >= 0.8x the raw write. Prints figures; asserts nothing.

    python bench/shards.py [--samples 400] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import webdataset  # noqa: F401 - imported once per writer process; keep it out of the timing

    from pipeline.shards.writer import ShardWriter, bucket_of, sample_members

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
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
    work = Path(tempfile.mkdtemp(prefix="recap-bench-shards-", dir=args.dir))
    try:
        start = time.perf_counter()
        with open(work / "raw.bin", "wb") as fh:
            for sample, _bucket in samples:
                for key, value in sample.items():
                    if key != "__key__":
                        fh.write(value)
            fh.flush()
            os.fsync(fh.fileno())
        raw_s = time.perf_counter() - start

        start = time.perf_counter()
        writer = ShardWriter(str(work / "shards"), max_bytes=64 << 20)
        for sample, bucket in samples:
            writer.write(sample, bucket)
        infos = writer.close()
        shard_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = payload / 2**20
    print(f"{args.samples} samples, {mib:.1f} MiB of payload, {len(infos)} shards\n")
    print(f"{'raw sequential write':28s} {mib / raw_s:8.1f} MiB/s")
    print(f"{'recap ShardWriter':28s} {mib / shard_s:8.1f} MiB/s")
    print(f"\nshards / raw: {raw_s / shard_s:.2f}x  (target >= 0.8)")


if __name__ == "__main__":
    main()
