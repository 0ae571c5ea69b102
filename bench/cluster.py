"""Scaling across nodes: `recap run --address` on a local multi-node Ray cluster with one worker node, then two.

Each cluster (pipeline/local_cluster.py) has a head without CPUs (the driver runs there) and N worker nodes of
--cpus-per-node CPUs each, on this one machine; the same distinct corpus (bench/make_corpus.py) runs through
every stage on each. Figure: samples/s with two worker nodes over one (on a machine with fewer cores than the
nodes ask for, the nodes share cores: the ratio then shows the overhead of spreading, not a speed-up).
Prints figures and ends with one JSON line of them; asserts nothing.

    python bench/cluster.py [--minutes 1] [--cpus-per-node 1] [--config configs/smoke.yaml]
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
sys.path.insert(0, str(ROOT / "bench"))


def run_on_cluster(workers: int, cpus: int, config: str, inputs: list[str], out: Path) -> dict:
    from pipeline.local_cluster import LocalCluster

    cluster = LocalCluster(ROOT)
    try:
        cluster.start(workers=workers, cpus_per_worker=cpus)
        argv = [sys.executable, "-m", "pipeline.cli", "run", "--address", cluster.address, "--config", config]
        argv += ["--output", str(out), "--set", "ray.progress=off", "--input", *inputs]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=cluster.env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"recap run on {workers} node(s) failed:\n{proc.stderr[-3000:]}")
    finally:
        cluster.stop()
    stages = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    from pipeline import manifest

    nodes = {s["writer_node"] for s in manifest.read_table(str(out), "shards").to_pylist()}
    return {"wall": wall, "samples": stages["encode"]["counts"]["samples"], "writer_nodes": len(nodes)}


def main() -> None:
    from make_corpus import make_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recap-bench-cluster-"))
    try:
        count = max(1, round(args.minutes * 2))
        inputs = [str(p) for p in make_corpus(work / "videos", args.minutes, count)]
        runs = {n: run_on_cluster(n, args.cpus_per_node, args.config, inputs, work / f"out{n}") for n in (1, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for n, r in runs.items():
        rate = r["samples"] / r["wall"]
        print(f"{n} worker node(s) x {args.cpus_per_node} CPU: {r['wall']:6.1f} s, {r['samples']} samples, "
              f"{rate:.3f} samples/s, shards written on {r['writer_nodes']} node(s)")  # fmt: skip
    one, two = (runs[n]["samples"] / runs[n]["wall"] for n in (1, 2))
    print(f"two nodes / one: {two / one:.2f}x samples/s  (machine: {os.cpu_count()} cores)")
    figures = {
        "samples_per_s_2_nodes_vs_1": round(two / one, 3),
        "samples": runs[1]["samples"],
        "wall_1_node_s": round(runs[1]["wall"], 1),
        "wall_2_nodes_s": round(runs[2]["wall"], 1),
        "writer_nodes_2": runs[2]["writer_nodes"],
        "cpus_per_node": args.cpus_per_node,
        "machine_cores": os.cpu_count(),
        "goals": {"samples_per_s_2_nodes_vs_1": "report"},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
