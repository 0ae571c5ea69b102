"""A crashing or hanging decoder costs one job, never the worker that runs it; a broken worker rejects nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.errors import DecoderUnavailable
from pipeline.video.isolation import IsolatedWorker

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_results_errors_crashes_and_hangs():
    with IsolatedWorker(stall_timeout_s=2.0, poll_s=0.05) as worker:
        ok = worker.run("math:factorial", 5)
        assert ok.ok and ok.result == 120
        error = worker.run("math:factorial", -1)
        assert error.status == "error" and error.error_type == "ValueError"
        crash = worker.run("ctypes:string_at", 0)  # a real segfault in the child
        assert crash.status == "crash" and crash.signal == "SIGSEGV" and "the decoder crashed" in crash.message
        abort = worker.run("os:abort")
        assert abort.status == "crash" and abort.signal == "SIGABRT"
        hang = worker.run("time:sleep", 60)  # no heartbeat: the watchdog kills it
        assert hang.status == "timeout"
        after = worker.run("math:factorial", 6)  # a fresh child takes the next job
        assert after.ok and after.result == 720


def test_child_is_recycled_after_max_jobs():
    with IsolatedWorker(max_jobs_per_child=2) as worker:
        pids = [worker.run("os:getpid").result for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


@pytest.fixture
def broken_child():
    """Every decoding process started while this is active exits with code 1 before its first heartbeat."""
    fault = Path(os.environ["RECAP_FAULTS_DIR"]) / "child-start-fails"  # conftest sets it before Ray starts
    fault.write_text("")
    yield fault
    fault.unlink(missing_ok=True)


def test_a_child_that_cannot_start_raises_instead_of_rejecting(broken_child):
    with IsolatedWorker(start_attempts=2) as worker, pytest.raises(DecoderUnavailable) as caught:
        worker.run("math:factorial", 5)
    assert "exited with code 1 before its first heartbeat" in str(caught.value)
    assert "refuses to start (child-start-fails)" in str(caught.value)  # the child's own stderr


def test_a_broken_worker_stops_the_run_and_rejects_nothing(ray_session, sample_videos, broken_child, tmp_path, capsys):
    sample_dir, _truth = sample_videos
    out = tmp_path / "corpus"
    argv = [
        "ingest",
        "--config",
        str(PROJECT_ROOT / "configs" / "smoke.yaml"),
        "--set",
        "ray.progress=off",
        "--input",
        str(sample_dir / "sample-quick-cuts.mp4"),
        str(sample_dir / "sample-three-shots.mp4"),
        "--output",
        str(out),
    ]
    assert main(argv) == 6
    err = capsys.readouterr().err
    assert "the ingest stage stopped" in err and "exited with code 1" in err and "child-start-fails" in err
    assert "no video was rejected" in err
    assert not (out / "manifest" / "videos").exists()  # no rejected rows: the videos stay to do
    broken_child.unlink()
    assert main(argv) == 0  # the same command, the worker fixed: every video ok
    videos = ds.dataset(out / "manifest" / "videos").to_table().to_pylist()
    assert sorted(v["status"] for v in videos) == ["ok", "ok"]


def test_the_child_needs_nothing_from_the_callers_main():
    """From a script piped into `python -` (spawn would re-import `<stdin>` and fail) the child still runs jobs."""
    script = "from pipeline.video.isolation import IsolatedWorker\nprint('RESULT', IsolatedWorker().run('math:factorial', 5).result)\n"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True, env=env, timeout=120)
    assert "RESULT 120" in done.stdout, done.stderr[-2000:]


def test_a_file_killed_by_sigkill_is_retried_once_in_a_fresh_child(tmp_path):
    from pipeline.stages.ingest import IngestStage

    stage = IngestStage({})
    try:
        transient = stage.run_isolated("pipeline.faults:killed_mid_file", str(tmp_path / "killed-once"))
        assert transient.ok and transient.result == "decoded on the retry"
        always = stage.run_isolated("pipeline.faults:killed_mid_file")
        reason, detail = stage.reject_of(always)
    finally:
        stage.close()
    assert reason == "decoder_crash" and always.signal == "SIGKILL"
    assert "killed by SIGKILL" in detail and "OOM killer" in detail and "on each of 2 attempts" in detail


def test_death_cause_names_the_signal_and_its_likely_cause():
    import signal

    from pipeline.video.isolation import death_cause

    assert death_cause(-signal.SIGKILL, near_memory_limit=0.0)[1].endswith("probably the kernel's OOM killer")
    assert "from outside" in death_cause(-signal.SIGKILL, near_memory_limit=1.1)[1]
    assert death_cause(-signal.SIGSEGV) == ("SIGSEGV", "died with SIGSEGV: the decoder crashed on this file")
    assert death_cause(3) == ("", "exited with code 3")


def _copy_with_decoder_crashes(corpus: Path, out: Path, crashed: int) -> None:
    """A copy of a finished corpus whose first `crashed` videos read as rejected decoder_crash."""
    import shutil

    import pyarrow as pa

    from pipeline import manifest

    shutil.copytree(corpus, out)
    rows = manifest.read_table(str(out), "videos").to_pylist()
    for row in rows[:crashed]:
        row.update(status="rejected", reject_reason="decoder_crash", reject_detail="decoding process died")
    manifest.write_table(str(out), "videos", pa.Table.from_pylist(rows), prefix="videos")


def test_a_run_with_too_many_decoder_failures_fails_loudly(sample_corpora, tmp_path, capsys):
    out = tmp_path / "sick"
    _copy_with_decoder_crashes(sample_corpora["partial"], out, crashed=1)  # 1 of 2 videos
    argv = ["ingest", "--config", str(PROJECT_ROOT / "configs" / "smoke.yaml"), "--input", *sample_corpora["inputs"]]
    argv += [f"--set={o}" for o in sample_corpora["overrides"]] + ["--output", str(out)]
    assert main(argv) == 0  # 50% is not more than the default share
    assert "UNHEALTHY" not in capsys.readouterr().err
    assert main([*argv, "--set", "isolation.max_decoder_failure_share=0.4"]) == 5
    err = capsys.readouterr().err
    assert "RECAP RUN UNHEALTHY: 1 of 2 input videos (50%) were rejected decoder_crash/decode_timeout" in err
    assert (
        main([*argv, "--set=isolation.max_decoder_failure_share=0.4", "--set=isolation.decoder_failure_exit_code=0"])
        == 0
    )


def test_retry_rejected_reprocesses_exactly_the_named_reasons(sample_corpora, tmp_path):
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    def table(name: str) -> list[dict]:
        return ds.dataset(out / "manifest" / name, ignore_prefixes=[".", "_"]).to_table().to_pylist()

    one_actor = ["ingest.resources.concurrency=1", "split.resources.concurrency=1"]  # fewer actors to start
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", [*sample_corpora["overrides"], *one_actor])
    inputs, out = sample_corpora["inputs"], tmp_path / "retry"
    faults = Path(os.environ["RECAP_FAULTS_DIR"])
    kills = {
        faults / "kill-decoder-probe_video": "sample-quick-cuts",
        faults / "kill-decoder-split_video": "three-shots",
    }
    try:
        for path, uri_part in kills.items():
            path.write_text(uri_part)
        run_pipeline(config, str(out), inputs=inputs, stages=["ingest", "split"])
    finally:
        for path in kills:
            path.unlink(missing_ok=True)
    first = {Path(v["uri"]).name: v for v in table("videos")}
    assert {name: v["reject_reason"] for name, v in first.items()} == {
        "sample-quick-cuts.mp4": "decoder_crash",  # killed while probed (ingest)
        "sample-three-shots.mp4": "decoder_crash",  # killed while split
    }
    assert all("SIGKILL" in v["reject_detail"] and "2 attempts" in v["reject_detail"] for v in first.values())

    results = run_pipeline(
        config, str(out), inputs=inputs, stages=["ingest", "split"], retry_rejected=["decode_timeout"]
    )
    assert [r.skipped for r in results] == [True, True]  # no video was rejected for that reason
    assert [v["reject_reason"] for v in table("videos")] == ["decoder_crash", "decoder_crash"]

    split_kill = faults / "kill-decoder-split_video"
    split_kill.write_text("quick-cuts")  # probed again fine, then killed while split: rejected by split now
    try:
        results = run_pipeline(
            config, str(out), inputs=inputs, stages=["ingest", "split"], retry_rejected=["decoder_crash"]
        )
    finally:
        split_kill.unlink(missing_ok=True)
    assert [r.resumed for r in results] == [1, 0]  # three-shots was not probed again, only split again
    now = {Path(v["uri"]).name: (v["status"], v["reject_reason"]) for v in table("videos")}
    assert now == {"sample-quick-cuts.mp4": ("rejected", "decoder_crash"), "sample-three-shots.mp4": ("ok", None)}
    three_shots = {c["clip_id"]: c for c in table("clips")}
    assert three_shots

    # quick-cuts is split again; three-shots' split result is rebuilt from `clips` by Ray workers, not redone
    results = run_pipeline(
        config, str(out), inputs=inputs, stages=["ingest", "split"], retry_rejected=["decoder_crash"]
    )
    assert [r.resumed for r in results] == [2, 1]
    assert sorted(v["status"] for v in table("videos")) == ["ok", "ok"]
    baseline = ds.dataset(sample_corpora["partial"] / "manifest" / "clips").to_table(columns=["clip_id"])
    assert sorted(c["clip_id"] for c in table("clips")) == sorted(baseline.column(0).to_pylist())
    rebuilt = {c["clip_id"]: c for c in table("clips") if c["clip_id"] in three_shots}
    assert rebuilt == three_shots  # the same rows, every column, as split made them
    assert [r for r in table("rejects") if r["reason"] == "decoder_crash"] == []
