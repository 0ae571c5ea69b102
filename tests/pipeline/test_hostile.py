"""Hostile inputs, called in-process on the session's sample videos (no Ray): cut-off files read as `truncated`
in plain words and keep their decodable part, still images are not videos, skipped files are counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import SplitConfig
from pipeline.stages.split import split_video
from pipeline.video.decode import VideoRejected, probe_video


def _remux(src: Path, dst: Path, options: dict[str, str] | None = None) -> bytes:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options or {}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst.read_bytes()


def _outcome(path: Path) -> tuple[str, str, int]:
    """(reason or 'ok', detail or note, clips) of ingest's probe then split, as the stages run them."""
    try:
        info = probe_video(str(path))
        expected = info["num_frames"] if info["num_frames_exact"] else None
        out = split_video(str(path), "0123456789abcdef", SplitConfig().model_dump(), None, expected)
    except VideoRejected as exc:
        return exc.reason.value, exc.detail, 0
    return "ok", out["note"] or "", len(out["clips"])


@pytest.fixture(scope="module")
def cut_files(sample_videos, tmp_path_factory) -> dict[str, Path]:
    sample_root, _ = sample_videos
    root = tmp_path_factory.mktemp("cut")
    files = {}
    for fmt, options in (("mp4", {"movflags": "faststart"}), ("mkv", None)):  # moov first: the header promises all
        data = _remux(sample_root / "sample-three-shots.mp4", root / f"whole.{fmt}", options)
        for pct in (10, 50, 90):
            files[f"{pct}.{fmt}"] = root / f"cut{pct}.{fmt}"
            files[f"{pct}.{fmt}"].write_bytes(data[: len(data) * pct // 100])
    return files


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
def test_a_cut_off_file_is_truncated_in_plain_words_and_keeps_what_decodes(cut_files, fmt):
    early, half, late = (_outcome(cut_files[f"{pct}.{fmt}"]) for pct in (10, 50, 90))
    assert early[0] == "truncated" and "cut off" in early[1]
    for reason, detail, clips in (half, late):
        assert reason == "ok" and clips >= 1  # the decodable part is kept
        assert detail == "" or detail.startswith("truncated:")
    for _reason, detail, _clips in (early, half, late):
        assert not detail.startswith("[Errno") and "Operation not permitted" not in detail.split("[FFmpeg")[0]
    assert late[2] >= half[2]


def test_a_cut_off_file_is_rejected_when_asked(cut_files):
    path = cut_files["50.mp4"]
    info = probe_video(str(path))
    cfg = SplitConfig(keep_decodable=False).model_dump()
    with pytest.raises(VideoRejected) as caught:
        split_video(str(path), "0123456789abcdef", cfg, None, info["num_frames"])
    assert caught.value.reason.value == "truncated" and "header lists" in caught.value.detail


def test_a_still_image_is_not_a_video(tmp_path):
    import cv2
    import numpy as np

    for ext in ("png", "jpg"):
        ok, data = cv2.imencode(f".{ext}", np.full((48, 64, 3), 90, np.uint8))
        path = tmp_path / f"photo-{ext}.mp4"
        path.write_bytes(data.tobytes())
        with pytest.raises(VideoRejected) as caught:
            probe_video(str(path))
        assert caught.value.reason.value == "not_a_video" and "still image" in caught.value.detail


def test_files_the_extension_filter_leaves_out_are_counted(tmp_path):
    from pipeline.io.sources import discover_inputs

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "anim.gif").write_bytes(b"x")
    (tmp_path / "README").write_bytes(b"x")
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "dir.mp4" / "inner.txt").write_bytes(b"x")
    skipped: dict[str, int] = {}
    assert discover_inputs([str(tmp_path)], [".mp4"], skipped) == [str(tmp_path / "a.mp4")]
    assert skipped == {
        "extension .gif not in ingest.extensions": 1,
        "extension .txt not in ingest.extensions": 1,
        "no file extension": 1,
        "a directory named like a video": 1,
    }
