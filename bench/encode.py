"""Benchmark the encode stage against the bare VAE forward pass given the same CPUs, and say where the gap goes.

Setup (not timed): ingest + split of shared videos into a corpus. Then, in one run:
  1. the full encode stage (`run_encode`: Ray prep actors decode/stride/bucket/crop in their isolated child, VAE
     actors encode, float16 latents, shards + manifests written), frames/s, after one warm-up run;
  2. the same two actor pools alone (no shards), with each actor recording when it started, each call and each
     VAE forward: a timeline of start-up, decode, hand-off and encode;
  3. the parts, in one Ray task given the stage's CPUs: decode + prep per clip (in that process and through the
     isolated child), and the VAE forward with the stage VAE actor's torch threads;
  4. the bare VAE, in that task: the same clips prepared up front (`prepare_clip`) and only `Vae.encode` timed,
     with `--cpus` torch threads (the CPUs Ray gives the whole stage), frames/s. Stage and bare: best of --repeat.
Goal: stage frames/s / bare frames/s >= 0.8. Prints a table and, last, one JSON line; asserts nothing.

    python bench/encode.py [--vae DIR_OR_SPEC] [--area 12288] [--frames 9] [--cpus 2] [--repeat 2] [--set KEY=VALUE]

On a shared machine the timings move with the load: compare the ratio of one run, and repeat a run that looks off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("RECAP_SHARED", ROOT.parent / "shared"))
VIDEOS = ["testvideo.mp4", "big_buck_bunny_0_30.webm", "bottle-detection.mp4", "issue-134-rotate.mp4"]


def timed_stages(log_dir: str) -> tuple[type, type]:
    """The stage's own two classes, each actor appending JSON lines of what it did and when to `log_dir`."""
    from pipeline.stages.encode import EncodeModelStage, EncodePrepStage

    def record(kind: str, **event) -> None:
        with open(os.path.join(log_dir, f"{kind}-{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps(event) + "\n")

    class TimedPrep(EncodePrepStage):
        def __init__(self, config):
            t0 = time.time()
            super().__init__(config)
            record("prep", event="init", t0=t0, t1=time.time(), pid=os.getpid())

        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            record("prep", event="call", t0=t0, t1=time.time(), rows=out.num_rows, bytes=out.nbytes)
            return out

    class TimedModel(EncodeModelStage):
        def __init__(self, config):
            import torch

            t0 = time.time()
            super().__init__(config)
            record("model", event="init", t0=t0, t1=time.time(), threads=torch.get_num_threads())

        def encode_clips(self, frames):
            t0 = time.time()
            out = super().encode_clips(frames)
            record("model", event="forward", t0=t0, t1=time.time(), frames=int(frames.shape[0] * frames.shape[1]))
            return out

        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            record("model", event="call", t0=t0, t1=time.time(), rows=out.num_rows)
            return out

    return TimedPrep, TimedModel


def pipeline_timeline(cfg, todo, log_dir: str) -> dict[str, float]:
    """Run the stage's two pools (as run_encode wires them, without the shards) and read the actors' records."""
    import ray.data

    from pipeline.engine import map_stage

    timed_prep, timed_model = timed_stages(log_dir)
    start = time.time()
    ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
    ds = map_stage(ds, timed_prep, cfg.encode.prep_resources, (cfg.to_dict(),))
    ds = map_stage(ds, timed_model, cfg.encode.resources, (cfg.to_dict(),))
    rows = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    end = time.time()
    events: dict[str, list[dict]] = {"prep": [], "model": []}
    for path in Path(log_dir).glob("*.jsonl"):
        kind = path.name.split("-")[0]
        events[kind] += [json.loads(line) for line in path.read_text().splitlines()]

    def of(kind: str, event: str) -> list[dict]:
        return [e for e in events[kind] if e["event"] == event]

    def busy(items: list[dict]) -> float:
        return sum(e["t1"] - e["t0"] for e in items)

    model_calls, forwards = of("model", "call"), of("model", "forward")
    first_model_call = min(e["t0"] for e in model_calls)
    last_model_call = max(e["t1"] for e in model_calls)
    inits = of("prep", "init") + of("model", "init")
    return {
        "rows": rows,
        "wall_s": end - start,
        # Nothing is encoded before the VAE actor's first call: Ray's planning, actor processes, imports, model load.
        "to_first_encode_s": first_model_call - start,
        "actor_init_s": max(e["t1"] for e in inits) - min(e["t0"] for e in inits),
        "model_init_s": busy(of("model", "init")),
        "prep_calls_s": busy(of("prep", "call")),
        "prep_actors": len({e["pid"] for e in of("prep", "init")}),
        "prep_out_mb": sum(e["bytes"] for e in of("prep", "call")) / 1e6,
        "model_calls_s": busy(model_calls),
        "model_forward_s": busy(forwards),
        "model_threads": max(e["threads"] for e in of("model", "init")),
        "model_batches": len(model_calls),
        "clips_per_model_batch": sum(e["rows"] for e in model_calls) / len(model_calls),
        # Between its first and last call, the time the VAE actor had no batch: waiting on decode or on Ray.
        "model_waiting_s": (last_model_call - first_model_call) - busy(model_calls),
        "after_last_encode_s": end - last_model_call,
    }


def measure_parts(cfg_dict: dict, todo: list[dict], actor_threads: int, cpus: int, repeat: int) -> dict[str, float]:
    """Decode + prep of every clip, in this process and through the isolated child, then the VAE forward alone on
    the prepared frames with the VAE actor's threads and with `cpus` threads (the bare baseline)."""
    import numpy as np
    import torch

    from pipeline.config import RecapConfig
    from pipeline.stages.encode import prepare_clip
    from pipeline.vae.load import vae_from_config, vae_geometry
    from pipeline.video.isolation import IsolatedWorker

    cfg = RecapConfig.model_validate(cfg_dict)
    temporal, spatial = vae_geometry(cfg.encode)
    args = (cfg.encode.model_dump(mode="json"), temporal, int(np.lcm(cfg.encode.multiple, spatial)), cfg.video.backend)
    start = time.perf_counter()
    prepared = []
    for c in todo:
        out = prepare_clip(c, *args)
        prepared.append(np.frombuffer(out["frames"], np.uint8).reshape(out["frames_shape"]))
    decode_s = time.perf_counter() - start
    with IsolatedWorker() as worker:
        worker.run("pipeline.stages.encode:prepare_clip", todo[0], *args)  # start the child, import in it
        start = time.perf_counter()
        for c in todo:
            worker.run("pipeline.stages.encode:prepare_clip", c, *args)
        isolated_s = time.perf_counter() - start
    vae = vae_from_config(cfg.encode, "cpu")
    tensors = [torch.from_numpy(f.copy()).permute(0, 3, 1, 2).float() / 255 for f in prepared]

    def forward_s(threads: int) -> float:
        torch.set_num_threads(threads)
        vae.encode(tensors[0])  # warm-up
        start = time.perf_counter()
        for x in tensors:
            vae.encode(x)
        return time.perf_counter() - start

    return {
        "decode_s": decode_s,
        "isolated_s": isolated_s,
        "actor_forward_s": forward_s(actor_threads),
        "bare_s": min(forward_s(cpus) for _ in range(repeat)),
        "bare_frames": sum(x.shape[0] for x in tensors),
    }


def main() -> None:
    import logging

    import pyarrow as pa
    import ray

    from pipeline import manifest
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.stages.encode import run_encode

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=str(SHARED / "data" / "models" / "taef2"))
    parser.add_argument("--area", type=int, default=128 * 96, help="pixels per frame (bucket target area)")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray, and torch threads of the bare VAE")
    parser.add_argument("--repeat", type=int, default=2, help="stage runs and bare runs; the best of each counts")
    parser.add_argument("--set", action="append", default=[], help="more config overrides (KEY=VALUE)")
    args = parser.parse_args()
    overrides = [
        "ray.progress=off",
        f"encode.vae={args.vae}",
        "encode.vae_fallback=recap-tiny:taesd",
        f"encode.target_area={args.area}",
        f"encode.num_frames={args.frames}",
        "encode.target_fps=8",
        "encode.resources.batch_size=4",
        # Decoding a clip costs about a fifth of encoding it: the VAE actor takes 1.5 CPUs (two torch threads).
        f"encode.prep_resources.num_cpus={0.25 * args.cpus}",
        f"encode.resources.num_cpus={0.75 * args.cpus}",
        "split.max_clip_s=4",
        *args.set,
    ]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    enc = cfg.encode
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="recap-bench-encode-"))
    try:
        inputs = [str(SHARED / "data" / "videos" / v) for v in VIDEOS if (SHARED / "data" / "videos" / v).exists()]
        run_pipeline(cfg, str(work), inputs=inputs, stages=["ingest", "split"])
        clips = manifest.read_table(str(work), "clips").to_pylist()
        for clip in clips:  # no filter stage here: every clip that split kept is encoded
            clip["passed"] = clip["reject_reason"] is None
        manifest.remove_table(str(work), "clips")
        table = pa.Table.from_pylist(clips)
        manifest.write_table(str(work), "clips", table, prefix="clips", schema=table.schema)
        todo = [c for c in clips if c["passed"]]

        # 1. the whole stage, as `recap encode` runs it (each run starts its own actors), best of --repeat runs
        run_encode(cfg, str(work))  # warm-up: file caches
        stage_runs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = run_encode(cfg, str(work))
            stage_runs.append(time.perf_counter() - start)
        stage_s = min(stage_runs)
        samples = manifest.read_table(str(work), "samples").to_pylist()
        frames_total = sum(r["num_frames"] for r in samples)

        # 2. the same pools without the shards, timed from inside the actors
        cols = ["clip_id", "uri", "start_frame", "end_frame", "start_s", "fps"]
        with tempfile.TemporaryDirectory(prefix="recap-bench-timeline-") as log_dir:
            timeline = pipeline_timeline(cfg, pa.Table.from_pylist(todo).select(cols), log_dir)

        # 3. and 4.: in one Ray task given the stage's CPUs (and so its workers' priority, which matters when the
        # machine is shared: Ray runs workers at a lower priority than this driver)
        parts = ray.remote(num_cpus=args.cpus)(measure_parts)
        measured = ray.get(parts.remote(cfg.to_dict(), todo, timeline["model_threads"], args.cpus, args.repeat))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    decode_s, isolated_s, actor_forward_s, bare_s, bare_frames = (
        measured[k] for k in ("decode_s", "isolated_s", "actor_forward_s", "bare_s", "bare_frames")
    )
    backend, actor_threads = cfg.video.backend, timeline["model_threads"]

    bare_fps = bare_frames / bare_s
    stage_fps = frames_total / stage_s
    ratio = stage_fps / bare_fps
    tl = timeline
    n = len(todo)
    rows = [
        (f"bare Vae.encode, {args.cpus} torch threads", f"{bare_fps:8.1f} frames/s", f"{bare_s:6.2f} s"),
        ("encode stage (Ray, + shards)", f"{stage_fps:8.1f} frames/s", f"{stage_s:6.2f} s"),
        ("  the two pools alone (no shards)", f"{frames_total / tl['wall_s']:8.1f} frames/s", f"{tl['wall_s']:6.2f} s"),
        ("  shards, tables, driver (difference)", "", f"{stage_s - tl['wall_s']:6.2f} s"),
        ("  start to first VAE call", "", f"{tl['to_first_encode_s']:6.2f} s"),
        ("    actor inits (first to last)", "", f"{tl['actor_init_s']:6.2f} s"),
        (f"  prep calls ({tl['prep_actors']} actor(s), sum)", f"{tl['prep_calls_s'] / n * 1e3:8.0f} ms/clip", f"{tl['prep_calls_s']:6.2f} s"),
        (f"  VAE actor calls ({tl['model_batches']} batches)", f"{tl['clips_per_model_batch']:8.1f} clips/batch", f"{tl['model_calls_s']:6.2f} s"),
        (f"    of which VAE forward ({tl['model_threads']} threads)", f"{frames_total / tl['model_forward_s']:8.1f} frames/s", f"{tl['model_forward_s']:6.2f} s"),
        ("  VAE actor waiting between calls", "", f"{tl['model_waiting_s']:6.2f} s"),
        ("  after the last VAE call", "", f"{tl['after_last_encode_s']:6.2f} s"),
        (f"decode + prep here ({backend})", f"{decode_s / n * 1e3:8.0f} ms/clip", f"{decode_s:6.2f} s"),
        ("  the same through the isolated child", f"{isolated_s / n * 1e3:8.0f} ms/clip", f"{isolated_s:6.2f} s"),
        ("  rate from the first VAE call on", f"{frames_total / (tl['wall_s'] - tl['to_first_encode_s']):8.1f} frames/s", ""),
        (f"VAE forward here, {actor_threads} thread(s) as an actor", f"{frames_total / actor_forward_s:8.1f} frames/s", f"{actor_forward_s:6.2f} s"),
    ]  # fmt: skip
    print(
        f"{n} clips, {frames_total} frames, {result.counts.get('shards')} shards, VAE {result.info.get('vae')}, {args.cpus} CPUs"
    )
    print(f"prep pool {enc.prep_resources.model_dump()}, VAE pool {enc.resources.model_dump()}\n")
    for name, rate, secs in rows:
        print(f"{name:44s} {rate:>20s} {secs:>9s}")
    print(f"\nstage / bare: {ratio:.2f} (goal >= 0.8)")
    figures = {
        "bare_frames_per_s": round(bare_fps, 2),
        "stage_frames_per_s": round(stage_fps, 2),
        "stage_vs_bare": round(ratio, 3),
        "clips": n,
        "frames": frames_total,
        "cpus": args.cpus,
        "stage_s": round(stage_s, 2),
        "bare_s": round(bare_s, 2),
        "stage_runs_s": [round(t, 2) for t in stage_runs],
        # from the VAE actor's first call on: the rate once actors have started (a long corpus approaches it)
        "steady_frames_per_s": round(frames_total / (tl["wall_s"] - tl["to_first_encode_s"]), 2),
        "breakdown_s": {
            "pools_wall": round(tl["wall_s"], 2),
            "shards_and_driver": round(stage_s - tl["wall_s"], 2),
            "to_first_encode": round(tl["to_first_encode_s"], 2),
            "actor_inits": round(tl["actor_init_s"], 2),
            "prep_calls": round(tl["prep_calls_s"], 2),
            "model_calls": round(tl["model_calls_s"], 2),
            "model_forward": round(tl["model_forward_s"], 2),
            "model_waiting": round(tl["model_waiting_s"], 2),
            "after_last_encode": round(tl["after_last_encode_s"], 2),
            "decode_in_process": round(decode_s, 2),
            "decode_isolated": round(isolated_s, 2),
            "forward_actor_threads_in_process": round(actor_forward_s, 2),
        },
        "model_threads": tl["model_threads"],
        "clips_per_model_batch": round(tl["clips_per_model_batch"], 2),
        "prep_resources": enc.prep_resources.model_dump(),
        "resources": enc.resources.model_dump(),
        "video_backend": backend,
        "goals": {"stage_vs_bare": ">= 0.8"},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
