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


def test_qwen_families_sample_at_their_native_rate():
    from captioner.frames import family_sampling, sample_times

    assert family_sampling("Qwen/Qwen2.5-VL-3B-Instruct", None, None) == (None, 2.0, 2)
    assert family_sampling("recap-tiny:qwen3_vl", None, None) == (None, 2.0, 2)
    assert family_sampling("Qwen/Qwen2.5-VL-3B-Instruct", 16, None) == (16, None, 2)  # what the user set wins
    assert family_sampling("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", None, None) == (8, None, 1)
    # A 2 s clip at Qwen's 2 fps: 4 frames (not 16 at 8 fps, where pairs of frames share temporal positions);
    # a 0.4 s clip still gets the 2 frames one temporal group needs.
    assert len(sample_times(0.0, 2.0, None, 2.0, 16, 2)) == 4
    assert len(sample_times(0.0, 0.4, None, 2.0, 16, 2)) == 2


def test_video_metadata_carries_the_real_frame_times():
    import numpy as np

    from captioner.backends.base import CaptionRequest, video_metadata

    frames = [np.zeros((8, 8, 3), np.uint8)] * 4
    even = video_metadata(CaptionRequest("c", frames, 2.0, "u", timestamps=[0.25, 0.75, 1.25, 1.75]))
    assert even["frames_indices"] == [0, 1, 2, 3] and even["fps"] == 2.0 and even["duration"] == 2.0
    # Variable frame rate: the third frame came late; Qwen3-VL's timestamps (index / fps) follow it.
    vfr = video_metadata(CaptionRequest("c", frames, 2.0, "u", timestamps=[0.25, 0.75, 2.25, 2.75]))
    assert [i / vfr["fps"] for i in vfr["frames_indices"]] == [0.0, 0.5, 2.0, 2.5]
    assert vfr["total_num_frames"] == 6
