"""Run one recap command to completion: as a Ray job on a cluster, or as a local subprocess.

The Airflow DAGs call these; both stream the command's output as it runs and raise `CommandFailed`
with the last log lines when it fails. `python -m pipeline.jobs [--address URL] -- recap ...` does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
TAIL_LINES = 40

Echo = Callable[[str], None]


class CommandFailed(RuntimeError):
    """A recap command (local or Ray job) ended in failure; carries its last log lines."""

    def __init__(self, what: str, status: str, tail: Sequence[str]):
        self.what = what
        self.status = status
        self.tail = list(tail)
        lines = "\n".join(f"  | {line}" for line in self.tail) or "  | (no output)"
        # Refused because another recap (an earlier try still alive) holds the corpus: say who, up front.
        busy = [line for line in self.tail if "another recap run holds" in line]
        self.holder = busy[-1].removeprefix("recap: ") if busy else None
        headline = f"{what} ended {status}" + (f": {self.holder}" if self.holder else "")
        super().__init__(f"{headline}; last {len(self.tail)} log lines:\n{lines}")


def _echo(line: str) -> None:
    print(line, flush=True)


class _LineTail:
    """Splits chunks of output into lines, echoes each, and keeps the last few for error messages."""

    def __init__(self, echo: Echo, keep: int = TAIL_LINES):
        self.echo = echo
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = ""

    def feed(self, chunk: str) -> None:
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        for line in complete:
            self._emit(line)

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        line = line.rstrip("\r")
        self.lines.append(line)
        self.echo(line)


# --- local ---------------------------------------------------------------------------------------


def resolve_local_executable(name: str) -> str:
    """`recap` beside this interpreter first (an Airflow worker in the recap venv need not have it on PATH)."""
    if os.sep in name:
        return name
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name!r} is neither beside {sys.executable} nor on PATH; install recap (pip install -e .)"
        )
    return found


def run_local(
    argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None, echo: Echo = _echo
) -> None:
    """Run `argv` (no shell) to completion, streaming its output; raise `CommandFailed` on a non-zero exit.

    The command gets its own process group, so a killed Airflow task takes its local Ray down with it.
    """
    argv = [resolve_local_executable(argv[0]), *argv[1:]]
    echo(f"$ {shlex.join(argv)}")
    tail = _LineTail(echo)
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.feed(line)
        tail.close()
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    if code != 0:
        raise CommandFailed(f"local command {shlex.join(argv)}", f"with exit code {code}", tail.lines)


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# --- Ray jobs ------------------------------------------------------------------------------------


def submission_ids(*parts: object, tries: int) -> list[str]:
    """Ray job submission ids of tries 1..`tries` of one task (e.g. Airflow's dag, run and task ids); the last
    is the current try's. Readable, and only [A-Za-z0-9_.-]."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts if p not in (None, "")))[:180]
    return [f"{base}-try{n}" for n in range(1, tries + 1)]


def _job_client(address: str) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray is a core dependency
        raise ImportError("Ray job submission needs ray: pip install 'ray[default]'") from exc
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        # JobSubmissionClient lets these override the address it is given: say so rather than submit elsewhere.
        if os.environ.get(var) and os.environ[var] != address:
            _echo(f"recap jobs: note: ${var}={os.environ[var]} overrides the address {address} for job submission")
            break
    return JobSubmissionClient(address)


def run_ray_job(
    address: str,
    argv: Sequence[str],
    *,
    submission_id: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    supersedes: Iterable[str] = (),
    metadata: dict[str, str] | None = None,
    poll_s: float = 2.0,
    echo: Echo = _echo,
) -> str:
    """Submit `argv` as a Ray job to the cluster whose dashboard is at `address`, stream its logs, wait for it.

    The entrypoint is `shlex.join(argv)`; the job's driver finds the cluster through the RAY_ADDRESS that Ray
    sets for it, so recap commands need no --address. Jobs listed in `supersedes` (an earlier Airflow try of
    the same task) are stopped first if still running: two drivers must never write one corpus. A job that
    already exists under `submission_id` is followed instead of submitted again. If following is interrupted
    (the Airflow task is killed or times out) the job is stopped. Returns the submission id; raises
    `CommandFailed` with the last log lines when the job ends FAILED or STOPPED.
    """
    client = _job_client(address)
    entrypoint = shlex.join(argv)
    known = {job.submission_id: str(job.status) for job in client.list_jobs() if job.submission_id}
    for old in supersedes:
        if old in known and _status_name(known[old]) not in TERMINAL_STATUSES:
            echo(f"recap jobs: stopping {old} ({_status_name(known[old])}), superseded by {submission_id}")
            client.stop_job(old)
            _wait_terminal(client, old, poll_s)
    if submission_id and submission_id in known:
        echo(f"recap jobs: {submission_id} already submitted ({_status_name(known[submission_id])}); following it")
    else:
        submission_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
        )
        echo(f"recap jobs: submitted {submission_id} to {address}: {entrypoint}")
    tail = _LineTail(echo)
    try:
        _follow_logs(client, submission_id, tail, poll_s)
        status = _wait_terminal(client, submission_id, poll_s)
    except BaseException:
        _stop_quietly(client, submission_id, echo)
        raise
    tail.close()
    if status != "SUCCEEDED":
        message = client.get_job_info(submission_id).message
        if message:  # Ray appends the log tail to it, which `tail` already holds
            tail.lines.append(f"[ray] {message.splitlines()[0]}")
        raise CommandFailed(f"Ray job {submission_id} ({entrypoint})", status, tail.lines)
    echo(f"recap jobs: {submission_id} SUCCEEDED")
    return submission_id


def _status_name(status: Any) -> str:
    # JobStatus is a str enum; str() of it is "JobStatus.X" on some Python versions.
    return getattr(status, "value", str(status)).rsplit(".", 1)[-1]


def _wait_terminal(client: Any, submission_id: str, poll_s: float) -> str:
    while True:
        status = _status_name(client.get_job_status(submission_id))
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_s)


def _follow_logs(client: Any, submission_id: str, tail: _LineTail, poll_s: float) -> None:
    """Stream logs over the dashboard's websocket; if it drops before the job ends, poll the full log instead."""
    seen = 0

    async def stream() -> None:
        nonlocal seen
        async for chunk in client.tail_job_logs(submission_id):
            tail.feed(chunk)
            seen += len(chunk)

    try:
        asyncio.run(stream())
        return
    except Exception as exc:  # the websocket failed or closed early; the job may still be running
        tail.echo(f"recap jobs: log stream interrupted ({exc}); polling instead")
    while True:
        terminal = _status_name(client.get_job_status(submission_id)) in TERMINAL_STATUSES
        logs = client.get_job_logs(submission_id)
        if len(logs) > seen:
            tail.feed(logs[seen:])
            seen = len(logs)
        if terminal:
            return
        time.sleep(poll_s)


def _stop_quietly(client: Any, submission_id: str, echo: Echo) -> None:
    try:
        if _status_name(client.get_job_status(submission_id)) not in TERMINAL_STATUSES:
            echo(f"recap jobs: interrupted; stopping Ray job {submission_id}")
            client.stop_job(submission_id)
    except Exception as exc:  # already failing: report, keep the original error
        echo(f"recap jobs: could not stop {submission_id}: {exc}")


# --- commands --------------------------------------------------------------------------------------


def run_command(
    argv: Sequence[str],
    *,
    address: str | None = None,
    submission_id: str | None = None,
    supersedes: Iterable[str] = (),
    runtime_env: dict[str, Any] | None = None,
    echo: Echo = _echo,
) -> None:
    """As a Ray job when `address` (the dashboard) is given, else as a local subprocess."""
    if address:
        run_ray_job(
            address, argv, submission_id=submission_id, supersedes=supersedes, runtime_env=runtime_env, echo=echo
        )
    else:
        run_local(argv, echo=echo)


def recap_stage_argv(
    stage: str,
    output: str,
    *,
    inputs: Sequence[str] = (),
    config: str | None = None,
    overrides: Sequence[str] = (),
    recap: str = "recap",
) -> list[str]:
    """`recap STAGE [--input ...] --output OUT [--config C] [--set K=V ...]` for one pipeline stage."""
    if stage == "ingest" and not inputs:
        raise ValueError("ingest needs at least one input URI")
    argv = [recap, stage]
    if stage == "ingest":
        argv += ["--input", *inputs]
    argv += ["--output", output]
    if config:
        argv += ["--config", config]
    for item in overrides:
        argv += ["--set", item]
    return argv


def recap_train_argv(
    data: str,
    output: str,
    *,
    config: str | None = None,
    steps: int | None = None,
    ray: bool = False,
    num_workers: int = 1,
    use_gpu: bool = False,
    recap: str = "recap",
) -> list[str]:
    """`recap train --data SHARDS --output RUN_DIR [...] [--ray --num-workers N [--use-gpu]]`."""
    argv = [recap, "train", "--data", data, "--output", output]
    if config:
        argv += ["--config", config]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if ray:
        argv += ["--ray", "--num-workers", str(num_workers)]
        if use_gpu:
            argv.append("--use-gpu")
    elif num_workers != 1 or use_gpu:
        raise ValueError("num_workers and use_gpu need Ray Train (ray=True)")
    return argv


# --- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.jobs",
        description="Run a recap command to completion: as a Ray job (--address) or locally; exit 1 if it fails.",
    )
    parser.add_argument("--address", help="Ray dashboard (job API) address, e.g. http://head:8265")
    parser.add_argument("--submission-id", help="Ray job submission id (default: generated)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- recap STAGE ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- recap encode --output OUT")
    try:
        run_command(command, address=args.address, submission_id=args.submission_id)
    except CommandFailed as exc:
        print(f"recap jobs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
