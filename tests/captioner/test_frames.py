"""Sampling a clip's frames by presentation time, checked on the frame-numbered counter video."""

from __future__ import annotations

import pytest

from captioner.frames import read_clip_frames, sample_times


def test_sample_times_even_and_by_fps():
    assert sample_times(1.0, 2.0, 4, None, 32) == pytest.approx([1.125, 1.375, 1.625, 1.875])
    assert len(sample_times(0.0, 10.0, None, 2.0, 32)) == 20
    assert len(sample_times(0.0, 100.0, None, 2.0, 32)) == 32  # capped


def test_frames_come_from_inside_the_clip(videos_dir):
    # counter.mp4: 10 fps, colour changes after frame 10 and 20; the clip [1.0, 2.0) is frames 10-19.
    frames, times = read_clip_frames(str(videos_dir / "counter.mp4"), 1.0, 2.0, num_frames=4, max_side=96)
    assert times == pytest.approx([1.1, 1.3, 1.6, 1.8])
    assert all(1.0 <= t < 2.0 for t in times)
    assert frames[0].shape == (54, 96, 3) and frames[0].dtype.name == "uint8"
    colours = {tuple(int(v) // 32 for v in f[5, 5]) for f in frames}
    assert len(colours) == 1  # all from the one shot, none from its neighbours


def test_seek_into_the_middle_of_a_long_video(videos_dir):
    frames, times = read_clip_frames(str(videos_dir / "testvideo.mp4"), 13.146, 18.5, num_frames=3, max_side=64)
    assert len(frames) == 3 and all(13.146 <= t < 18.5 for t in times)
