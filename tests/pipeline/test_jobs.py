"""pipeline.jobs without a cluster: command lines, submission ids, and the local runner's streaming and failures.

Ray job submission against a real cluster is exercised in tests/test_cluster.py.
"""

from __future__ import annotations

import sys

import pytest

from pipeline import jobs


def test_stage_argv_puts_inputs_only_on_ingest_and_repeats_set():
    argv = jobs.recap_stage_argv(
        "ingest", "/out dir", inputs=["a.mp4", "s3://b/c d.mp4"], config="c.yaml", overrides=["x.y=1", "z=[1, 2]"]
    )
    assert argv == [
        "recap", "ingest", "--input", "a.mp4", "s3://b/c d.mp4", "--output", "/out dir",
        "--config", "c.yaml", "--set", "x.y=1", "--set", "z=[1, 2]",
    ]  # fmt: skip
    assert jobs.recap_stage_argv("encode", "o", inputs=["ignored.mp4"], recap="/opt/bin/recap") == [
        "/opt/bin/recap", "encode", "--output", "o",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="input"):
        jobs.recap_stage_argv("ingest", "o")


def test_train_argv_adds_ray_train_flags_only_with_ray():
    assert jobs.recap_train_argv("corpus", "run", config="t.yaml", steps=5) == [
        "recap", "train", "--data", "corpus", "--output", "run", "--config", "t.yaml", "--steps", "5",
    ]  # fmt: skip
    assert jobs.recap_train_argv("corpus", "run", ray=True, num_workers=2, use_gpu=True)[-4:] == [
        "--ray", "--num-workers", "2", "--use-gpu",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="Ray Train"):
        jobs.recap_train_argv("corpus", "run", num_workers=2)


def test_submission_ids_are_one_per_try_and_safe():
    ids = jobs.submission_ids("recaption_corpus", "manual__2026-01-01T00:00:00+00:00", "encode", tries=3)
    assert ids == [f"recaption_corpus-manual__2026-01-01T00_00_00_00_00-encode-try{n}" for n in (1, 2, 3)]


def test_run_local_streams_every_line(tmp_path):
    lines: list[str] = []
    code = "import sys; print('one'); print('two', file=sys.stderr); sys.stdout.write('three')"
    jobs.run_local([sys.executable, "-c", code], cwd=str(tmp_path), echo=lines.append)
    assert lines[0].startswith("$ ") and lines[0].endswith(code.replace("'", "'\"'\"'") + "'")
    assert lines[1:] == ["one", "two", "three"]


def test_run_local_failure_carries_exit_code_and_last_lines():
    code = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(7)"
    with pytest.raises(jobs.CommandFailed) as info:
        jobs.run_local([sys.executable, "-c", code], echo=lambda _line: None)
    assert info.value.status == "with exit code 7"
    assert info.value.tail == [f"line {i}" for i in range(100 - jobs.TAIL_LINES, 100)]
    assert "line 99" in str(info.value) and "line 0\n" not in str(info.value)


def test_run_local_reports_a_missing_executable():
    with pytest.raises(FileNotFoundError, match="no-such-recap-binary"):
        jobs.run_local(["no-such-recap-binary", "--help"])
