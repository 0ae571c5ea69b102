"""The filter stage end to end on real and derived clips: scores, reasons, near-duplicates, dry run."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.schema import WEIGHTS_FREE_SCORES

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _table(out: Path, name: str):
    return pads.dataset(str(out / "manifest" / name), format="parquet", ignore_prefixes=[".", "_"]).to_table()


@pytest.fixture(scope="module")
def smoke():
    return load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        ["ray.progress=off", "split.max_clip_s=null", "filter.clip.model=null"],
    )


@pytest.fixture(scope="module")
def filtered(ray_session, derived_clips, smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("filtered")
    results = run_pipeline(smoke, str(out), inputs=[str(derived_clips)])
    clips = {Path(c["uri"]).stem: c for c in _table(out, "clips").to_pylist()}
    return out, clips, results


def test_derived_copies_get_the_right_reasons(filtered):
    _out, clips, _results = filtered
    assert set(clips) == {"original", "frozen", "blurred", "dark", "reencoded", "other_scene"}
    original = clips["original"]
    assert clips["frozen"]["score_motion"] < 0.2 * original["score_motion"]
    assert clips["frozen"]["reject_reason"] == "low_motion"
    assert clips["blurred"]["score_sharpness"] < 0.2 * original["score_sharpness"]
    assert clips["blurred"]["reject_reason"] == "blurry"
    assert clips["dark"]["score_brightness"] < 0.15 * original["score_brightness"]
    assert clips["dark"]["reject_reason"] == "too_dark"
    assert "blurry" not in clips["dark"]["filter_reasons"] or clips["dark"]["filter_reasons"][0] == "too_dark"


def test_reencoded_copy_is_a_near_duplicate_but_another_scene_is_not(filtered):
    _out, clips, results = filtered
    # The sharper original is kept; its re-encode at another size and bitrate goes.
    assert clips["original"]["passed"] is True
    assert clips["reencoded"]["reject_reason"] == "near_duplicate"
    assert clips["reencoded"]["near_duplicate_of"] == clips["original"]["clip_id"]
    assert clips["other_scene"]["passed"] is True and clips["other_scene"]["near_duplicate_of"] is None
    assert {r.stage: r for r in results}["filter"].counts["near_duplicates"] == 1


def test_every_clip_has_every_score_and_rejects_match(filtered):
    out, clips, _results = filtered
    for clip in clips.values():
        for name in WEIGHTS_FREE_SCORES:
            value = clip[f"score_{name}"]
            assert value is not None and not math.isnan(value), (clip["clip_id"], name)
        assert clip["camera_motion"] and len(clip["phashes"]) == 6
    rejects = {r["item_id"]: r for r in _table(out, "rejects").to_pylist() if r["stage"] == "filter"}
    rejected = {c["clip_id"]: c for c in clips.values() if not c["passed"]}
    assert set(rejects) == set(rejected)
    assert all(rejects[k]["reason"] == c["reject_reason"] for k, c in rejected.items())
    assert "near duplicate of" in rejects[clips["reencoded"]["clip_id"]]["detail"]


def test_dry_run_counts_equal_the_real_decisions_and_write_nothing(filtered, smoke):
    out, clips, _results = filtered
    before = sorted(p.name for p in (out / "manifest" / "clips").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "manifest").rglob("*.parquet")}
    result = run_pipeline(smoke, str(out), stages=["filter"], dry_run=True)[0]
    expected: dict[str, int] = {}
    for clip in clips.values():
        for reason in clip["filter_reasons"]:
            expected[reason] = expected.get(reason, 0) + 1
    assert result.rejects_by_reason == expected
    assert sorted(p.name for p in (out / "manifest" / "clips").iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "manifest").rglob("*.parquet")} == mtimes
    # A looser threshold shows its effect without decoding anything again.
    loose = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        ["ray.progress=off", "filter.clip.model=null", "filter.thresholds.sharpness=null"],
    )
    assert "blurry" not in run_pipeline(loose, str(out), stages=["filter"], dry_run=True)[0].rejects_by_reason


def test_dedup_against_an_earlier_corpus(ray_session, filtered, derived_clips, smoke, tmp_path):
    earlier, _clips, _results = filtered
    cfg = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        ["ray.progress=off", "split.max_clip_s=null", "filter.clip.model=null", f"filter.dedup.against=['{earlier}']"],
    )
    out = tmp_path / "new_crawl"
    run_pipeline(cfg, str(out), inputs=[str(derived_clips / "original.mp4"), str(derived_clips / "frozen.mp4")])
    clips = {Path(c["uri"]).stem: c for c in _table(out, "clips").to_pylist()}
    assert clips["original"]["reject_reason"] == "near_duplicate"  # already in the earlier corpus
    assert clips["frozen"]["reject_reason"] == "low_motion"


def test_filter_cli_dry_run_prints_counts(filtered, capsys):
    from pipeline.cli import main

    out, _clips, _results = filtered
    assert (
        main(
            [
                "filter",
                "--config",
                str(PROJECT_ROOT / "configs" / "smoke.yaml"),
                "--output",
                str(out),
                "--dry-run",
                "--set",
                "ray.progress=off",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "would reject" in printed and "low_motion" in printed and "nothing written" in printed


def test_clip_model_scores_every_clip_on_ray(ray_session, filtered, tiny_clip, tmp_path):
    """A tiny open_clip checkpoint loaded from disk by a Ray actor: embedding and model scores per clip."""
    import shutil

    source, _clips, _results = filtered
    out = tmp_path / "with_clip"
    shutil.copytree(source, out)
    overrides = [
        "ray.progress=off",
        f"filter.clip.model={tiny_clip['model']}",
        f"filter.clip.pretrained={tiny_clip['checkpoint']}",
        f"filter.clip.model_config_path={tiny_clip['config']}",
        f"filter.clip.aesthetic_head={tiny_clip['head']}",
        "filter.clip.device=cpu",
    ]
    cfg = load_config(PROJECT_ROOT / "configs" / "smoke.yaml", overrides)
    run_pipeline(cfg, str(out), stages=["filter"], force=True)  # filtered before without CLIP: a new config
    clips = {Path(c["uri"]).stem: c for c in _table(out, "clips").to_pylist()}
    for clip in clips.values():
        assert len(clip["clip_embedding"]) == 32
        assert sum(x * x for x in clip["clip_embedding"]) == pytest.approx(1.0, abs=1e-3)
        assert math.isfinite(clip["score_aesthetic"])
        assert 0.0 <= clip["score_nsfw"] <= 1.0 and 0.0 <= clip["score_watermark"] <= 1.0
    assert len({round(c["score_aesthetic"], 6) for c in clips.values()}) > 1
    # An aesthetic threshold between the two kept clips rejects the lower one as low_aesthetic.
    kept = sorted((c for c in clips.values() if c["passed"]), key=lambda c: c["score_aesthetic"])
    assert len(kept) == 2
    cut = (kept[0]["score_aesthetic"] + kept[1]["score_aesthetic"]) / 2
    strict = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml", [*overrides, f"filter.thresholds.aesthetic.min={cut}"]
    )
    result = run_pipeline(strict, str(out), stages=["filter"], dry_run=True)[0]
    # The dry run counts every failed threshold, so clips rejected for other reasons count here too.
    below = [c for c in clips.values() if c["score_aesthetic"] < cut and c["reject_reason"] != "too_short"]
    assert result.rejects_by_reason.get("low_aesthetic") == len(below) >= 1
    assert result.counts["considered"] == len(clips)
    # Re-filtering decides afresh; with aesthetic scores the keep rule prefers the higher one.
    pair = sorted((clips["original"], clips["reencoded"]), key=lambda c: c["score_aesthetic"])
    assert pair[0]["filter_reasons"] == ["near_duplicate"] and pair[0]["near_duplicate_of"] == pair[1]["clip_id"]
    assert pair[1]["passed"] is True
