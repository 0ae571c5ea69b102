"""A real two-node Ray cluster on this machine: `recap run --address` against it, and a stage as a Ray job.

The cluster (pipeline/local_cluster.py) is two `ray start --block` processes this test starts, with their own temp
dir and auth token. The head has no CPUs (as production heads often do), so drivers and job supervisors run there while every stage
actor must run on the worker node: proof that the work crossed nodes, independent of scheduling luck; teardown kills exactly their process groups, never `ray stop` (which would take the
test session's own Ray down too). The test process itself never calls ray.init.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.local_cluster import LocalCluster

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RECAP = str(VENV_BIN / "recap")

# The smoke config's decisions, minus work that does not change them here (CLIP model, dedup).
FAST_OVERRIDES = ["--set", "filter.clip.model=null", "--set", "filter.dedup.enabled=false"]


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalCluster(PROJECT_ROOT)
    try:
        cluster.start()
        yield cluster
    finally:
        strays = cluster.stop()
    assert strays == [], f"processes of the test cluster outlived its process groups: {strays}"
    assert cluster.processes() == []


@pytest.mark.slow
def test_recap_on_a_two_node_cluster(ray_cluster, sample_videos, tmp_path):
    sample_dir, truth = sample_videos
    output = tmp_path / "corpus"
    video = str(sample_dir / "sample-three-shots.mp4")

    # 1. ingest as a Ray job, submitted and followed the way the DAG's tasks do it (pipeline.jobs).
    submission_id = "recap-test-ingest-try1"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.jobs", "--address", ray_cluster.dashboard, "--submission-id", submission_id,
         "--", "recap", "ingest", "--config", "configs/smoke.yaml", "--input", video, "--output", str(output)],
        env=ray_cluster.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{submission_id} SUCCEEDED" in proc.stdout
    assert "ingest " in proc.stdout and "files 1, ok 1" in proc.stdout  # the job's own log came through
    job = ray_cluster.job(submission_id)
    assert job is not None and job["status"] == "SUCCEEDED", job

    # 2. the remaining stages with `recap run --address` (a driver outside the cluster, resuming the corpus).
    driver = subprocess.Popen(
        [RECAP, "run", "--address", ray_cluster.address, "--config", "configs/smoke.yaml", "--output", str(output),
         "--stages", "split,filter,caption,encode", *FAST_OVERRIDES],
        env=ray_cluster.env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, out[-4000:] + err[-4000:]
    # Ray's own log of the driver is at ray.system_log_level, warning: no INFO lines (Ray's periodic statistics
    # and actor notices, which were most of what a driver process wrote over a long run).
    # (session_* also matches session_latest, a link to the same directory)
    logs = {
        p.resolve() for p in Path(ray_cluster.temp_dir).glob(f"session_*/logs/python-core-driver-*_{driver.pid}.log")
    }
    assert len(logs) == 1
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        info = [line for line in lines if re.match(r"\[[^]]+ I \d+ \d+\]", line)]
        assert info == [], f"{log.name}: {info[:3]}"

    # Both nodes took part: the job's driver ran on the head, every batch of every stage on the worker node.
    nodes = ray_cluster.alive_nodes()
    assert sorted(nodes.values()) == [False, True]
    head = next(node for node, is_head in nodes.items() if is_head)
    worker = next(node for node, is_head in nodes.items() if not is_head)
    assert job["driver_node_id"] == head
    batches = [t for t in ray_cluster.tasks() if t["name"].startswith("MapWorker(") and t["name"].endswith(".submit")]
    assert {t["node_id"] for t in batches if t["state"] == "FINISHED"} == {worker}
    stages_seen = " ".join(t["name"] for t in batches)
    for stage_class in ("IngestStage", "SplitStage", "FilterScoreStage", "CaptionModelStage", "EncodeModelStage"):
        assert stage_class in stages_seen

    validate = subprocess.run([RECAP, "manifest", "validate", str(output)], capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    from pipeline import manifest

    clips = manifest.read_table(str(output), "clips").to_pylist()
    assert sorted(c["scene_start_frame"] for c in clips)[1:] == truth["sample-three-shots.mp4"]
    passed = {c["clip_id"] for c in clips if c["passed"]}
    assert passed
    assert sorted(s["key"] for s in manifest.read_table(str(output), "samples").to_pylist()) == sorted(passed)
    # The worker node wrote the shards (the driver only committed their records).
    writers = {s["writer_node"] for s in manifest.read_table(str(output), "shards").to_pylist()}
    assert writers == {worker}


def test_a_failing_ray_job_fails_with_its_last_log_lines(ray_cluster):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.jobs", "--address", ray_cluster.dashboard, "--",
         "recap", "split", "--output", "/nonexistent/recap-corpus"],
        env=ray_cluster.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ended FAILED" in proc.stderr
    assert "/nonexistent/recap-corpus" in proc.stderr  # recap's own error message is among the lines carried
