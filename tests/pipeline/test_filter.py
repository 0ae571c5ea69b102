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
def filtered(ray_session, derived_clips, tmp_path_factory):
    """The derived clips through the pipeline, with the real OCR and NSFW detectors on their own actor pools."""
    out = tmp_path_factory.mktemp("filtered")
    config = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        [
            "ray.progress=off",
            "split.max_clip_s=null",
            "filter.clip.model=null",
            "filter.text.enabled=true",
            "filter.nsfw.enabled=true",
        ],
    )
    # Only the stages these tests read: caption and encode would add two actor pools and change nothing here.
    results = run_pipeline(config, str(out), inputs=[str(derived_clips)], stages=["ingest", "split", "filter"])
    clips = {Path(c["uri"]).stem: c for c in _table(out, "clips").to_pylist()}
    return out, clips, results


def test_derived_copies_get_the_right_reasons(filtered):
    _out, clips, _results = filtered
    assert set(clips) == {"original", "frozen", "blurred", "dark", "reencoded", "other_scene", "disguised"}
    original = clips["original"]
    assert clips["frozen"]["score_motion"] < 0.2 * original["score_motion"]
    assert clips["frozen"]["reject_reason"] == "low_motion"
    assert clips["blurred"]["score_sharpness"] < 0.2 * original["score_sharpness"]
    assert clips["blurred"]["reject_reason"] == "blurry"
    assert clips["dark"]["score_brightness"] < 0.15 * original["score_brightness"]
    assert clips["dark"]["reject_reason"] == "too_dark"
    assert "blurry" not in clips["dark"]["filter_reasons"] or clips["dark"]["filter_reasons"][0] == "too_dark"
    for clip in clips.values():  # the detector pools ran on every clip through Ray
        assert 0.0 <= clip["score_text"] < 0.15 and 0.0 <= clip["score_nsfw"] < 0.5, clip["clip_id"]


def test_reencoded_copy_is_a_near_duplicate_but_another_scene_is_not(filtered):
    _out, clips, results = filtered
    # The sharper original is kept; its re-encode at another size and bitrate goes.
    assert clips["original"]["passed"] is True
    assert clips["reencoded"]["reject_reason"] == "near_duplicate"
    assert clips["reencoded"]["near_duplicate_of"] == clips["original"]["clip_id"]
    assert clips["other_scene"]["passed"] is True and clips["other_scene"]["near_duplicate_of"] is None
    # The disguised re-upload (mirrored, cropped 8%, colour-graded, re-encoded) is found through mirrored hashes.
    assert clips["disguised"]["reject_reason"] == "near_duplicate"
    assert clips["disguised"]["near_duplicate_of"] == clips["original"]["clip_id"]
    assert {r.stage: r for r in results}["filter"].counts["near_duplicates"] == 2


def test_every_clip_has_every_score_and_rejects_match(filtered):
    out, clips, _results = filtered
    for clip in clips.values():
        for name in (*WEIGHTS_FREE_SCORES, "text", "nsfw"):  # `filtered` runs the OCR and NSFW detectors
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
    inputs = [str(derived_clips / "original.mp4"), str(derived_clips / "frozen.mp4")]
    run_pipeline(cfg, str(out), inputs=inputs, stages=["ingest", "split", "filter"])
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
    group = sorted((clips[n] for n in ("original", "reencoded", "disguised")), key=lambda c: c["score_aesthetic"])
    for copy in group[:-1]:
        assert copy["filter_reasons"] == ["near_duplicate"] and copy["near_duplicate_of"] == group[-1]["clip_id"]
    assert group[-1]["passed"] is True


def _shots(text_clips: Path) -> list[str]:
    shots = sorted(p.name.removesuffix("-clean.mp4") for p in text_clips.glob("*-clean.mp4"))
    assert len(shots) == 4
    return shots


def _scored_with_frames(path: Path, cfg) -> dict:
    """One clip over the whole file, scored in-process as the filter's CPU actors do (frames as JPEGs)."""
    from pipeline.stages.filter import score_video_clips

    clip = {"clip_id": path.stem, "start_frame": 0, "end_frame": 24}
    scores = score_video_clips(str(path), [clip], cfg.filter.model_dump(mode="json"), 24.0, want_frames=True)[0]
    return {**clip, **scores}


def test_ocr_text_score_separates_drawn_text_from_clean_shots(text_clips):
    """The PP-OCRv6 detector on real shots: subtitled and titled clips all score above every clean one; titles
    (3 lines of 54 px) fail the default `text` threshold, clean shots and two subtitle lines do not."""
    import pyarrow as pa

    from pipeline.config import RecapConfig
    from pipeline.schema import FILTERED_CLIPS_SCHEMA
    from pipeline.stages.filter import SCORED_SCHEMA, TextDetectStage, decide

    cfg = RecapConfig.model_validate(
        {"filter": {"frames_per_clip": 4, "clip": {"model": None}, "text": {"frames": 2, "recognize": True}}}
    )
    shots = _shots(text_clips)
    rows = [
        _scored_with_frames(text_clips / f"{shot}-{kind}.mp4", cfg)
        for shot in shots
        for kind in ("clean", "subtitles", "title")
    ]
    batch = pa.Table.from_pylist(rows, schema=pa.schema([f for f in SCORED_SCHEMA if f.name in rows[0]]))
    scored = {r["clip_id"]: r for r in TextDetectStage(cfg)(batch).to_pylist()}
    assert TextDetectStage.output_schema.names[: len(FILTERED_CLIPS_SCHEMA)] == FILTERED_CLIPS_SCHEMA.names

    def score(kind: str) -> list[float]:
        return [scored[f"{shot}-{kind}"]["score_text"] for shot in shots]

    clean, subtitles, titles = score("clean"), score("subtitles"), score("title")
    assert min(subtitles + titles) > max(clean), (clean, subtitles, titles)
    assert min(titles) > max(subtitles)
    thresholds = cfg.filter.thresholds
    for shot in shots:
        assert "text_heavy" in decide(scored[f"{shot}-title"], thresholds)
        assert "text_heavy" not in decide(scored[f"{shot}-clean"], thresholds)
        assert "text_heavy" not in decide(scored[f"{shot}-subtitles"], thresholds)
        # The recognised on-screen text (for captions that must not repeat it).
        assert "SUMMER" in scored[f"{shot}-title"]["text_ocr"].upper()
        assert not scored[f"{shot}-clean"]["text_ocr"]


def test_nudenet_scores_real_shots_low(text_clips):
    """NudeNet 320n, loaded from the wheel, on the sampled frames of real shots: nothing near the threshold."""
    import pyarrow as pa

    from pipeline.config import RecapConfig
    from pipeline.stages.filter import SCORED_SCHEMA, NsfwDetectStage, decide

    cfg = RecapConfig.model_validate({"filter": {"clip": {"model": None}, "text": {"enabled": False}}})
    rows = [_scored_with_frames(text_clips / f"{shot}-clean.mp4", cfg) for shot in _shots(text_clips)]
    assert all(len(r["frames_jpeg"]) == 8 for r in rows)
    batch = pa.Table.from_pylist(rows, schema=pa.schema([f for f in SCORED_SCHEMA if f.name in rows[0]]))
    for row in NsfwDetectStage(cfg)(batch).to_pylist():
        assert 0.0 <= row["score_nsfw"] < 0.3, row["clip_id"]
        assert "nsfw" not in decide(row, cfg.filter.thresholds)
