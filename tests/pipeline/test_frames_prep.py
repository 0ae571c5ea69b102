"""Frame preparation for encoding: buckets, crops and frame counts on the VAE's grid."""

from __future__ import annotations

import numpy as np

from pipeline.video.frames import (
    frame_grid_count,
    frame_positions,
    make_buckets,
    nearest_bucket,
    resize_center_crop,
    to_unit_range,
)


def test_buckets_are_multiples_near_the_target_area():
    buckets = make_buckets(256 * 448, multiple=16)
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w - 256 * 448) / (256 * 448) < 0.1
    assert nearest_bucket(720, 1280, buckets) == (256, 448)  # 16:9
    assert nearest_bucket(1280, 720, buckets) == (448, 256)  # 9:16
    assert nearest_bucket(240, 320, buckets) == (288, 384)  # 4:3


def test_center_crop_keeps_the_middle_without_stretching():
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, 100:200] = 255  # a white middle third
    out = resize_center_crop(frame, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out.mean() > 250  # only the middle survives a square crop of a 3:1 frame


def test_frame_counts_land_on_the_temporal_grid():
    assert frame_grid_count(40, 33, 4) == 33 and frame_grid_count(40, 32, 4) == 29
    assert frame_grid_count(20, 33, 8) == 17 and frame_grid_count(7, 10, 1) == 7
    positions, stride = frame_positions(100, 200, src_fps=30.0, target_fps=15.0, num_frames=17, temporal_factor=4)
    assert stride == 2 and positions[0] == 100 and positions[-1] == 132 and len(positions) == 17
    assert to_unit_range([np.full((2, 3, 3), 255, np.uint8)]).shape == (1, 3, 2, 3)
