"""Run decoder work in a child process so a segfault or a hang costs one file, not the run.

A worker keeps one long-lived child, started as `python -m pipeline.video.child` (it needs nothing from the
caller's `__main__`, so stages work from `python -c` and piped scripts). Jobs report progress through a
shared heartbeat; a watchdog kills a child that stops making progress (a decoder deadlocked while holding the
GIL cannot be interrupted any other way). A child that cannot start is the machine's fault, not a file's: it
raises DecoderUnavailable instead of producing a result.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.errors import DecoderUnavailable

_BEAT = struct.Struct("d")
_heartbeat_map: mmap.mmap | None = None
_parent_pid: int | None = None  # the worker that started this child (child side)
# The directory that holds the `pipeline` package: the child imports the same code as its parent.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])
# Signals that mean the decoder itself failed on the file it was reading.
_DECODER_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def heartbeat() -> None:
    """Called by job code in the child whenever it makes progress (cheap; safe outside a child)."""
    if _heartbeat_map is not None:
        _BEAT.pack_into(_heartbeat_map, 0, time.monotonic())
        if os.getppid() != _parent_pid:
            # Its worker died (a killed run, a killed actor): nobody reads the result, so stop mid-file rather than
            # decode on as an orphan until the job ends.
            os._exit(1)


def attach_heartbeat(path: str) -> None:
    """Child side: make heartbeat() write to the parent's heartbeat file."""
    global _heartbeat_map, _parent_pid
    _parent_pid = os.getppid()
    with open(path, "r+b") as fh:
        _heartbeat_map = mmap.mmap(fh.fileno(), _BEAT.size)


@dataclass
class JobOutcome:
    """What happened to one job: `status` is ok, error, crash or timeout."""

    status: str
    result: Any = None
    error_type: str = ""
    message: str = ""
    signal: str = ""  # the signal that killed the child (crash), e.g. "SIGKILL"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def memory_pressure() -> float | None:
    """The share of memory in use (0..1) in this process's cgroup, else on the machine; None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            return int((cgroup / "memory.current").read_text()) / int(limit)
    with contextlib.suppress(OSError, ValueError, KeyError):
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])
        return 1.0 - fields["MemAvailable"] / fields["MemTotal"]
    return None


def death_cause(exitcode: int | None, near_memory_limit: float = 0.9) -> tuple[str, str]:
    """(signal name or "", why the child probably died) for a child's exit code."""
    if exitcode is None or exitcode >= 0:
        return "", f"exited with code {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"signal {-exitcode}", f"killed by signal {-exitcode}"
    if sig == signal.SIGKILL:
        used = memory_pressure()
        if used is not None and used >= near_memory_limit:
            return sig.name, f"killed by SIGKILL with memory {used:.0%} used: probably the kernel's OOM killer"
        shown = f" (memory {used:.0%} used)" if used is not None else ""
        return sig.name, f"killed by SIGKILL from outside{shown}: the OOM killer or another process"
    if sig in _DECODER_SIGNALS:
        return sig.name, f"died with {sig.name}: the decoder crashed on this file"
    return sig.name, f"killed by {sig.name}"


class IsolatedWorker:
    """A child process that runs `module:function` jobs one at a time under a watchdog."""

    def __init__(
        self,
        stall_timeout_s: float = 120.0,
        max_jobs_per_child: int = 200,
        poll_s: float = 0.2,
        start_timeout_s: float = 120.0,
        start_attempts: int = 2,
    ):
        self.stall_timeout_s = stall_timeout_s
        self.max_jobs_per_child = max_jobs_per_child
        self.poll_s = poll_s
        self.start_timeout_s = start_timeout_s
        self.start_attempts = start_attempts
        self._process: subprocess.Popen | None = None
        self._conn: _Channel | None = None
        self._beat_file: Any = None
        self._beat: mmap.mmap | None = None
        self._stderr: Any = None
        self._jobs_done = 0

    # -- child lifecycle ---------------------------------------------------------------------

    def _start_once(self) -> None:
        self._beat_file = tempfile.NamedTemporaryFile(prefix="recap-beat-", dir=_fast_tmp())  # noqa: SIM115 - lives with the child
        self._beat_file.write(_BEAT.pack(time.monotonic()))
        self._beat_file.flush()
        self._beat = mmap.mmap(self._beat_file.fileno(), _BEAT.size)
        self._stderr = tempfile.TemporaryFile(prefix="recap-child-stderr-")  # noqa: SIM115 - lives with the child
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            "-m",
            "pipeline.video.child",
            str(to_child_r),
            str(from_child_w),
            self._beat_file.name,
        ]
        try:
            self._process = subprocess.Popen(
                command, pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stderr=self._stderr, env=env
            )
        except OSError as exc:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise DecoderUnavailable(f"{DecoderUnavailable.MARKER}: {sys.executable}: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.close(to_child_r)
                os.close(from_child_w)
        self._conn = _Channel(from_child_r, to_child_w)
        self._jobs_done = 0
        deadline = time.monotonic() + self.start_timeout_s
        timed_out = True
        while time.monotonic() < deadline:
            ready = False
            with contextlib.suppress(OSError, EOFError):
                ready = self._conn.poll(self.poll_s)
            if ready:
                with contextlib.suppress(OSError, EOFError):
                    if self._conn.recv() == "ready":
                        return
                timed_out = False
                break
            if self._process.poll() is not None:
                timed_out = False
                break
        if not timed_out:  # the pipe closed: the child is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        code = self._process.poll()
        tail = self._stderr_tail()
        self._kill()
        what = f"exited with code {code}" if code is not None else f"did not start within {self.start_timeout_s:.0f}s"
        if code is not None and code < 0:
            what = death_cause(code)[1]
        raise DecoderUnavailable(
            f"{DecoderUnavailable.MARKER}: it {what} before its first heartbeat"
            + (f"; its last output:\n{tail}" if tail else "")
        )

    def _start(self) -> None:
        for attempt in range(self.start_attempts):
            try:
                self._start_once()
                return
            except DecoderUnavailable:
                if attempt + 1 == self.start_attempts:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def _stderr_tail(self, lines: int = 10) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(max(0, os.fstat(self._stderr.fileno()).st_size - 8192))
            text = self._stderr.read().decode("utf-8", "replace")
            return "\n".join(text.strip().splitlines()[-lines:])
        return ""

    def _kill(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        for handle in (self._conn, self._beat, self._beat_file, self._stderr):
            if handle is not None:
                with contextlib.suppress(OSError, ValueError):
                    handle.close()
        self._process = self._conn = self._beat = self._beat_file = self._stderr = None

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._conn.send(None)
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> IsolatedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._kill()

    # -- jobs --------------------------------------------------------------------------------

    def run(self, target: str, *args: Any, fresh: bool = False, **kwargs: Any) -> JobOutcome:
        """Run `target` ("package.module:function") in the child; never raises for job failures.

        `fresh`: in a newly started child (a retry after a crash). Raises DecoderUnavailable when no child
        can be started."""
        alive = self._process is not None and self._process.poll() is None
        if fresh or not alive or self._jobs_done >= self.max_jobs_per_child:
            self._kill()
            self._start()
        _BEAT.pack_into(self._beat, 0, time.monotonic())
        try:
            self._conn.send((target, args, kwargs))
        except OSError as exc:
            self._kill()
            return JobOutcome("crash", error_type=type(exc).__name__, message=f"worker process unavailable: {exc}")
        while True:
            try:
                ready = self._conn.poll(self.poll_s)
            except (OSError, EOFError):
                ready = False
            if ready:
                try:
                    status, payload = self._conn.recv()
                except (EOFError, OSError):
                    return self._crashed()
                self._jobs_done += 1
                if status == "ok":
                    return JobOutcome("ok", result=payload)
                error_type, message, _tb = payload
                return JobOutcome("error", error_type=error_type, message=message)
            if self._process.poll() is not None:
                return self._crashed()
            stalled = time.monotonic() - _BEAT.unpack_from(self._beat, 0)[0]
            if stalled > self.stall_timeout_s:
                self._kill()
                return JobOutcome(
                    "timeout", error_type="Timeout", message=f"no decoding progress for {stalled:.0f}s; process killed"
                )

    def _crashed(self) -> JobOutcome:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        code = self._process.returncode
        tail = self._stderr_tail(3)
        self._kill()
        name, why = death_cause(code)
        message = f"decoding process {why}" + (f"; last output: {tail}" if tail and not name else "")
        return JobOutcome("crash", error_type="Crash", message=message, signal=name)


class _Channel:
    """A pickling connection over a pipe pair, one way each (both ends are plain fds the child inherits)."""

    def __init__(self, read_fd: int, write_fd: int):
        self._in = Connection(read_fd, readable=True, writable=False)
        self._out = Connection(write_fd, readable=False, writable=True)

    def send(self, obj: Any) -> None:
        self._out.send(obj)

    def recv(self) -> Any:
        return self._in.recv()

    def poll(self, timeout: float) -> bool:
        return self._in.poll(timeout)

    def close(self) -> None:
        for end in (self._out, self._in):
            with contextlib.suppress(OSError):
                end.close()


def _fast_tmp() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
