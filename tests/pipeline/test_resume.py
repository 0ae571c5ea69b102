"""Crash and resume: a driver killed at several points, a killed actor, a changed config, leftovers repaired.

The killed runs are real `recap run` processes that SIGKILL themselves right after a chosen commit
(pipeline/faults.py), i.e. at the worst moment for the data; the corpus finished by re-running the same
command must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import load_config
from pipeline.resume import ConfigChanged
from pipeline.runner import run_pipeline
from pipeline.shards.validate import validate_corpus

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _table(out: Path, name: str) -> list[dict]:
    return (
        pads.dataset(str(out / "manifest" / name), format="parquet", ignore_prefixes=[".", "_"]).to_table().to_pylist()
    )


def _corpus(out: Path) -> dict[str, str]:
    samples = _table(out, "samples")
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)), "duplicate sample keys"
    return {s["key"]: s["caption"] for s in samples}


def _leftovers(out: Path) -> list[str]:
    bad = []
    for path in out.rglob("*"):
        name = path.name
        if name.endswith((".tmp", ".partial")) or ".new-" in name or ".old-" in name or name == "_work":
            bad.append(str(path.relative_to(out)))
    return bad


@pytest.fixture(scope="module")
def inputs(sample_corpora) -> list[str]:
    return sample_corpora["inputs"]


@pytest.fixture(scope="module")
def overrides(sample_corpora) -> list[str]:
    return sample_corpora["overrides"]


@pytest.fixture(scope="module")
def baseline(sample_corpora) -> Path:
    """The uninterrupted run (shared, read-only): same inputs and settings as the crashed runs below."""
    assert _corpus(sample_corpora["full"])
    return sample_corpora["full"]


def _recap_argv(out: Path, inputs: list[str], overrides: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.yaml", "--output", str(out)]
    for o in overrides:
        argv += ["--set", o]
    return argv + ["--input", *inputs]


def _recap_env(crash_at: str = "", tag: str = "") -> dict[str, str]:
    env = {**os.environ, "RECAP_CRASH_AT": crash_at, "RECAP_TEST_RUN_TAG": tag}
    env.pop("RAY_ADDRESS", None)
    return env


def _recap_run(
    out: Path, inputs: list[str], overrides: list[str], crash_at: str, tag: str = ""
) -> subprocess.CompletedProcess:
    argv, env = _recap_argv(out, inputs, overrides), _recap_env(crash_at, tag)
    return subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)


def _second_writer_is_refused(out: Path, inputs: list[str], overrides: list[str], tag: str) -> None:
    """While one `recap run` holds OUT, the same command started again exits 4 naming the holder, touching nothing."""
    import time

    first = subprocess.Popen(
        _recap_argv(out, inputs, overrides),
        cwd=PROJECT_ROOT,
        env=_recap_env("split:1", tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lease = out / "manifest" / "_lease.json"
    deadline = time.monotonic() + 120
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lease.exists(), "the first run never took the writer lease"
    second = subprocess.run(
        _recap_argv(out, inputs, overrides), cwd=PROJECT_ROOT, env=_recap_env(), capture_output=True, text=True
    )
    assert second.returncode == 4, second.stderr[-3000:]
    assert "another recap run holds" in second.stderr and f"pid {first.pid}" in second.stderr
    _out, err = first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL, err[-3000:]


def _processes_tagged(tag: str) -> list[str]:
    """Live processes that inherited RECAP_TEST_RUN_TAG=tag: the killed run's local Ray, if it outlived it."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("RECAP_TEST_RUN_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(
                    f"{proc.pid} {proc.info['name']} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}"
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_driver_killed_at_three_points_then_resumed(baseline, inputs, overrides, tmp_path):
    import time
    import uuid

    out = tmp_path / "crashed"
    for crash_at in ("split:1", "caption:1", "encode:1"):  # early, mid-caption, mid-shard-write
        tag = uuid.uuid4().hex
        if crash_at == "split:1":  # a second writer started meanwhile is refused; the killed one's lease is taken
            _second_writer_is_refused(out, inputs, overrides, tag)
        else:
            proc = _recap_run(out, inputs, overrides, crash_at, tag)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        # Each kill lands inside a streaming pipeline: split:1 in ingest -> split -> filter (the first, fresh
        # run), caption:1 in caption -> encode (fresh after the resumed first stages); the stages of a stream
        # start together and were all still running.
        streamed = {"split:1": ("ingest", "split", "filter"), "caption:1": ("caption", "encode")}.get(crash_at, ())
        stages = json.loads((out / "manifest" / "run.json").read_text())["stages"]
        if streamed:
            assert {stages[s]["status"] for s in streamed[1:]} == {"running"}, (crash_at, stages)
            assert len({stages[s]["started_at"] for s in streamed}) == 1, (crash_at, stages)
        deadline = time.monotonic() + 20  # the local Ray the killed run started goes away with it
        while _processes_tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_tagged(tag) == []
    state = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    assert state["caption"]["status"] == "done" and state["encode"]["status"] == "running"
    assert list((out / "shards").glob("shard-*.tar")), "the killed run had committed a shard"
    results = run_pipeline(load_config(PROJECT_ROOT / "configs" / "smoke.yaml", overrides), str(out), inputs=inputs)
    assert [r.skipped for r in results] == [True, True, True, True, False]
    assert results[-1].resumed >= 1  # the shard committed before the kill was kept, not redone
    assert validate_corpus(str(out)) == []
    assert _corpus(out) == _corpus(baseline)
    assert _leftovers(out) == []
    # The baseline streamed caption -> encode in one pipeline; this corpus finished both stage by stage: the same
    # clips table (captions, decisions) and, one sample a shard, the same shard files byte for byte.
    assert _rows(out, "clips", "clip_id") == _rows(baseline, "clips", "clip_id")
    shards = [{k: v for k, v in s.items() if k != "writer_node"} for s in _rows(out, "shards", "shard")]
    assert shards == [{k: v for k, v in s.items() if k != "writer_node"} for s in _rows(baseline, "shards", "shard")]


def _rows(out: Path, name: str, key: str) -> list[dict]:
    return sorted(_table(out, name), key=lambda r: r[key])


def test_caption_and_encode_streamed_together(baseline):
    """`recap run` ran caption and encode as one pipeline: both started together, encode before caption ended."""
    stages = json.loads((baseline / "manifest" / "run.json").read_text())["stages"]
    caption, encode = stages["caption"], stages["encode"]
    assert caption["status"] == encode["status"] == "done"
    assert caption["started_at"] == encode["started_at"] < caption["finished_at"] <= encode["finished_at"]
    assert caption["counts"]["clips"] > 0 and encode["counts"]["samples"] > 0


def _sorted_rows(out: Path, name: str, key: tuple[str, ...]) -> list[dict]:
    return sorted(_table(out, name), key=lambda r: tuple(str(r[k]) for k in key))


def test_a_killed_actor_loses_no_clip_and_stages_one_at_a_time_equal_the_stream(
    ray_session, sample_corpora, inputs, overrides, tmp_path
):
    """A split actor killed mid-run loses no clip; and ingest, split and filter run one at a time (here) make the
    same tables and counts as `recap run` streaming them together (the `partial` corpus)."""
    faults = Path(os.environ["RECAP_FAULTS_DIR"])  # set by conftest before Ray started
    (faults / "kill-once-split").write_text("")
    out = tmp_path / "actor"
    one_actor = [f"{s}.resources.concurrency=1" for s in ("ingest", "split", "filter")]  # not in fingerprints
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", [*overrides, *one_actor])
    run_pipeline(config, str(out), inputs=inputs, stages=["ingest", "split"])  # one after the other
    assert list(faults.glob("killed-split-*")), "no split actor was killed"
    run_pipeline(config, str(out), stages=["filter"])
    streamed = sample_corpora["partial"]
    for name, key in (("videos", ("uri",)), ("clips", ("clip_id",)), ("rejects", ("stage", "item_id", "reason"))):
        assert _sorted_rows(out, name, key) == _sorted_rows(streamed, name, key), name
    assert len(_table(out, "clips")) > 2
    alone = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    together = json.loads((streamed / "manifest" / "run.json").read_text())["stages"]
    for stage in ("ingest", "split", "filter"):
        for field in ("counts", "rejects_by_reason", "fingerprint", "status"):
            assert alone[stage][field] == together[stage][field], (stage, field)


def test_a_shard_writer_killed_mid_shard_loses_and_doubles_nothing(ray_session, baseline, overrides, tmp_path):
    """The encode stage's shard writer (a Ray actor that writes shards on its node) dies with samples in an open
    shard: the run replaces it, encodes the lost clips again, and the corpus equals the uninterrupted one."""
    import shutil

    from pipeline import manifest
    from pipeline.stages.encode import check_write_result

    faults = Path(os.environ["RECAP_FAULTS_DIR"])  # set by conftest before Ray started
    out = tmp_path / "writer"
    shutil.copytree(baseline, out)
    (faults / "kill-once-shard-writer").write_text("")
    # Two samples a shard (the baseline has one): the writer holds an unfinished shard between blocks.
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", [*overrides, "encode.shard_max_count=2"])
    (result,) = run_pipeline(config, str(out), stages=["encode"], force=True)
    assert list(faults.glob("killed-shard-writer-*")), "no shard writer was killed"
    assert result.info["writers"]["lost"] == 1
    assert validate_corpus(str(out)) == []
    assert _corpus(out) == _corpus(baseline)
    assert _leftovers(out) == []
    shards = manifest.read_table(str(out), "shards").to_pylist()
    assert max(s["num_samples"] for s in shards) == 2
    # Written on the workers: each shard names the Ray node of its writer, and what reached the driver was a few
    # records, not the latents (the shards' bytes).
    import ray

    assert {s["writer_node"] for s in shards} == {ray.get_runtime_context().get_node_id()}
    writers = result.info["writers"]
    assert 0 < writers["driver_received_bytes"] < 0.02 * writers["shard_bytes"], writers
    with pytest.raises(TypeError, match="bytes data"):
        check_write_result({"rows": 1, "rejects": [], "shards": [{"latent": b"x"}], "vae_info": None, "captions": {}})


def test_changed_config_is_refused_then_forced(baseline, inputs, overrides, tmp_path):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(baseline, out)
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", overrides)
    extra = str(Path(inputs[0]).parent / "sample-long-take.mp4")
    with pytest.raises(ConfigChanged, match=r"ingest stage finished .*1 input file\(s\) added: .*sample-long-take"):
        run_pipeline(config, str(out), inputs=[*inputs, extra])
    with pytest.raises(ConfigChanged, match=r"1 input file\(s\) removed: .*sample-three-shots"):
        run_pipeline(config, str(out), inputs=inputs[:1])
    changed = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", [*overrides, "filter.thresholds.motion.min=0.7"])
    with pytest.raises(ConfigChanged, match=r"filter\.thresholds\.motion\.min: 0\.5 -> 0\.7.*--force"):
        run_pipeline(changed, str(out), inputs=inputs)
    assert _corpus(out) == _corpus(baseline)  # refused before any work: nothing touched
    run_pipeline(changed, str(out), stages=["filter"], force=True)
    stages = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    assert stages["filter"]["status"] == "done" and stages["caption"]["status"] == "stale"
    assert stages["encode"]["status"] == "stale"
    from pipeline import manifest

    stats = manifest.corpus_stats(str(out))  # what `manifest stats`, the summary and the report print
    assert stats["stale"] == ["caption", "encode"] and "'captioned, samples' count" in manifest.stale_note(
        stats["stale"]
    )
    # A stale stage re-runs without --force: it reads the new filter output.
    (result,) = run_pipeline(changed, str(out), stages=["caption"])
    assert not result.skipped and result.counts["clips"] > 0


def test_interrupted_table_swap_is_repaired(tmp_path):
    import pyarrow as pa

    from pipeline import manifest
    from pipeline.schema import REJECTS_SCHEMA

    out = str(tmp_path)
    row = {"stage": "split", "item_id": "a", "uri": "u", "reason": "too_short", "detail": "d"}
    manifest.write_table(out, "rejects", pa.Table.from_pylist([row], schema=REJECTS_SCHEMA), prefix="split")
    writer = manifest.TableWriter(out, "rejects", "split", schema=REJECTS_SCHEMA)
    writer.write_rows([row, {**row, "item_id": "b"}])
    writer._flush()  # the new copy is whole but the process dies before the swap
    assert [r["item_id"] for r in _table(tmp_path, "rejects")] == ["a"]  # readers see the old copy only
    assert manifest.recover_tables(out) and _leftovers(tmp_path) == []
    assert [r["item_id"] for r in _table(tmp_path, "rejects")] == ["a"]


def test_missing_outputs_are_redone_and_the_summary_counts_the_corpus(baseline, inputs, overrides, tmp_path, capsys):
    """A finished stage checks its outputs on a re-run: lost or damaged shards are re-encoded (only theirs),
    and a skipped re-run's summary counts the same rejects as the rejects table."""
    import shutil

    from pipeline import cli

    out = tmp_path / "repaired"
    shutil.copytree(baseline, out)
    shards = sorted((out / "shards").glob("shard-*.tar"))
    assert len(shards) >= 3
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:1000])  # damaged: another size than recorded
    config = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", overrides)
    results = run_pipeline(config, str(out), inputs=inputs)
    assert [r.skipped for r in results] == [True, True, True, True, False]
    assert results[-1].resumed == len(_corpus(baseline)) - 2  # the intact shards were kept, two samples redone
    assert validate_corpus(str(out)) == []
    assert _corpus(out) == _corpus(baseline)
    assert _leftovers(out) == []
    stages = json.loads((out / "manifest" / "run.json").read_text())["stages"]
    assert stages["encode"]["status"] == "done" and stages["encode"]["repaired"]

    argv = ["run", "--config", str(PROJECT_ROOT / "configs" / "smoke.yaml"), "--output", str(out)]
    for o in overrides:
        argv += ["--set", o]
    assert cli.main([*argv, "--input", *inputs]) == 0
    printed = capsys.readouterr().out
    recorded = len(_table(out, "rejects"))
    assert recorded > 0 and f"rejects recorded: {recorded:,} (0 by this run" in printed
    split_line = next(line for line in printed.splitlines() if line.strip().startswith("split"))
    assert f"clips {len(_table(out, 'clips')):,}" in split_line and "rejects: none" not in split_line
