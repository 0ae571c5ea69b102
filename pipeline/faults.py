"""Fault injection for crash tests: kill the driver after its n-th commit in a stage, or a stage actor once.

Off unless the environment asks for it; costs one dict lookup per call otherwise.
  RECAP_CRASH_AT=<stage>:<n>             the driver SIGKILLs itself right after its n-th commit in <stage>
  RECAP_FAULTS_DIR=<dir>                 a <stage> actor exits its process (os._exit) when it finds the file
                                          <dir>/kill-once-<stage> (set before Ray starts: workers inherit it);
                                          a decoding process exits at start (code 1) while <dir>/child-start-fails
                                          exists (pipeline/video/child.py): a broken worker, not a bad file
                                          a decoding job of <function> on a file whose uri contains the text of
                                          <dir>/kill-decoder-<function> SIGKILLs its process (e.g. split_video)
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_commits: Counter[str] = Counter()


def after_commit(stage: str) -> None:
    spec = os.environ.get("RECAP_CRASH_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != stage:
        return
    _commits[stage] += 1
    if _commits[stage] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def actor_call(stage: str) -> None:
    """Exit this actor's process if a test asked for it: `$RECAP_FAULTS_DIR/kill-once-<stage>` exists.

    The request is taken by renaming it, so exactly one actor dies however many run."""
    root = os.environ.get("RECAP_FAULTS_DIR")
    if not root:
        return
    request = os.path.join(root, f"kill-once-{stage}")
    try:
        os.rename(request, os.path.join(root, f"killed-{stage}-{os.getpid()}"))
    except FileNotFoundError:
        return
    os._exit(1)


def killed_mid_file(once_marker: str | None = None) -> str:
    """Tests only, run as a job in the decoding child: make progress on a "file", then SIGKILL this process.

    With `once_marker`, only the first call is killed (it leaves the marker), as a transient OOM kill would be."""
    from pipeline.video.isolation import heartbeat

    heartbeat()
    if once_marker:
        if os.path.exists(once_marker):
            return "decoded on the retry"
        open(once_marker, "w").close()  # noqa: SIM115 - an empty marker file
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def decoder_job(target: str, args: tuple) -> None:
    """In the decoding child, before a job: SIGKILL it mid-file if `$RECAP_FAULTS_DIR/kill-decoder-<function>`
    names (a part of) the job's uri."""
    root = os.environ.get("RECAP_FAULTS_DIR")
    if not root or not args:
        return
    request = os.path.join(root, f"kill-decoder-{target.rsplit(':', 1)[-1]}")
    try:
        with open(request) as fh:
            needle = fh.read().strip()
    except FileNotFoundError:
        return
    if needle and needle in str(args[0]):
        killed_mid_file()
