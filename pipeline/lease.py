"""One writer per corpus: an exclusive lease in `OUT/manifest/_lease.json` that every writing command holds.

The lease names its holder (host, pid, command, start time) and carries a heartbeat a background thread renews;
a second writer is refused with the holder's name, a dead holder's lease (pid gone on this host, or heartbeat
older than the timeout) is taken over. Readers never look at it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec.implementations.local

from pipeline import manifest
from pipeline.errors import LeaseHeld, LeaseLost

log = logging.getLogger("recap")

LEASE_NAME = "_lease.json"  # leading "_": not a table, skipped by every reader of manifest/
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_HEARTBEAT_S = 10.0


def lease_path(out: str) -> str:
    return f"{out.rstrip('/')}/manifest/{LEASE_NAME}"


def _now() -> float:
    return time.time()


def _utc(ts: float, fmt: str = "%H:%M") -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime(fmt)


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace ('pid:[4026531836]'): containers sharing a hostname do not share pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder(record: dict[str, Any]) -> str:
    """'host h, pid 123, `recap run ...` (last heartbeat 3 s ago)': who holds a lease."""
    age = _now() - float(record.get("heartbeat", 0))
    return (
        f"host {record.get('host')}, pid {record.get('pid')}, `{record.get('command')}` "
        f"(last heartbeat {age:.0f} s ago)"
    )


def holder_line(out: str, record: dict[str, Any]) -> str:
    """'another recap run holds OUT since 19:24 UTC: host h, pid 123, `recap run ...`' (the refusal's start)."""
    return f"another recap run holds {out} since {_utc(float(record.get('started', 0)))} UTC: {holder(record)}"


def stale_reason(record: dict[str, Any], timeout_s: float) -> str | None:
    """Why a lease's holder is dead (None while it may be alive): pid gone on this host (and pid namespace: a
    container sharing the host's name has pids of its own), or heartbeat older than `timeout_s`."""
    age = _now() - float(record.get("heartbeat", 0))
    if record.get("host") == socket.gethostname() and record.get("pid_namespace") == _pid_namespace():
        pid = int(record.get("pid", -1))
        started = _process_start(pid) if pid > 0 else None
        # A pid reused by a later process is gone too: it started after the lease's holder did.
        if started is None or started > float(record.get("process_start") or started) + 1:
            return f"its pid {pid} is gone on this host"
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return f"its pid {pid} has exited"
    if age > timeout_s:
        return f"its heartbeat is {age:.0f} s old (lease.timeout_s={timeout_s:g})"
    return None


class WriterLease:
    """The exclusive right to write one corpus, held from `acquire()` to `release()` (or use it as a context).

    Created atomically: O_CREAT|O_EXCL on a local disk (`open(..., "xb")`), under an flock of the manifest
    directory so two writers judging a stale lease cannot both take it; on object stores the filesystem's
    exclusive create (a conditional PUT where fsspec offers one). A background thread renews the heartbeat
    and notices when another writer took the lease over; `check()` then raises LeaseLost.
    """

    def __init__(
        self,
        out: str,
        command: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        break_lease: bool = False,
    ):
        self.out = out
        self.command = command[:300]
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.break_lease = break_lease
        self.fs, self.path = manifest._fs(lease_path(out))
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] = {}
        self.taken_over: str | None = None  # what the lease replaced (for the log), None when it was free
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        """The lease record on OUT, or None when nobody holds it (a half-written record counts as held)."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # being written this instant, or its writer died mid-write: the file's age decides
            try:
                written = self.fs.modified(self.path).timestamp()
            except (FileNotFoundError, NotImplementedError):
                written = _now()
            return {
                "host": "?",
                "pid": "?",
                "command": "? (unreadable lease)",
                "started": written,
                "heartbeat": written,
            }

    # -- taking and giving back ---------------------------------------------------------------------

    def acquire(self) -> WriterLease:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        with self._serialised():
            if not self._create():
                held = self.read()
                if held is not None:
                    why = "--break-lease" if self.break_lease else stale_reason(held, self.timeout_s)
                    if why is None:
                        raise LeaseHeld(
                            f"{holder_line(self.out, held)}; wait for it, or pass --break-lease if it is dead"
                        )
                    self.taken_over = (
                        f"{self.out}: taking over the writer lease of a run held since "
                        f"{_utc(float(held.get('started', 0)))} UTC ({why}): {holder(held)}"
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.path)
                if not self._create():  # another writer won the race for a free or stale lease
                    held = self.read() or {}
                    raise LeaseHeld(f"{holder_line(self.out, held)}; wait for it, or pass --break-lease if it is dead")
            self._remove_dead_heartbeat_files()
        self._thread = threading.Thread(target=self._beat, name="recap-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> dict[str, Any]:
        now = _now()
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "process_start": _process_start(pid),
            "pid_namespace": _pid_namespace(),
            "command": self.command,
            "started": self.record.get("started", now),
            "started_utc": _utc(self.record.get("started", now), "%Y-%m-%dT%H:%M:%SZ"),
            "heartbeat": now,
            "token": self.token,
        }

    def _create(self) -> bool:
        """Exclusive create of the lease file; False when it exists."""
        self.record = self._record()
        try:
            with self.fs.open(self.path, "xb") as fh:
                fh.write(json.dumps(self.record, indent=1).encode())
        except FileExistsError:
            return False
        return True

    def _remove_dead_heartbeat_files(self) -> None:
        """A holder killed while renewing leaves its heartbeat's temporary file behind; the lease is ours now."""
        folder = self.path.rsplit("/", 1)[0]
        for path in self.fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith("._lease-") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    @contextlib.contextmanager
    def _serialised(self) -> Iterator[None]:
        """On a local disk, one process at a time decides about the lease (flock of the manifest directory)."""
        if not self.local:
            yield
            return
        import fcntl

        fd = os.open(self.path.rsplit("/", 1)[0], os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this writer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._serialised():
            held = self.read()
            if held is not None and held.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- while held --------------------------------------------------------------------------------

    def _still_mine(self) -> dict[str, Any] | None:
        held = self.read()
        if held is None or held.get("token") != self.token:
            self._lost = f"now held by {holder(held)}" if held else "nobody holds it now"
            return None
        return held

    def check(self) -> None:
        """Raise LeaseLost if another writer took the lease over (this writer was judged dead): stop writing."""
        if self._lost is None:
            self._still_mine()
        if self._lost is not None:
            raise LeaseLost(
                f"{self.out}: this run's writer lease was taken over ({self._lost}); stopping before writing more. "
                "If this run was alive, its heartbeat was late: raise lease.timeout_s"
            )

    def renew(self) -> None:
        """Write a fresh heartbeat, if the lease is still this writer's."""
        if self._still_mine() is None:
            log.error("recap: %s: writer lease lost: %s", self.out, self._lost)
            return
        self.record = self._record()
        data = json.dumps(self.record, indent=1).encode()
        if self.local:  # rename over it: a reader never sees a half-written record, and the file never vanishes
            tmp = f"{self.path.rsplit('/', 1)[0]}/._lease-{self.token[:8]}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
        else:  # one PUT replaces an object whole
            self.fs.pipe_file(self.path, data)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: the next beat tries again; the timeout allows for it
                log.warning("recap: %s: lease heartbeat failed: %s", self.out, exc)
            if self._lost is not None:
                return
