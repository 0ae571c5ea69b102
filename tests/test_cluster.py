"""A real two-node Ray cluster on this machine: `recap run --address` against it, and a stage as a Ray job.

The cluster is two `ray start --block` processes this test starts, with their own temp dir and auth token. The
head has no CPUs (as production heads often do), so drivers and job supervisors run there while every stage
actor must run on the worker node: proof that the work crossed nodes, independent of scheduling luck; teardown kills exactly their process groups, never `ray stop` (which would take the
test session's own Ray down too). The test process itself never calls ray.init.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RECAP = str(VENV_BIN / "recap")

# The smoke config's decisions, minus work that does not change them here (CLIP model, dedup).
FAST_OVERRIDES = ["--set", "filter.clip.model=null", "--set", "filter.dedup.enabled=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Head + worker `ray start --block` processes; everything they spawn shares their process groups."""

    def __init__(self) -> None:
        # Short: Ray puts Unix sockets under it (108-byte limit); pytest's tmp_path is too long.
        self.temp_dir = tempfile.mkdtemp(prefix="recap-rc-", dir="/tmp")
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.token = secrets.token_hex(32)
        # Token auth with a token of our own: independent of ~/.ray/auth_token, and every client below
        # (recap, the job client) must present it, as drivers must on a real cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # job entrypoints find `recap`
        )
        self.env = env
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], name: str, num_cpus: int) -> None:
        agent_ports = [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]
        log = open(Path(self.temp_dir) / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                *args,
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--block",
                f"--temp-dir={self.temp_dir}",
                *agent_ports,
            ],
            env=self.env,
            cwd=PROJECT_ROOT,  # the job driver's working directory: configs/smoke.yaml's relative paths
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)

    def start(self) -> None:
        self._start(
            ["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={_free_port()}"],
            "head",
            num_cpus=0,
        )  # fmt: skip
        self.wait_for(lambda: _accepts(self.port), "the head's GCS", timeout=90)
        self._start([f"--address={self.address}"], "worker", num_cpus=2)
        self.wait_for(lambda: len(self.alive_nodes()) == 2, "two alive nodes", timeout=90)

    def _get(self, path: str) -> dict | None:
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def _state(self, kind: str) -> list[dict]:
        reply = self._get(f"/api/v0/{kind}?limit=1000&detail=1") or {}
        return ((reply.get("data") or {}).get("result") or {}).get("result") or []

    def alive_nodes(self) -> dict[str, bool]:
        """node id -> is the head"""
        return {n["node_id"]: n["is_head_node"] for n in self._state("nodes") if n["state"] == "ALIVE"}

    def tasks(self) -> list[dict]:
        return self._state("tasks")

    def job(self, submission_id: str) -> dict | None:
        return self._get(f"/api/jobs/{submission_id}")

    def wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[2] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in Path(self.temp_dir).glob("*.log"))
                raise AssertionError(f"waiting for {what}: {'exited: ' + str(dead) if dead else 'timed out'}\n{logs}")
            time.sleep(1)

    def processes(self) -> list[int]:
        """Pids of every process whose command line names this cluster's temp dir (gcs, raylets, workers...)."""
        pids = []
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if self.temp_dir.encode() in cmdline:
                pids.append(int(proc_dir.name))
        return pids

    def stop(self) -> list[int]:
        """Stop what this cluster started; return the pids that outlived their process groups (then killed)."""
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        for proc in self.procs:  # `ray start --block` can hang on SIGTERM: the group gets SIGKILL regardless
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(0.5)
        strays = self.processes()
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return strays


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalCluster()
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
    proc = subprocess.run(
        [RECAP, "run", "--address", ray_cluster.address, "--config", "configs/smoke.yaml", "--output", str(output),
         "--stages", "split,filter,caption,encode", *FAST_OVERRIDES],
        env=ray_cluster.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

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
