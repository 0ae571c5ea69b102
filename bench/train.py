"""Benchmark the trainer's data path: is training ever waiting for the shard loader?

1. Data-stall ratio: seconds per training step fed by the real shard loader, over seconds per step fed one
   in-memory batch of the same shape (same model, same step function). Target <= 1.05.
2. Loader throughput: decoded samples/s out of the loader (shuffle, bucketing, npy decode, collation, hand-off
   from the DataLoader workers) over raw sequential iteration of the same tar files with Python's tarfile (every
   member read, nothing decoded). Target >= 0.9x. Also measured in-process (no workers), which shows what the
   worker hand-off costs.

Raw and loader passes alternate for --rounds rounds and each figure is the median of its per-round ratios, so
load from other processes on the machine hits both sides alike. The last line is one JSON object of the figures
(`mfu` only on a GPU).

By default a synthetic corpus of random float16 latents with stored caption embeddings is written to a temp dir
(through the pipeline's shard writer); --data uses a real corpus instead. Prints figures; asserts nothing.

    python bench/train.py [--preset tiny] [--shape 32 4 16 16] [--samples 512] [--steps 80] [--num-workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_synthetic_corpus(out: Path, samples: int, shape: tuple[int, ...], text_len: int, text_dim: int) -> None:
    from pipeline.shards.corpus import write_corpus_shards
    from pipeline.shards.writer import encode_latent

    rng = np.random.default_rng(0)
    meta = {"vae": "bench:random", "vae_sha256": "0" * 64, "latent_dtype": "float16", "text_encoder": "bench"}

    def items():
        for i in range(samples):
            yield {
                "key": f"{i:016x}-0000000-0000010",
                "latent": rng.standard_normal(shape).astype(np.float16),
                "caption": f"synthetic sample {i}",
                "meta": meta,
                "extra": {"text_emb.npy": encode_latent(rng.standard_normal((text_len, text_dim)).astype(np.float16))},
                "row": {"vae": meta["vae"], "num_frames": shape[1], "frame_stride": 1, "height": 0, "width": 0},
            }

    write_corpus_shards(str(out), items(), max_count=64)


def raw_tar_samples_per_s(urls: list[str], passes: int) -> float:
    """Sequential read of every member of every tar: the floor any loader pays."""
    start = time.perf_counter()
    keys = 0
    for _ in range(passes):
        for url in urls:
            with tarfile.open(url, "r|") as tar:
                for member in tar:
                    data = tar.extractfile(member)
                    if data is not None:
                        data.read()
                    if member.name.endswith(".latent.npy"):
                        keys += 1
    return keys / (time.perf_counter() - start)


def loader_samples_per_s(corpus, cfg, samples: int) -> float:
    from trainer.data import ResumableLoader

    loader = ResumableLoader(corpus, cfg)
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["keys"])
        if seen >= samples:
            break
    elapsed = time.perf_counter() - start
    loader.close()
    return seen / elapsed


def step_times(trainer, batches_source, steps: int) -> list[float]:
    """Wall seconds per step, including any wait for the next batch."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batches = batches_source()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a corpus or shards to read (default: a synthetic corpus)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 4, 16, 16], help="synthetic latent (C, T, H, W)")
    parser.add_argument("--samples", type=int, default=512, help="synthetic corpus size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80, help="steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of loader / in-memory steps")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dir", help="where to write the synthetic corpus (default: a temp dir)")
    args = parser.parse_args()

    from trainer.config import config_from_dict
    from trainer.data import open_corpus
    from trainer.distributed import init_distributed
    from trainer.train import Trainer

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    data = args.data
    if data is None:
        data = str(Path(tmp.name) / "corpus")
        t0 = time.perf_counter()
        write_synthetic_corpus(Path(data), args.samples, tuple(args.shape), text_len=16, text_dim=64)
        print(f"synthetic corpus: {args.samples} latents {tuple(args.shape)} in {time.perf_counter() - t0:.1f}s")
    config = config_from_dict(
        {
            "model": {"preset": args.preset},
            "data": {"batch_size": args.batch_size, "num_workers": args.num_workers, "shuffle_buffer": 256},
            "train": {"steps": 10**6, "device": args.device, "compile": args.compile},
        }
    )
    info = init_distributed(args.device)
    trainer = Trainer(config, data, Path(tmp.name) / "run", info)
    trainer.model.train()
    corpus = open_corpus(data, config.data)

    # 1. data-stall ratio
    for _ in range(args.warmup):
        trainer.train_step([next(trainer.loader)])
    fixed = [next(trainer.loader)]
    from_loader: list[float] = []
    in_memory: list[float] = []
    block = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):  # interleaved blocks: load from other processes on the machine hits both alike
        from_loader += step_times(trainer, lambda: [next(trainer.loader)], block)
        in_memory += step_times(trainer, lambda: fixed, block)
    mfu = None
    if trainer.peak:
        records = [trainer.train_step([next(trainer.loader)]) for _ in range(5)]
        mfu = statistics.median(r["mfu"] for r in records)
    trainer.loader.close()
    loader_step, memory_step = statistics.median(from_loader), statistics.median(in_memory)

    # 2. loader vs raw tar iteration, alternating
    n = corpus.num_samples or args.samples
    in_process = config.data.model_copy(update={"num_workers": 0})
    ratios, ratios_in_process, raws, loads = [], [], [], []
    for _ in range(args.rounds):
        raw = raw_tar_samples_per_s(corpus.urls, passes=1)
        loaded = loader_samples_per_s(corpus, config.data, 2 * n)
        raw_again = raw_tar_samples_per_s(corpus.urls, passes=1)
        loaded_in_process = loader_samples_per_s(corpus, in_process, n)
        raws.append(raw), loads.append(loaded)
        ratios.append(loaded / raw)
        ratios_in_process.append(loaded_in_process / raw_again)

    shape = tuple(fixed[0]["latents"].shape)
    figures = {
        "loader_vs_raw_tar": round(statistics.median(ratios), 3),
        "loader_in_process_vs_raw_tar": round(statistics.median(ratios_in_process), 3),
        "data_stall_ratio": round(loader_step / memory_step, 3),
        "loader_samples_per_s": round(statistics.median(loads), 1),
        "raw_tar_samples_per_s": round(statistics.median(raws), 1),
        "num_workers": args.num_workers,
        "device": str(info.device),
        "goals": {"loader_vs_raw_tar": ">= 0.9", "data_stall_ratio": "<= 1.05"},
    }
    if mfu is not None:
        figures["mfu"] = round(mfu, 4)
    print(f"device {info.device}, DiT-{args.preset} ({trainer.num_params / 1e6:.2f}M params), batch {shape}")
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'step s, real shard loader (median)':<44} {loader_step:>12.4f}")
    print(f"{'step s, in-memory batch (median)':<44} {memory_step:>12.4f}")
    print(f"{'data-stall ratio (target <= 1.05)':<44} {figures['data_stall_ratio']:>12.3f}")
    print(f"{'samples/s, raw tar iteration (median)':<44} {figures['raw_tar_samples_per_s']:>12.1f}")
    print(
        f"{'samples/s, loader (workers=' + str(args.num_workers) + ', median)':<44} {figures['loader_samples_per_s']:>12.1f}"
    )
    print(f"{'loader / raw (target >= 0.9)':<44} {figures['loader_vs_raw_tar']:>12.2f}")
    print(f"{'loader in-process / raw':<44} {figures['loader_in_process_vs_raw_tar']:>12.2f}")
    if mfu is not None:
        print(f"{'MFU':<44} {mfu:>12.4f}")
    print(json.dumps(figures))
    tmp.cleanup()


if __name__ == "__main__":
    main()
