"""Takes down the local Ray a recap process started when that process dies, SIGKILL included.

Ray's own fate-sharing stops its GCS and raylet with the driver, but agents the raylet spawned
(dashboard agent, runtime-env agent) outlive a SIGKILLed driver. The reaper is a small process in
its own session that holds the read end of a pipe from its owner: end of file without a goodbye
means the owner died, and it then stops exactly the processes it was given (checked by creation
time, so a reused pid is never touched) and their children. Nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Any

GOODBYE = b"exit\n"


def ray_processes() -> list[Any]:
    """This process's descendants that belong to Ray (started by `ray.init()` here)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray" in cmdline or child.name().startswith(("ray::", "gcs_server", "raylet")):
            found.append(child)
    return found


def start_reaper() -> subprocess.Popen | None:
    """Start a reaper for the local Ray processes running now; None when there are none."""
    procs = ray_processes()
    if not procs:
        return None
    argv = [sys.executable, "-m", "pipeline.ray_reaper", *(f"{p.pid}:{p.create_time()!r}" for p in procs)]
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    """The owner shut Ray down itself: tell the reaper to leave without killing anything."""
    if reaper is None:
        return
    try:
        reaper.stdin.write(GOODBYE)
        reaper.stdin.close()
    except OSError:
        pass
    try:
        reaper.wait(timeout=5)
    except subprocess.TimeoutExpired:
        reaper.kill()


def _tracked(specs: list[str]) -> dict[int, Any]:
    import psutil

    procs: dict[int, Any] = {}
    for spec in specs:
        pid, _, created = spec.partition(":")
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(created)) <= 0.01:  # else the pid now names another process
                procs[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            continue
    return procs


def _add_descendants(procs: dict[int, Any]) -> None:
    """Workers the raylet starts later are its children: track them while their parent is alive to say so."""
    import psutil

    for proc in list(procs.values()):
        try:
            for child in proc.children(recursive=True):
                procs.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue


def _reap(procs: dict[int, Any], grace_s: float = 3.0) -> None:
    import psutil

    _add_descendants(procs)
    alive = []
    for proc in procs.values():
        try:
            if proc.is_running():  # also compares the creation time: a reused pid is left alone
                proc.terminate()
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    _gone, still = psutil.wait_procs(alive, timeout=grace_s)
    for proc in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _session_dirs(procs: dict[int, Any]) -> set[str]:
    """The Ray session directories (`.../session_<date>_<pid>`) the tracked processes name on their command lines."""
    import re

    import psutil

    found: set[str] = set()
    for proc in procs.values():
        try:
            found.update(re.findall(r"(/\S*?/session_\d{4}-\d\d-\d\d_[0-9_-]+)", " ".join(proc.cmdline())))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _reap_session_strays(sessions: set[str], rounds: int = 3) -> None:
    """Kill processes of these Ray sessions that no tracked process parents any more: a worker the raylet was
    still starting when it died is re-parented away before it can be tracked, and starting up it does not notice
    its raylet is gone. Found by the session directory on their command lines, never by name."""
    import psutil

    if not sessions:
        return
    for _ in range(rounds):
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if any(f"{session}/" in cmdline for session in sessions):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    proc.kill()
        time.sleep(0.5)


def main(argv: list[str], poll_s: float = 1.0) -> int:
    import select

    procs = _tracked(argv)
    sessions = _session_dirs(procs)  # now, while the raylet and GCS still show it on their command lines
    stdin = sys.stdin.buffer.raw
    message = b""
    while True:  # until the owner says goodbye or dies (end of file on the pipe)
        ready, _, _ = select.select([stdin], [], [], poll_s)
        if not ready:
            _add_descendants(procs)
            continue
        chunk = stdin.read(64)
        if not chunk:
            break
        message += chunk
        if message.startswith(GOODBYE.strip()):
            return 0
    # Track what is alive now (a decoding child started since the last poll) before Ray's own fate-sharing,
    # which goes first, kills its parents: an orphan is no longer anyone's descendant.
    _add_descendants(procs)
    time.sleep(0.5)
    _reap(procs)
    _reap_session_strays(sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
