"""The clip policy (pure) and whole-video splitting on generated videos with known cuts."""

from __future__ import annotations

import pytest

from pipeline.config import SplitConfig
from pipeline.stages.split import plan_clips, split_video


def _times(n: int, fps: float = 10.0) -> list[float]:
    return [i / fps for i in range(n)]


def test_min_length_keeps_short_scenes_as_rejected_rows():
    cfg = SplitConfig(min_clip_s=2.0, max_clip_s=None)
    clips = plan_clips("v" * 16, [(0, 15), (15, 50)], _times(50), 5.0, 10.0, cfg, 50)
    assert [(c["start_frame"], c["end_frame"], c["passed"], c["reject_reason"]) for c in clips] == [
        (0, 15, False, "too_short"),
        (15, 50, True, None),
    ]
    assert clips[1]["clip_id"] == "vvvvvvvvvvvvvvvv-0000015-0000050"
    assert clips[1]["start_s"] == pytest.approx(1.5) and clips[1]["end_s"] == pytest.approx(5.0)


def test_long_scene_is_cut_into_equal_chunks_sharing_the_scene():
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=4.0)
    clips = plan_clips("a" * 16, [(0, 10), (10, 105)], _times(105), 10.5, 10.0, cfg, 105)
    chunks = [c for c in clips if c["scene_index"] == 1]
    assert [(c["start_frame"], c["end_frame"]) for c in chunks] == [(10, 42), (42, 73), (73, 105)]
    assert all(c["scene_start_frame"] == 10 and c["scene_end_frame"] == 105 for c in chunks)
    assert all(c["end_frame"] - c["start_frame"] <= 40 for c in chunks)
    # Chunks tile the scene: no frame lost or doubled.
    assert sum(c["end_frame"] - c["start_frame"] for c in chunks) == 95


def test_trimming_removes_frames_at_cuts_only():
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=None, trim_frames=3)
    clips = plan_clips("b" * 16, [(0, 40), (40, 80)], _times(80), 8.0, 10.0, cfg, 80)
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 37), (43, 80)]
    assert clips[0]["scene_end_frame"] == 40 and clips[1]["scene_start_frame"] == 40


def test_config_rejects_max_below_min():
    with pytest.raises(ValueError, match="max_clip_s"):
        SplitConfig(min_clip_s=5, max_clip_s=2)


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_generated_samples_split_exactly_at_their_cuts(sample_videos, detector):
    root, truth = sample_videos
    cfg = SplitConfig(detector=detector, min_clip_s=0.4, max_clip_s=None).model_dump()
    for name, cuts in truth.items():
        out = split_video(str(root / name), "0123456789abcdef", cfg, None)
        starts = sorted({c["scene_start_frame"] for c in out["clips"]})[1:]
        assert starts == cuts, (name, starts)
        assert out["clips"][-1]["end_frame"] == out["num_frames"]


def test_transcoded_clips_have_exactly_the_clip_frames(sample_videos, tmp_path):
    import av

    root, truth = sample_videos
    cfg = SplitConfig(min_clip_s=0.4, max_clip_s=None, transcode={"enabled": True}).model_dump()
    out = split_video(str(root / "sample-three-shots.mp4"), "0123456789abcdef", cfg, str(tmp_path))
    assert len(out["clips"]) == 3
    for clip in out["clips"]:
        with av.open(clip["clip_uri"]) as container:
            n = sum(1 for _ in container.decode(video=0))
        assert n == clip["end_frame"] - clip["start_frame"]
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".mp4")]


def _sparse_video(path, gaps_s: float = 3600.0, count: int = 4):
    """An H.264 mp4 of `count` frames `gaps_s` seconds apart (patched timestamps, a time base of 1 ms)."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(i * gaps_s * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sparse_timestamps_make_no_clip(tmp_path):
    """4 frames an hour apart: no 1-frame clip of an hour passes; no clip ends past the last frame plus one."""
    from pipeline.stages.filter import decide

    path = tmp_path / "sparse.mp4"
    _sparse_video(path)
    out = split_video(str(path), "0123456789abcdef", SplitConfig().model_dump(), None)
    clips = out["clips"]
    assert out["num_frames"] == 4 and clips
    assert not any(c["passed"] for c in clips)
    assert {c["reject_reason"] for c in clips} == {"too_short"}
    last_frame_s = 3 * 3600.0
    assert max(c["end_s"] for c in clips) <= last_frame_s + 3600.0 + 1e-6
    # a score that could not be computed fails its check instead of passing every threshold
    thresholds = {"motion": {"min": 0.1, "max": None}, "frozen": {"min": None, "max": 0.5}}
    assert decide({"score_motion": float("nan"), "score_frozen": 0.1}, thresholds) == ["score_unavailable"]
    assert decide({"score_motion": None, "score_frozen": 0.1}, thresholds) == []  # that scorer is off


def test_short_chunks_never_fall_below_min_clip_frames():
    cfg = SplitConfig(min_clip_s=0.0, max_clip_s=1.0, min_clip_frames=8)
    clips = plan_clips("c" * 16, [(0, 9)], _times(9), 0.9, 8.0, cfg, 9)  # 9 frames at 8 fps, max 8 per clip
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 9)]


def test_clips_rebuilt_by_one_task_or_by_ray_data_are_the_same(ray_session, tmp_path):
    """Split's committed per-video results become the clips table and its rejects on Ray workers: by one task for
    a small input, by a Ray Data pipeline (in parts) for a large one; both give the same tables, and rebuilding
    again replaces them (nothing appended)."""
    import json

    import fsspec
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.engine import Source, rebuild_table
    from pipeline.schema import CLIPS_SCHEMA, SPLIT_RESULT_SCHEMA
    from pipeline.stages.split import SplitClipRows

    def clip(video: str, i: int) -> dict:
        short = i % 3 == 0
        return {
            "clip_id": f"{video}-{i:07d}-{i + 1:07d}",
            "video_id": video,
            "uri": f"/v/{video}.mp4",
            "start_frame": i,
            "end_frame": i + 1,
            "passed": not short,
            "reject_reason": "too_short" if short else None,
        }

    results = tmp_path / "results"
    results.mkdir()
    for v in range(4):  # one committed file per video
        video = f"{v:016x}"
        row = {"video_id": video, "uri": f"/v/{video}.mp4", "status": "ok"}
        row["clips_json"] = json.dumps([clip(video, i) for i in range(5)])
        pq.write_table(pa.Table.from_pylist([row], schema=SPLIT_RESULT_SCHEMA), results / f"part-{v}.parquet")
    source = Source(sorted(str(p) for p in results.iterdir()), fsspec.filesystem("file"), SPLIT_RESULT_SCHEMA)
    tables = {}
    for how, limit in (("one task", 1 << 30), ("ray data", 0), ("again", 0)):
        out = tmp_path / ("one" if how == "one task" else "many")
        done = rebuild_table(
            str(out), "clips", "split", [source], CLIPS_SCHEMA, SplitClipRows, (1.0, 2), one_task_bytes=limit
        )
        assert (done.rows, done.passed, done.rejects_by_reason) == (20, 12, {"too_short": 8}), how
        clips = pads.dataset(out / "manifest" / "clips").to_table().sort_by("clip_id")
        rejects = pads.dataset(out / "manifest" / "rejects").to_table().sort_by("item_id")
        tables[how] = (clips, rejects)
        assert not (out / "manifest" / "_work" / "split" / "rebuild").exists()
    assert tables["one task"][0].equals(tables["ray data"][0]) and tables["one task"][1].equals(tables["ray data"][1])
    assert tables["again"][0].num_rows == 20 and tables["again"][1].num_rows == 8
    assert tables["one task"][1].column("detail")[0].as_py().startswith("scene shorter than split.min_clip_s=1.0")


def test_retry_rejected_rebuilds_split_results_as_split_made_them():
    """`--retry-rejected`'s rebuild (on workers): split's own clip verdicts stay, later stages' are undone, the
    videos split does again are left out, and a video's clips come back in source order under its result."""
    import json

    import pyarrow as pa

    from pipeline.schema import CLIPS_SCHEMA
    from pipeline.stages.split import _REOPEN_SCHEMA, ClipsAsSplitMade, _split_result_of

    def clip(video: str, start: int, reason: str | None) -> dict:
        row = {name: None for name in CLIPS_SCHEMA.names}
        row.update(clip_id=f"{video}-{start}", video_id=video, uri=f"/{video}.mp4", start_frame=start)
        return {**row, "reject_reason": reason, "passed": reason is None, "score_aesthetic": 0.5}

    clips = pa.Table.from_pylist(
        [
            clip("a", 40, "aesthetic"),  # the filter's verdict: undone
            clip("a", 0, "too_short"),  # split's own: kept
            clip("a", 20, "decode_damaged"),  # split's own: kept
            clip("b", 0, None),  # b is split again: left out
        ]
    )
    rows = ClipsAsSplitMade(["b"])(clips)
    assert rows.schema == _REOPEN_SCHEMA and rows.column("video_id").to_pylist() == ["a"] * 3
    head = {"video_id": "a", "uri": "/a.mp4", "status": "ok", "reject_reason": None, "reject_detail": None}
    group = pa.concat_tables([pa.Table.from_pylist([{**head, "num_frames": 60}], schema=_REOPEN_SCHEMA), rows])
    (result,) = _split_result_of(group).to_pylist()
    made = json.loads(result["clips_json"])
    assert [(c["start_frame"], c["reject_reason"], c["passed"]) for c in made] == [
        (0, "too_short", False),
        (20, "decode_damaged", False),
        (40, None, True),
    ]
    assert all(set(c) == set(CLIPS_SCHEMA.names) for c in made)  # the filter's columns are not split's
    assert _split_result_of(rows).num_rows == 0  # clips without a result row: a video split does again
