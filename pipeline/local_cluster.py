"""A real multi-node Ray cluster on one machine: a head and worker nodes as `ray start --block` processes.

For recap's cluster tests and `bench/cluster.py`, and for trying `recap run --address` against several nodes
without machines. The cluster has its own temp dir and auth token; `stop()` kills exactly its process groups,
never `ray stop` (which would take any other Ray on the machine down too).
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

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


_GIVEN: set[int] = set()  # ports handed out by this process: the OS may offer a port it just freed again


def _free_port() -> int:
    """A free local port, never one this process handed out before (two of a node's agents on one port make its
    `ray start` fail)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class LocalCluster:
    """Head + worker `ray start --block` processes; everything they spawn shares their process groups."""

    def __init__(self, cwd: Path | None = None) -> None:
        self.cwd = cwd or Path.cwd()  # where job drivers start: relative config paths resolve from it
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
            cwd=self.cwd,  # the job driver's working directory: configs/smoke.yaml's relative paths
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)

    def start(self, workers: int = 1, cpus_per_worker: int = 2) -> None:
        """A head with no CPUs (drivers and job supervisors run there) and `workers` worker nodes."""
        self._start(
            ["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={_free_port()}"],
            "head",
            num_cpus=0,
        )  # fmt: skip
        self.wait_for(lambda: _accepts(self.port), "the head's GCS", timeout=90)
        for n in range(workers):  # one at a time: two raylets registering at once on one IP time out
            self._start([f"--address={self.address}"], f"worker{n}", num_cpus=cpus_per_worker)
            self.wait_for(lambda n=n: len(self.alive_nodes()) == 2 + n, f"{2 + n} alive nodes", timeout=90)

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
