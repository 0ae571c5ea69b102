"""`recap run` streams ingest, split and filter scoring: the same corpus as running them one at a time, and the
driver commits the parts the workers staged, in stage order, and only the copy of a duplicate file that ingest
keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint
from pipeline.schema import VIDEOS_SCHEMA
from pipeline.stream import RECORD_SCHEMA, STREAM_SCHEMA, StreamCommits, StreamParts


def _stages(out: Path) -> dict:
    return json.loads((out / "manifest" / "run.json").read_text())["stages"]


def test_streamed_stages_start_together(sample_corpora):
    """The `partial` corpus ran `run_pipeline(stages=[ingest, split, filter])`: the streaming path. Its tables equal
    a run of the stages one at a time: test_resume.py::test_a_killed_actor_loses_no_clip_and_stages_one_at_a_time."""
    stages = _stages(sample_corpora["partial"])
    # The three started with the stream; split and filter worked before ingest finished; each finished in order.
    assert stages["ingest"]["started_at"] <= stages["split"]["started_at"] <= stages["filter"]["started_at"]
    assert stages["filter"]["started_at"] < stages["ingest"]["finished_at"] <= stages["split"]["finished_at"]
    assert stages["split"]["finished_at"] <= stages["filter"]["finished_at"]
    assert all(stages[s]["status"] == "done" for s in ("ingest", "split", "filter"))


def _video(uri: str, video_id: str, status: str = "ok", clips: int = 2) -> dict:
    ingest = {"video_id": video_id, "uri": uri, "status": status, "num_frames": 48, "num_frames_exact": False}
    clip_rows = [
        {"clip_id": f"{video_id}-{i}", "video_id": video_id, "uri": uri, "start_frame": i, "end_frame": i + 1}
        | {"passed": True}
        for i in range(clips)
    ]
    split = {"video_id": video_id, "uri": uri, "status": "ok", "num_frames": 48, "clips_json": json.dumps(clip_rows)}
    return {"video_id": video_id, "uri": uri, "ingest": ingest, "split": split if status == "ok" else None}


def _scored(uri: str, video_id: str, index: int) -> dict:
    return {"clip_id": f"{video_id}-{index}", "video_id": video_id, "uri": uri, "score_sharpness": 1.0 + index}


def test_workers_stage_parts_and_the_driver_commits_the_first_copy(tmp_path):
    """The stream's last actors write each batch's rows as staged parts (`StreamParts`); the driver commits them from
    small records, in stage order, by renaming the parts, and reads a part only to drop another copy's rows."""
    out = str(tmp_path)
    checkpoints = {s: StageCheckpoint(out, s, "fp") for s in ("ingest", "split", "filter")}
    # An interrupted run had probed d.mp4 (video D): e.mp4, the same bytes, is not split again.
    checkpoints["ingest"].commit(pa.Table.from_pylist([_video("d.mp4", "D")["ingest"]], schema=VIDEOS_SCHEMA))
    progress = {s: StageProgress(s, 0, mode="off") for s in ("ingest", "split", "filter")}
    commits = StreamCommits(checkpoints, progress)
    writer = StreamParts({s: c.uri for s, c in checkpoints.items()})
    staged = tmp_path / "manifest" / "_work" / "filter" / ".staged"

    def batch(rows: list[dict]) -> pa.Table:
        return writer(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))

    # a.mp4 and its copy b.mp4 were both split and scored; c.mp4 was rejected by ingest.
    first = [_video("a.mp4", "A"), _video("b.mp4", "A"), _video("c.mp4", "C", status="rejected")]
    first += [_video("e.mp4", "D"), _scored("a.mp4", "A", 0), _scored("b.mp4", "A", 0), _scored("b.mp4", "A", 1)]
    records = batch(first)
    assert records.schema == RECORD_SCHEMA and "clips_json" not in records.column_names  # no rows, only records
    assert checkpoints["split"].read() is None and checkpoints["filter"].read() is None  # staged, not committed
    commits.commit(records)
    assert sorted(checkpoints["ingest"].done("uri")) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"]
    assert checkpoints["split"].read().column("uri").to_pylist() == ["a.mp4"]
    scored = checkpoints["filter"].read()  # a.mp4's first clip: committed before its second arrives
    assert scored.column("clip_id").to_pylist() == ["A-0"] and scored.column("uri").to_pylist() == ["a.mp4"]
    # a.mp4's second clip comes in a part of its own: committed by a rename (the same file), nothing left staged.
    records = batch([_scored("a.mp4", "A", 1)])
    (name,) = [f for f in records.column("filter_part").to_pylist() if f]
    inode = (staged / name).stat().st_ino
    commits.commit(records)
    assert inode in {p.stat().st_ino for p in (tmp_path / "manifest" / "_work" / "filter").glob("part-*.parquet")}
    assert sorted(checkpoints["filter"].read().column("clip_id").to_pylist()) == ["A-0", "A-1"]
    assert not any(staged.iterdir())
    assert progress["split"].done == 1 and progress["filter"].done == 2 and progress["ingest"].done == 4
    # A crash leaves staged parts uncommitted: the next run's checkpoint removes them.
    batch([_video("f.mp4", "F"), _scored("f.mp4", "F", 0)])
    assert any(staged.iterdir())
    StageCheckpoint(out, "filter", "fp")
    assert not staged.exists()


def test_model_stages_score_clip_rows_and_pass_video_rows(tmp_path):
    """In the stream a filter model stage (here the tiny CLIP) sees clip rows only; a video's row, which carries its
    ingest and split results to the driver, passes untouched."""
    import cv2
    import numpy as np

    from pipeline.config import load_config
    from pipeline.stages.filter import ClipModelStage
    from pipeline.stream import ClipRowsOnly

    config = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml", ["filter.clip.model=recap-tiny:clip"]
    )
    rng = np.random.default_rng(0)
    jpeg = [cv2.imencode(".jpg", rng.integers(0, 255, (64, 96, 3), np.uint8))[1].tobytes() for _ in range(2)]
    video = _video("a.mp4", "A")
    clips = [{**_scored("a.mp4", "A", i), "frames_jpeg": jpeg} for i in range(2)]
    out = ClipRowsOnly(ClipModelStage, config)(pa.Table.from_pylist([video, *clips], schema=STREAM_SCHEMA))
    assert out.schema == STREAM_SCHEMA
    rows = {r["clip_id"]: r for r in out.to_pylist()}
    assert rows[None]["ingest"] == video["ingest"] | {k: None for k in VIDEOS_SCHEMA.names if k not in video["ingest"]}
    assert rows[None]["split"]["clips_json"] == video["split"]["clips_json"]
    assert [rows[c]["score_sharpness"] for c in ("A-0", "A-1")] == [1.0, 2.0]  # the scores before it stay
    for clip_id in ("A-0", "A-1"):
        assert rows[clip_id]["score_aesthetic"] is not None and len(rows[clip_id]["clip_embedding"]) > 0
        assert rows[clip_id]["ingest"] is None and rows[clip_id]["split"] is None


def test_a_stream_whose_pools_do_not_fit_the_cluster_is_refused(ray_session):
    """Pools that ask for more than the cluster has could starve an upstream pool: such a stream is not run."""
    from pipeline.config import Resources
    from pipeline.engine import pools_fit

    cpus = ray_session.cluster_resources()["CPU"]  # the session's Ray (another test may have started it)
    half = Resources(num_cpus=cpus / 4, concurrency=2)
    assert pools_fit({"a": half, "b": Resources(num_cpus=cpus / 2, concurrency=1)}) is None
    why = pools_fit({"a": half, "b": Resources(num_cpus=cpus / 2 + 1, num_gpus=1, concurrency=1)})
    assert why is not None and f"{cpus + 1:g} CPUs (the cluster has {cpus:g})" in why
    assert "1 GPUs (the cluster has 0)" in why


def test_a_resumed_filter_scores_only_the_clips_not_committed():
    """Scored clips are committed as they come, so a crash can leave a video half scored: the resumed filter's
    workers, reading `clips`, give it only the clips the checkpoint lacks (the video decoded once for them)."""
    from pipeline.schema import CLIPS_SCHEMA
    from pipeline.stages.filter import ClipsToScore

    rows = json.loads(_video("a.mp4", "A", clips=3)["split"]["clips_json"])
    rows += json.loads(_video("b.mp4", "B", clips=1)["split"]["clips_json"])
    clips = pa.Table.from_pylist([{**r, "fps": 24.0} for r in rows], schema=CLIPS_SCHEMA)
    todo = ClipsToScore(False, ["A-0", "B-0"])(clips).to_pylist()
    assert [(v["video_id"], v["fps"]) for v in todo] == [("A", 24.0)]
    assert [c["clip_id"] for c in json.loads(todo[0]["clips_json"])] == ["A-1", "A-2"]
    assert ClipsToScore(False, [])(clips).column("video_id").to_pylist() == ["A", "B"]  # longest first
