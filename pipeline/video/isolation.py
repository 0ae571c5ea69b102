"""Run decoder work in a child process so a segfault or a hang costs one file, not the run.

A worker keeps one long-lived child (spawned, so it is safe inside Ray's threaded workers).
Jobs report progress through a shared heartbeat; a watchdog kills a child that stops making
progress (a decoder deadlocked while holding the GIL cannot be interrupted any other way).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

_heartbeat_value: Any = None


def heartbeat() -> None:
    """Called by job code in the child whenever it makes progress (cheap; safe outside a child)."""
    if _heartbeat_value is not None:
        _heartbeat_value.value = time.monotonic()


def _child_main(conn: Any, beat: Any) -> None:
    global _heartbeat_value
    _heartbeat_value = beat
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        target, args, kwargs = message
        heartbeat()
        try:
            module_name, func_name = target.rsplit(":", 1)
            func = getattr(importlib.import_module(module_name), func_name)
            result = func(*args, **kwargs)
            conn.send(("ok", result))
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
            conn.send(("error", (type(exc).__name__, str(exc), traceback.format_exc(limit=5))))


@dataclass
class JobOutcome:
    """What happened to one job: `status` is ok, error, crash or timeout."""

    status: str
    result: Any = None
    error_type: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class IsolatedWorker:
    """A child process that runs `module:function` jobs one at a time under a watchdog."""

    def __init__(self, stall_timeout_s: float = 120.0, max_jobs_per_child: int = 200, poll_s: float = 0.2):
        self.stall_timeout_s = stall_timeout_s
        self.max_jobs_per_child = max_jobs_per_child
        self.poll_s = poll_s
        self._ctx = mp.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None
        self._beat: Any = None
        self._jobs_done = 0

    def _start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        self._beat = self._ctx.Value("d", time.monotonic(), lock=False)
        self._process = self._ctx.Process(target=_child_main, args=(child_conn, self._beat), daemon=True)
        self._process.start()
        child_conn.close()
        self._conn = parent_conn
        self._jobs_done = 0

    def _kill(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process = None
        self._conn = None

    def close(self) -> None:
        if self._process is not None and self._process.is_alive():
            try:
                self._conn.send(None)
                self._process.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    def __enter__(self) -> IsolatedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._kill()

    def run(self, target: str, *args: Any, **kwargs: Any) -> JobOutcome:
        """Run `target` ("package.module:function") in the child; never raises for job failures."""
        if self._process is None or not self._process.is_alive() or self._jobs_done >= self.max_jobs_per_child:
            self._kill()
            self._start()
        self._beat.value = time.monotonic()
        try:
            self._conn.send((target, args, kwargs))
        except (OSError, BrokenPipeError) as exc:
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
            if not self._process.is_alive():
                return self._crashed()
            stalled = time.monotonic() - self._beat.value
            if stalled > self.stall_timeout_s:
                self._kill()
                return JobOutcome(
                    "timeout", error_type="Timeout", message=f"no decoding progress for {stalled:.0f}s; process killed"
                )

    def _crashed(self) -> JobOutcome:
        self._process.join(timeout=5)
        code = self._process.exitcode
        self._kill()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            message = f"decoding process died with {name}"
        else:
            message = f"decoding process exited with code {code}"
        return JobOutcome("crash", error_type="Crash", message=message)
