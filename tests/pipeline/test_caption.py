"""The caption stage end to end on real clips with tiny random video VLMs loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import load_config
from pipeline.runner import run_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _table(out: Path, name: str):
    return pads.dataset(str(out / "manifest" / name), format="parquet", ignore_prefixes=[".", "_"]).to_table()


# The filter runs with its (tiny) CLIP model and no thresholds: every clip split keeps, and each gets the
# clip embedding the caption stage scores its caption against (score_caption_match).
MATCHED = [
    "filter.dedup.enabled=false",
    *(f"filter.thresholds.{name}=null" for name in ("motion", "frozen", "sharpness", "brightness", "black")),
]


def _config(*overrides: str):
    return load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml", ["ray.progress=off", "split.max_clip_s=null", *MATCHED, *overrides]
    )


@pytest.fixture(scope="module")
def captioned(ray_session, videos_dir, tmp_path_factory):
    # Tiny models are cached where Ray's workers look ($RECAP_CACHE as the session started, else ~/.cache/recap).
    out = tmp_path_factory.mktemp("captioned")
    inputs = [str(videos_dir / "testvideo.mp4"), str(videos_dir / "issue-134-rotate.mp4")]
    run_pipeline(_config(), str(out), inputs=inputs, stages=["ingest", "split", "filter", "caption"])
    return out


def test_real_clips_get_captions_with_model_and_prompt_version(captioned):
    from captioner.prompts import load_prompt

    clips = _table(captioned, "clips").to_pylist()
    passed = [c for c in clips if c["passed"]]
    assert len(passed) >= 4
    version = load_prompt("dense-v1").version_id
    for clip in passed:
        assert clip["caption"] and len(clip["caption"].split()) >= 8
        assert clip["caption_model"] == "recap-tiny:qwen2_5_vl"
        assert clip["caption_prompt_version"] == version
    # Clips rejected upstream (too_short) are not captioned.
    assert all(c["caption"] is None for c in clips if c["reject_reason"] == "too_short")
    captions = _table(captioned, "captions").to_pylist()
    assert sorted(c["clip_id"] for c in captions) == sorted(c["clip_id"] for c in passed)


def test_switching_the_captioner_keeps_earlier_versions_and_upstream_tables(captioned):
    videos_before = {p: p.stat().st_mtime_ns for p in (captioned / "manifest" / "videos").iterdir()}
    first = _table(captioned, "clips").to_pylist()
    run_pipeline(_config("caption.model=recap-tiny:qwen3_vl"), str(captioned), stages=["caption"], force=True)
    clips = _table(captioned, "clips").to_pylist()
    assert {p: p.stat().st_mtime_ns for p in (captioned / "manifest" / "videos").iterdir()} == videos_before
    assert [(c["clip_id"], c["start_frame"], c["passed"]) for c in sorted(clips, key=lambda c: c["clip_id"])] == [
        (c["clip_id"], c["start_frame"], c["passed"]) for c in sorted(first, key=lambda c: c["clip_id"])
    ]
    assert {c["caption_model"] for c in clips if c["passed"]} == {"recap-tiny:qwen3_vl"}
    versions = {}
    for row in _table(captioned, "captions").to_pylist():
        versions.setdefault(row["caption_model"], set()).add(row["clip_id"])
    assert set(versions) == {"recap-tiny:qwen2_5_vl", "recap-tiny:qwen3_vl"}  # the first version stays selectable
    assert versions["recap-tiny:qwen2_5_vl"] == versions["recap-tiny:qwen3_vl"]


def test_caption_qc_and_caption_match_reject_and_a_rerun_reconsiders(captioned, tmp_path):
    """Captions failing QC are retried, then rejected; with the filter's (tiny) CLIP on, each caption has a
    text-video cosine, and a threshold above every one rejects them all; a re-run with other rules undoes the
    stage's own earlier rejections and applies the new ones (one copy, two caption runs for both checks)."""
    import shutil

    import numpy as np

    from pipeline.stages.filter import clip_scorer_from_config

    out = tmp_path / "strict"
    shutil.copytree(captioned, out)
    captioned_clips = [c for c in _table(out, "clips").to_pylist() if c["caption"]]
    assert captioned_clips
    expected = clip_scorer_from_config(_config()).caption_match(
        [c["caption"] for c in captioned_clips],
        [np.asarray(c["clip_embedding"], np.float32) for c in captioned_clips],
    )
    assert [c["score_caption_match"] for c in captioned_clips] == pytest.approx(expected.tolist(), abs=1e-4)
    # The same captioner as the copy's captions (an earlier test may have switched it): the same captions again.
    model = f"caption.model={captioned_clips[0]['caption_model']}"

    run_pipeline(_config(model, "caption.qc.min_words=200"), str(out), stages=["caption"], force=True)
    clips = [c for c in _table(out, "clips").to_pylist() if c["caption"] is not None]
    assert clips and all(c["reject_reason"] == "caption_too_short" and c["passed"] is False for c in clips)
    assert all("too_short" in c["caption_flags"] for c in clips)
    rejects = [r for r in _table(out, "rejects").to_pylist() if r["stage"] == "caption"]
    assert len(rejects) == len(clips) and all("after 2 attempt(s)" in r["detail"] for r in rejects)

    strict_match = f"caption.min_caption_match={float(max(expected)) + 1e-3}"
    run_pipeline(_config(model, strict_match), str(out), stages=["caption"], force=True)
    again = [c for c in _table(out, "clips").to_pylist() if c["caption"] is not None]
    assert len(again) == len(clips)
    assert all(c["reject_reason"] == "caption_mismatch" and c["passed"] is False for c in again)
    rejects = [r for r in _table(out, "rejects").to_pylist() if r["stage"] == "caption"]
    assert sorted(r["reason"] for r in rejects) == ["caption_mismatch"] * len(again)  # too_short ones were undone


def test_caption_without_a_model_says_what_to_set(ray_session, captioned):
    from pipeline.errors import StageInputError

    with pytest.raises(StageInputError, match="caption.model"):
        run_pipeline(_config("caption.model=null"), str(captioned), stages=["caption"])
