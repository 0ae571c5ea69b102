"""Entry point of the isolated decoding process: `python -m pipeline.video.child READ_FD WRITE_FD BEAT_FILE`.

It runs `module:function` jobs sent by IsolatedWorker and answers each with ("ok", result) or ("error", ...).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from pathlib import Path


def _fault_at_start() -> None:
    """Tests only: refuse to start when `$RECAP_FAULTS_DIR/child-start-fails` exists (a broken worker)."""
    root = os.environ.get("RECAP_FAULTS_DIR")
    if root and (Path(root) / "child-start-fails").exists():
        print("recap test fault: decoding process refuses to start (child-start-fails)", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    from pipeline.video import isolation

    read_fd, write_fd, beat_path = int(argv[0]), int(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    _fault_at_start()
    isolation.attach_heartbeat(beat_path)
    inbox = Connection(read_fd, readable=True, writable=False)
    outbox = Connection(write_fd, readable=False, writable=True)
    outbox.send("ready")
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        target, args, kwargs = message
        try:
            module_name, func_name = target.rsplit(":", 1)
            func = getattr(importlib.import_module(module_name), func_name)
            result = func(*args, **kwargs)
            outbox.send(("ok", result))
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
            outbox.send(("error", (type(exc).__name__, str(exc), traceback.format_exc(limit=5))))


if __name__ == "__main__":
    main(sys.argv[1:])
