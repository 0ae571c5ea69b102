"""One writer per corpus: a second writer is refused with the holder's name, a dead holder's lease is taken over,
readers are never blocked.

The holder is a real second process holding OUT's lease (as `recap run` does, heartbeat thread included); the
commands tried against it are the real CLI, refused before they touch anything, or (taking a dead holder's lease
over) a re-run whose stages are all done, so no new pipeline run is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import cli, jobs
from pipeline.config import ConfigError, load_config
from pipeline.errors import LeaseHeld, LeaseLost
from pipeline.lease import WriterLease, lease_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from pipeline.lease import WriterLease\n"
    "WriterLease(sys.argv[1], 'recap run --output ' + sys.argv[1], heartbeat_s=float(sys.argv[2])).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def corpus(sample_corpora, tmp_path) -> Path:
    """A finished corpus of our own (the session's is shared read-only)."""
    out = tmp_path / "corpus"
    shutil.copytree(sample_corpora["full"], out)
    return out


@pytest.fixture
def hold() -> Iterator:
    """Start a process that holds a corpus's writer lease; every one started is SIGKILLed at the end."""
    procs: list[subprocess.Popen] = []

    def start(out: Path, heartbeat_s: float = 0.2) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(out), str(heartbeat_s)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _run_argv(out: Path, sample_corpora: dict, *extra: str, stages: str = "ingest,split,filter") -> list[str]:
    argv = ["run", "--config", str(PROJECT_ROOT / "configs" / "smoke.yaml"), "--output", str(out), "--stages", stages]
    for item in [*sample_corpora["overrides"], *extra]:
        argv += ["--set", item]
    return [*argv, "--input", *sample_corpora["inputs"]]


def _lease(out: Path) -> dict | None:
    path = Path(lease_path(str(out)))
    return json.loads(path.read_text()) if path.exists() else None


def _manifest_files(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "manifest").rglob("*") if p.name != "_lease.json"}


def test_a_second_writer_is_refused_while_readers_go_on(corpus, sample_corpora, hold, capsys):
    holder = hold(corpus)
    before = _manifest_files(corpus)
    for argv in (_run_argv(corpus, sample_corpora), ["caption", "--output", str(corpus)]):
        assert cli.main(argv) == cli.EXIT_LEASE_HELD
        err = capsys.readouterr().err
        assert f"another recap run holds {corpus} since " in err and " UTC: host " in err
        assert f"pid {holder.pid}, `recap run --output {corpus}`" in err
        assert "wait for it, or pass --break-lease if it is dead" in err
    assert _manifest_files(corpus) == before  # refused before touching anything
    assert _lease(corpus)["pid"] == holder.pid
    # Readers take no lease: they run while the writer holds it.
    assert cli.main(["manifest", "validate", str(corpus), "--quick"]) == 0
    assert cli.main(["report", str(corpus), "--no-thumbnails"]) == 0
    assert cli.main(["manifest", "stats", str(corpus), "--json"]) == 0
    assert (corpus / "report" / "index.html").is_file()
    # The way the Airflow DAG runs a stage: the refusal names the holder in the failed task's log.
    with pytest.raises(jobs.CommandFailed) as info:
        jobs.run_local([sys.executable, "-m", "pipeline.cli", "encode", "--output", str(corpus)], echo=lambda _: None)
    assert info.value.status == "with exit code 4" and f"pid {holder.pid}," in info.value.holder
    assert f"ended with exit code 4: another recap run holds {corpus}" in str(info.value).splitlines()[0]


def test_a_killed_holders_lease_is_taken_over(corpus, sample_corpora, hold, ray_session, capsys):
    holder = hold(corpus)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # Same host, pid gone: taken over at once, without waiting for the heartbeat timeout.
    assert cli.main(_run_argv(corpus, sample_corpora)) == 0
    err = capsys.readouterr().err
    assert "taking over the writer lease" in err and f"its pid {holder.pid} is gone on this host" in err
    assert _lease(corpus) is None  # given back on exit


def test_a_stalled_holder_is_refused_then_taken_over_after_the_timeout_or_with_break_lease(
    corpus, sample_corpora, hold, ray_session, capsys
):
    holder = hold(corpus)
    holder.send_signal(signal.SIGSTOP)  # alive but silent: like a holder on another host that died
    assert cli.main(_run_argv(corpus, sample_corpora)) == cli.EXIT_LEASE_HELD  # default timeout: still fresh
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert cli.main([*_run_argv(corpus, sample_corpora), "--break-lease"]) == 0
    assert "(--break-lease)" in capsys.readouterr().err

    holder = hold(corpus)
    holder.send_signal(signal.SIGSTOP)
    while time.time() - _lease(corpus)["heartbeat"] <= 1.0:  # no more heartbeats: wait until it is stale
        time.sleep(0.2)
    timeout = ["lease.timeout_s=1", "lease.heartbeat_s=0.5"]
    assert cli.main(_run_argv(corpus, sample_corpora, *timeout)) == 0
    err = capsys.readouterr().err
    assert f"pid {holder.pid}" in err and "heartbeat is" in err and "(lease.timeout_s=1)" in err
    assert _lease(corpus) is None


def test_a_writer_whose_lease_was_taken_over_stops_and_leaves_the_new_one(tmp_path):
    out = str(tmp_path / "corpus")
    first = WriterLease(out, "recap run A", heartbeat_s=60).acquire()
    with pytest.raises(LeaseHeld, match=r"pid \d+, `recap run A`"):
        WriterLease(out, "recap run B").acquire()  # same live pid, fresh heartbeat: refused
    second = WriterLease(out, "recap run B", break_lease=True).acquire()
    second.check()
    with pytest.raises(LeaseLost, match=r"taken over \(now held by .*`recap run B`"):
        first.check()
    first.release()
    assert _lease(Path(out))["command"] == "recap run B"  # the loser does not remove the winner's lease
    second.renew()
    second.release()
    assert _lease(Path(out)) is None
    assert not [p.name for p in (tmp_path / "corpus" / "manifest").iterdir()]  # no heartbeat temporaries left


def test_a_writer_whose_lease_was_taken_over_stops_at_its_next_commit(tmp_path):
    import pyarrow as pa

    from pipeline.resume import StageCheckpoint

    out = str(tmp_path / "corpus")
    first = WriterLease(out, "recap run A", heartbeat_s=60).acquire()
    mid_stage = StageCheckpoint(out, "split", "fp", guard=first.check)  # its stage is under way
    mid_stage.commit(pa.table({"video_id": ["a"]}))
    second = WriterLease(out, "recap run B", break_lease=True).acquire()
    with pytest.raises(LeaseLost):
        mid_stage.commit(pa.table({"video_id": ["b"]}))  # stops at the next commit, not at the stage's end
    assert len(mid_stage.parts()) == 1
    first.release()
    second.release()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat_only(tmp_path):
    out = tmp_path / "corpus"
    (out / "manifest").mkdir(parents=True)
    record = {"host": "other-host", "pid": 4_000_000, "command": "recap encode --output X", "started": time.time()}
    Path(lease_path(str(out))).write_text(json.dumps({**record, "heartbeat": time.time() - 5}))
    (out / "manifest" / "._lease-0badf00d.tmp").write_text("{")  # a heartbeat a kill interrupted
    with pytest.raises(LeaseHeld, match=r"host other-host, pid 4000000, `recap encode --output X`"):
        WriterLease(str(out), "recap run", timeout_s=60).acquire()  # no such pid here, but it is not from here
    Path(lease_path(str(out))).write_text(json.dumps({**record, "heartbeat": time.time() - 200}))
    lease = WriterLease(str(out), "recap run", timeout_s=60).acquire()
    assert re.search(r"\(its heartbeat is 20\d s old \(lease.timeout_s=60\)\): host other-host", lease.taken_over)
    assert sorted(p.name for p in (out / "manifest").iterdir()) == ["_lease.json"]
    lease.release()
    # A holder killed while creating its lease leaves an unreadable record: the file's age stands for its heartbeat.
    Path(lease_path(str(out))).write_text('{"host": "h')
    with pytest.raises(LeaseHeld, match="unreadable lease"):
        WriterLease(str(out), "recap run", timeout_s=60).acquire()
    os.utime(lease_path(str(out)), (time.time() - 500, time.time() - 500))
    WriterLease(str(out), "recap run", timeout_s=60).acquire().release()
    assert not list((out / "manifest").iterdir())


def test_lease_timings_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"lease\.heartbeat_s=60 must be at most half of lease\.timeout_s=100"):
        load_config(None, ["lease.timeout_s=100", "lease.heartbeat_s=60"])
    assert load_config(None, []).lease.timeout_s == 120


def test_heartbeats_keep_a_live_writers_lease_fresh(tmp_path):
    out = str(tmp_path / "corpus")
    lease = WriterLease(out, "recap run", timeout_s=2, heartbeat_s=0.05).acquire()
    first = _lease(Path(out))["heartbeat"]
    deadline = time.monotonic() + 10
    while _lease(Path(out))["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lease(Path(out))["heartbeat"] > first and _lease(Path(out))["pid"] == os.getpid()
    lease.release()


def test_a_reader_never_sees_half_a_swap(tmp_path):
    """A reader arriving between the two renames of a writer's table swap waits for the new copy."""
    import threading

    import pyarrow as pa

    from pipeline import manifest
    from pipeline.schema import REJECTS_SCHEMA

    out = str(tmp_path)
    row = {"stage": "split", "item_id": "a", "uri": "u", "reason": "too_short", "detail": "d"}
    manifest.write_table(out, "rejects", pa.Table.from_pylist([row], schema=REJECTS_SCHEMA), prefix="split")
    writer = manifest.TableWriter(out, "rejects", "split", schema=REJECTS_SCHEMA)
    writer.write_rows([row, {**row, "item_id": "b"}])
    writer._flush()
    writer.fs.pipe_file(f"{writer.staging}/{manifest.COMPLETE}", b"")
    aside = f"{writer.table}/.split.old-test"
    writer.fs.mv(writer.final, aside, recursive=True)  # the writer is between its two renames
    seen: list[list[str]] = []
    reader = threading.Thread(target=lambda: seen.append(manifest.read_table(out, "rejects").column(1).to_pylist()))
    reader.start()
    reader.join(0.2)  # the reader finds the swap in flight and waits; then the writer finishes it
    writer.fs.mv(writer.staging, writer.final, recursive=True)
    writer.fs.rm(aside, recursive=True)
    reader.join()
    assert seen == [["a", "b"]]  # the new copy, never the table without its split part
