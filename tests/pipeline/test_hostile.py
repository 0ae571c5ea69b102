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


def test_rotation_is_applied_wherever_frames_are_used(videos_dir):
    """issue-134-rotate.mp4 is stored 1280x544 with a -90 degree display matrix: players show it 544x1280."""
    from captioner.frames import read_clip_frames
    from pipeline.config import EncodeConfig
    from pipeline.stages.encode import prepare_clip
    from pipeline.stages.filter import _convert
    from pipeline.video.decode import open_video

    path = str(videos_dir / "issue-134-rotate.mp4")
    info = probe_video(path)
    assert (info["width"], info["height"], info["rotation"]) == (544, 1280, 90)
    assert (info["video_stream"], info["video_streams"]) == (0, 1)
    frames, _ = read_clip_frames(path, 0.0, 1.0, 2)  # what the captioner sees
    assert all(f.shape[0] > f.shape[1] for f in frames)
    with open_video(path) as container:
        bgr, grey, rgb = _convert(next(container.decode(video=0)), 64, True)  # what the filter scores
    assert bgr.shape[:2] == grey.shape[:2] and bgr.shape[1] == 64 and bgr.shape[0] > 64 and rgb.shape[0] > rgb.shape[1]
    row = {"uri": path, "start_frame": 0, "end_frame": 9, "start_s": 0.0, "fps": info["fps"]}
    prepped = prepare_clip(row, EncodeConfig(num_frames=9).model_dump(), 1, 8)  # what the VAE encodes
    _t, height, width, _c = prepped["frames_shape"]
    assert height > width
    # and the stored frame itself is the other way round (what the matrix fixes)
    with open_video(path) as container:
        stored = next(container.decode(video=0))
    assert (stored.width, stored.height) == (1280, 544)


def test_a_transcoded_clip_keeps_its_display_rotation(videos_dir, tmp_path):
    from pipeline.config import TranscodeConfig
    from pipeline.video.transcode import transcode_clips

    clip = {"clip_id": "c", "start_frame": 0, "end_frame": 5}
    written = transcode_clips(str(videos_dir / "issue-134-rotate.mp4"), [clip], str(tmp_path), TranscodeConfig())
    info = probe_video(written["c"])
    assert (info["width"], info["height"], info["rotation"]) == (544, 1280, 90)


def test_concealed_decoder_errors_keep_damaged_frames_out(videos_dir, tmp_path):
    """1 byte in 10^4 flipped in a real H.264 file: FFmpeg conceals the errors and decodes on; no clip that
    touches a damaged span passes, and too much damage rejects the whole video decode_damaged."""
    import random

    data = bytearray((videos_dir / "bottle-detection.mp4").read_bytes())
    rng = random.Random(1)
    for _ in range(len(data) // 10_000):
        data[rng.randrange(100_000, len(data) - 200_000)] ^= 0xFF  # inside the media data; the index stays whole
    damaged_path = tmp_path / "flipped.mp4"
    damaged_path.write_bytes(bytes(data))
    cfg = SplitConfig().model_dump()
    intact = split_video(str(videos_dir / "bottle-detection.mp4"), "0123456789abcdef", cfg, None)
    assert intact["note"] is None and not any(c["reject_reason"] == "decode_damaged" for c in intact["clips"])

    with pytest.raises(VideoRejected) as caught:  # most of it is damaged (the file: 499 of 670 frames)
        split_video(str(damaged_path), "0123456789abcdef", cfg, None)
    assert caught.value.reason.value == "decode_damaged" and "frames are damaged" in caught.value.detail

    lenient = SplitConfig(max_damaged_frac=1.0).model_dump()  # keep the video: judge clip by clip
    out = split_video(str(damaged_path), "0123456789abcdef", lenient, None)
    assert out["note"] and "damaged frames" in out["note"]
    spans = [tuple(int(x) for x in s.split("-")) for s in out["note"].split(": ", 1)[1].rstrip(" .").split(", ")]
    damaged = [c for c in out["clips"] if c["reject_reason"] == "decode_damaged"]
    assert damaged and all(not c["passed"] for c in damaged)
    for clip in out["clips"]:
        if clip["passed"]:
            assert not any(s < clip["end_frame"] and clip["start_frame"] < e for s, e in spans)
