"""Pure scorers on synthetic frames with known answers, and the filter worker's memory."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from pipeline.scoring.dedup import band_keys, clip_distance, hamming, phash64, resolve_duplicates
from pipeline.scoring.image_quality import score_quality
from pipeline.scoring.motion import camera_motion_class, farneback, score_frozen, score_motion
from pipeline.scoring.nsfw import nsfw_score
from pipeline.scoring.ocr import box_area_share
from pipeline.stages.filter import decide, sample_positions


def _texture(h: int = 360, w: int = 640, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    noise = cv2.resize(rng.rand(h // 8, w // 8).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(noise * 255, 0, 255).astype(np.uint8)


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    return np.roll(np.roll(image, dy, axis=0), dx, axis=1)


def _zoom(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0, factor)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize(
    ("make_next", "expected"),
    [
        (lambda im: _shift(im, -6, 0), "pan_right"),  # picture moves left: the camera pans right
        (lambda im: _shift(im, 6, 0), "pan_left"),
        (lambda im: _shift(im, 0, -6), "tilt_down"),
        (lambda im: _shift(im, 0, 6), "tilt_up"),
        (lambda im: _zoom(im, 1.06), "zoom_in"),
        (lambda im: _zoom(im, 0.94), "zoom_out"),
        (lambda im: im.copy(), "static"),
    ],
)
def test_camera_motion_classes(make_next, expected):
    a = _texture()
    flow = farneback(cv2.resize(a, (160, 90)), cv2.resize(make_next(a), (160, 90)))
    assert camera_motion_class([flow]) == expected


def test_motion_score_grows_with_speed_and_frozen_is_zero():
    a = _texture()
    slow = score_motion([(a, _shift(a, 4, 0), 1)], fps=25)["score_motion"]
    fast = score_motion([(a, _shift(a, 16, 0), 1)], fps=25)["score_motion"]
    still = score_motion([(a, a.copy(), 1)], fps=25)["score_motion"]
    assert still < 0.05 < slow < fast
    # 16 px of 640 per frame at 25 fps is 62.5 % of the width per second.
    assert fast == pytest.approx(62.5, rel=0.25)
    assert score_frozen([a, a.copy(), a.copy()]) == 1.0 and score_frozen([a, _texture(seed=1)]) == 0.0


def test_quality_scores_follow_blur_and_exposure():
    sharp = _texture()
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3)
    assert score_quality([blurred])["score_sharpness"] < 0.3 * score_quality([sharp])["score_sharpness"]
    dark = score_quality([(sharp * 0.05).astype(np.uint8)])
    assert dark["score_brightness"] < 13 and dark["score_black"] == 1.0
    assert score_quality([np.full((90, 160), 255, np.uint8)])["score_clipped"] == 1.0


def test_text_box_area_counts_overlaps_once():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], np.float32)
    assert box_area_share([], (20, 20)) == 0.0
    assert box_area_share([square], (20, 40)) == pytest.approx(121 / 800)  # pixels 0..10 inclusive
    assert box_area_share([square, square + 5], (20, 40)) == pytest.approx((121 * 2 - 36) / 800)


def _detection(cls: str, score: float) -> dict:
    return {"class": cls, "score": score, "box": [0, 0, 10, 10]}


def test_nsfw_score_is_the_most_confident_exposed_detection_and_thresholds_reject_it():
    from pipeline.config import FilterConfig

    thresholds = FilterConfig().thresholds
    covered = [[_detection("FACE_FEMALE", 0.95), _detection("FEMALE_BREAST_COVERED", 0.9)], []]
    assert nsfw_score(covered) == 0.0  # faces and covered parts never count, however confident
    exposed = [
        [_detection("BELLY_EXPOSED", 0.9)],
        [_detection("BUTTOCKS_EXPOSED", 0.3)],
        [_detection("FEMALE_GENITALIA_EXPOSED", 0.72), _detection("FEET_EXPOSED", 0.99)],
    ]
    assert nsfw_score(exposed) == pytest.approx(0.72)  # the max over frames, of exposed classes only
    assert np.isnan(nsfw_score([]))  # nothing looked at: unavailable, not safe
    assert decide({"score_nsfw": nsfw_score(exposed)}, thresholds) == ["nsfw"]
    assert decide({"score_nsfw": nsfw_score([exposed[1]])}, thresholds) == []  # 0.3: below the default 0.5
    assert decide({"score_nsfw": nsfw_score(covered)}, thresholds) == []
    assert decide({"score_nsfw": nsfw_score([])}, thresholds) == ["score_unavailable"]


def test_hashes_and_duplicate_groups():
    image = _texture(seed=3)
    h1 = phash64(image)
    h2 = phash64(cv2.resize(cv2.resize(image, (320, 180)), (640, 360)))
    h3 = phash64(_texture(seed=4))
    assert hamming(h1, h2) <= 4 < 20 < hamming(h1, h3)
    assert band_keys([h1]) & band_keys([h2])
    assert clip_distance([h1, h1], [h1]) == 0 and clip_distance([], [h1]) == 64
    info = {
        "a": {"score_aesthetic": 5.0},
        "b": {"score_aesthetic": 6.0},
        "c": {"score_aesthetic": 1.0},
        "previous:z": {"previous": True},
    }
    assert resolve_duplicates([("a", "b", 1), ("b", "c", 2)], info) == {"a": "b", "c": "b"}
    assert resolve_duplicates([("a", "previous:z", 0)], info) == {"a": "previous:z"}


def test_decide_order_and_nan():
    limits = {"motion": {"min": 1.0, "max": None}, "brightness": {"min": 25.0, "max": 235.0}}
    assert decide({"score_motion": 0.1, "score_brightness": 5.0}, limits) == ["too_dark", "low_motion"]
    assert decide({"score_motion": float("nan"), "score_brightness": 240.0}, limits) == [
        "too_bright",
        "score_unavailable",
    ]
    assert sample_positions(10, 20, 4) == [11, 13, 16, 18] and sample_positions(0, 2, 8) == [0, 1]


def test_scoring_hundreds_of_clips_does_not_grow_the_worker(sample_videos):
    """300 clips through one isolated child: resident memory stays flat after warm-up."""
    from pipeline.config import FilterConfig
    from pipeline.video.isolation import IsolatedWorker

    root, _truth = sample_videos
    uri = str(root / "sample-long-take.mp4")  # 300 frames
    clips = [{"clip_id": f"c{i}", "start_frame": i * 30, "end_frame": i * 30 + 30} for i in range(10)]
    cfg = FilterConfig(frames_per_clip=4).model_dump(mode="json")

    def rss_kib(pid: int) -> int:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))

    with IsolatedWorker(max_jobs_per_child=1000) as worker:
        for _ in range(5):
            assert worker.run("pipeline.stages.filter:score_video_clips", uri, clips, cfg, 24.0).ok
        pid = worker.run("os:getpid").result
        before = rss_kib(pid)
        for _ in range(30):
            outcome = worker.run("pipeline.stages.filter:score_video_clips", uri, clips, cfg, 24.0)
            assert outcome.ok and len(outcome.result) == 10
        assert worker.run("os:getpid").result == pid
        growth_mib = (rss_kib(pid) - before) / 1024
    print(f"worker RSS growth over 300 clips: {growth_mib:.2f} MiB")
    assert growth_mib < 15, f"worker grew {growth_mib:.1f} MiB over 300 clips"


def test_tiny_clip_is_built_once_and_cached(tmp_path):
    from pipeline.scoring.tiny_clip import ensure_tiny_clip

    first = ensure_tiny_clip(tmp_path)
    stamp = {k: os.stat(v).st_mtime_ns for k, v in first.items() if k != "model"}
    second = ensure_tiny_clip(tmp_path)
    assert first == second
    assert stamp == {k: os.stat(v).st_mtime_ns for k, v in second.items() if k != "model"}


def test_a_mirrored_clip_is_a_duplicate_only_through_mirrored_hashes():
    from pipeline.scoring.dedup import duplicate_edges

    frames = [_texture(seed=s) for s in (5, 6, 7)]
    source = {"clip_id": "a", "phashes": [phash64(f) for f in frames]}
    mirrored = [cv2.flip(f, 1) for f in frames]
    copy = {"clip_id": "b", "phashes": [phash64(f) for f in mirrored]}
    assert duplicate_edges([source, copy], 10.0) == []  # plain pHash does not see a mirror
    copy["phashes_mirrored"] = [phash64(cv2.flip(f, 1)) for f in mirrored]
    assert [e[:2] for e in duplicate_edges([source, copy], 10.0)] == [("a", "b")]
    other = {"clip_id": "c", "phashes": [phash64(_texture(seed=s)) for s in (8, 9, 10)]}
    other["phashes_mirrored"] = [phash64(cv2.flip(_texture(seed=s), 1)) for s in (8, 9, 10)]
    assert duplicate_edges([source, other], 10.0) == []


def test_a_box_around_the_whole_frame_is_not_a_text_line():
    from pipeline.scoring.ocr import text_line_boxes

    line = np.array([[20, 300], [600, 300], [600, 330], [20, 330]], np.float32)
    frame_box = np.array([[0, 0], [639, 0], [639, 359], [0, 359]], np.float32)
    kept = text_line_boxes(np.stack([line, frame_box]), (360, 640))
    assert kept.shape == (1, 4, 2) and np.array_equal(kept[0], line)
