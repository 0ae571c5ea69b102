"""A crashing or hanging decoder costs one job, never the worker that runs it."""

from __future__ import annotations

from pipeline.video.isolation import IsolatedWorker


def test_results_errors_crashes_and_hangs():
    with IsolatedWorker(stall_timeout_s=2.0, poll_s=0.05) as worker:
        ok = worker.run("math:factorial", 5)
        assert ok.ok and ok.result == 120
        error = worker.run("math:factorial", -1)
        assert error.status == "error" and error.error_type == "ValueError"
        crash = worker.run("ctypes:string_at", 0)  # a real segfault in the child
        assert crash.status == "crash" and "SIGSEGV" in crash.message
        abort = worker.run("os:abort")
        assert abort.status == "crash" and "SIGABRT" in abort.message
        hang = worker.run("time:sleep", 60)  # no heartbeat: the watchdog kills it
        assert hang.status == "timeout"
        after = worker.run("math:factorial", 6)  # a fresh child takes the next job
        assert after.ok and after.result == 720


def test_child_is_recycled_after_max_jobs():
    with IsolatedWorker(max_jobs_per_child=2) as worker:
        pids = [worker.run("os:getpid").result for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
