"""Finding inputs (paths, directories, globs, fsspec URIs) and probing them."""

from __future__ import annotations

import fsspec
import pytest

from pipeline.config import VIDEO_EXTENSIONS, load_config
from pipeline.io.sources import InputError, discover_inputs
from pipeline.stages.ingest import IngestStage, mark_duplicates
from pipeline.video.decode import VideoRejected, probe_video


def test_discovers_dirs_globs_files_and_filters_extensions(tmp_path):
    (tmp_path / "a").mkdir()
    for rel in ("a/one.mp4", "a/two.MKV", "a/notes.txt", "three.webm"):
        (tmp_path / rel).write_bytes(b"x")
    found = discover_inputs([str(tmp_path)], VIDEO_EXTENSIONS)
    assert [p.rsplit("/", 2)[-1] for p in found] == ["one.mp4", "two.MKV", "three.webm"]
    assert discover_inputs([str(tmp_path / "**" / "*.mp4")], VIDEO_EXTENSIONS) == [str(tmp_path / "a" / "one.mp4")]
    # A file named explicitly is taken whatever its name, and inputs are deduplicated.
    explicit = str(tmp_path / "a" / "notes.txt")
    assert discover_inputs([explicit, explicit], VIDEO_EXTENSIONS) == [explicit]
    assert discover_inputs(["file://" + str(tmp_path / "three.webm")], VIDEO_EXTENSIONS) == [
        str(tmp_path / "three.webm")
    ]
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs([str(tmp_path / "missing")], VIDEO_EXTENSIONS)
    with pytest.raises(InputError, match="matches no file"):
        discover_inputs([str(tmp_path / "*.avi")], VIDEO_EXTENSIONS)


def test_fsspec_uris_are_listed_and_probed(sample_videos):
    root, _truth = sample_videos
    fs = fsspec.filesystem("memory")
    data = (root / "sample-three-shots.mp4").read_bytes()
    fs.pipe("/bucket/raw/clip.mp4", data)
    fs.pipe("/bucket/raw/deeper/other.mov", data)
    fs.pipe("/bucket/raw/skip.json", b"{}")
    found = discover_inputs(["memory://bucket/raw"], VIDEO_EXTENSIONS)
    assert found == ["memory:///bucket/raw/clip.mp4", "memory:///bucket/raw/deeper/other.mov"]
    info = probe_video(found[0])
    assert (info["num_frames"], info["width"], info["height"], info["codec"]) == (228, 320, 180, "h264")
    assert info["fps"] == pytest.approx(24.0) and info["duration_s"] == pytest.approx(9.5, abs=0.05)


def test_probe_facts_of_real_videos(videos_dir):
    delayed = probe_video(str(videos_dir / "delayed_start.mp4"))
    assert delayed["start_s"] > 0  # first timestamp is not zero
    avi = probe_video(str(videos_dir / "mmaction2_test.avi"))
    assert (avi["codec"], avi["width"], avi["height"], avi["has_audio"]) == ("mpeg4", 320, 240, True)
    hevc = probe_video(str(videos_dir / "h265_video.mp4"))
    assert (hevc["codec"], hevc["num_frames"]) == ("hevc", 10)


def test_ingest_stage_rows_and_duplicates(sample_videos, tmp_path):
    root, _truth = sample_videos
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    copy = tmp_path / "copy.mp4"
    copy.write_bytes((root / "sample-long-take.mp4").read_bytes())
    stage = IngestStage(load_config())
    try:
        batch = {"uri": [str(root / "sample-long-take.mp4"), str(empty), str(copy)]}
        rows = mark_duplicates(stage(batch).to_pylist())
    finally:
        stage.close()
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["sample-long-take.mp4"]["video_id"] == by_name["copy.mp4"]["video_id"]
    assert len(by_name["copy.mp4"]["video_id"]) == 16
    statuses = sorted((r["status"], r["reject_reason"]) for r in rows)
    # copy.mp4 sorts first by uri, so the original in the samples dir is the duplicate.
    assert statuses == [("ok", None), ("rejected", "duplicate_file"), ("rejected", "empty_file")]


def test_probe_rejects_non_video(tmp_path):
    path = tmp_path / "fake.mp4"
    path.write_text("not a video")
    with pytest.raises(VideoRejected) as err:
        probe_video(str(path))
    assert err.value.reason == "not_a_video"
