"""The Ray pipeline end to end: real and broken inputs, manifests, rejects and stable ids."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import load_config
from pipeline.errors import StageInputError
from pipeline.runner import run_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _table(out: Path, name: str):
    return pads.dataset(str(out / "manifest" / name), format="parquet", ignore_prefixes=[".", "_"]).to_table()


@pytest.fixture(scope="module")
def smoke_config():
    return load_config(PROJECT_ROOT / "configs" / "smoke.yaml", ["ray.progress=log", "filter.clip.model=null"])


@pytest.fixture(scope="module")
def bad_run(ray_session, bad_corpus, smoke_config, tmp_path_factory):
    root, expected = bad_corpus
    out = tmp_path_factory.mktemp("bad_run")
    # Bad files are caught by the stages that decode (ingest, split, filter); caption and encode only ever see the
    # good files' clips, which their own tests cover.
    results = run_pipeline(smoke_config, str(out), inputs=[str(root)], stages=["ingest", "split", "filter"])
    return out, root, expected, results


def test_every_bad_file_is_rejected_with_its_reason(bad_run):
    out, root, expected, _results = bad_run
    videos = {Path(r["uri"]).relative_to(root).as_posix(): r for r in _table(out, "videos").to_pylist()}
    assert set(videos) == set(expected)  # readme.txt is not a video extension
    for name, reason in expected.items():
        row = videos[name]
        if reason is None:
            assert row["status"] == "ok", row
        else:
            assert (row["status"], row["reject_reason"]) == ("rejected", reason), row
            assert row["reject_detail"]


def test_rejects_table_holds_every_rejected_video(bad_run):
    out, root, expected, _results = bad_run
    rejects = _table(out, "rejects").to_pylist()
    by_uri = {
        Path(r["uri"]).relative_to(root).as_posix(): r
        for r in rejects
        if r["stage"] in ("ingest", "split") and not r["item_id"].count("-")
    }
    for name, reason in expected.items():
        if reason is not None:
            assert by_uri[name]["reason"] == reason
    stages = {(r["stage"], r["reason"]) for r in rejects}
    assert ("split", "decode_error") in stages and ("ingest", "empty_file") in stages


def test_good_files_are_split_into_clips(bad_run):
    out, root, _expected, results = bad_run
    clips = _table(out, "clips").to_pylist()
    good_uris = {str(root / "good.mp4"), str(root / "nested" / "other.mp4")}
    assert {c["uri"] for c in clips} == good_uris
    other = sorted((c for c in clips if c["uri"].endswith("other.mp4")), key=lambda c: c["start_frame"])
    assert [(c["start_frame"], c["end_frame"]) for c in other] == [(0, 60), (60, 120)]
    assert all(c["clip_id"] == f"{c['video_id']}-{c['start_frame']:07d}-{c['end_frame']:07d}" for c in clips)
    summary = {r.stage: r for r in results}
    assert summary["split"].counts["rejected_videos"] == 1  # corrupt_middle.mp4
    assert summary["ingest"].rejects_by_reason["duplicate_file"] == 1
    # readme.txt is left out by the extension filter: counted and said, not silently dropped
    assert summary["ingest"].counts["skipped"] == 1
    assert summary["ingest"].info["skipped"] == {"extension .txt not in ingest.extensions": 1}


def test_rerun_gives_identical_ids(ray_session, sample_videos, smoke_config, tmp_path, monkeypatch, caplog):
    import json

    from pipeline import runner
    from pipeline.engine import StreamGroup

    root, truth = sample_videos
    first = tmp_path / "first"
    second = tmp_path / "second"
    ids_only = ["ingest", "split"]  # ids are fixed by these two stages; later ones have their own tests
    # The first run has a stream group over exactly these stages whose pools never fit: its stages run one after
    # the other (each with its own start) and the run ends (the group is not tried again and again).
    never_fits = StreamGroup(("ingest", "split"), runner.STREAMS[0].run, lambda config: "too big for this test")
    with monkeypatch.context() as patch:
        patch.setattr(runner, "STREAMS", (never_fits, *runner.STREAMS))
        run_pipeline(smoke_config, str(first), inputs=[str(root)], stages=ids_only)
    assert "ingest, split run one after the other, not streamed: too big for this test" in caplog.text
    stages = json.loads((first / "manifest" / "run.json").read_text())["stages"]
    assert stages["ingest"]["finished_at"] <= stages["split"]["started_at"]
    assert stages["ingest"]["status"] == stages["split"]["status"] == "done"
    run_pipeline(smoke_config, str(second), inputs=[str(root / "*.mp4")], stages=ids_only)
    for name, key in (("videos", "video_id"), ("clips", "clip_id")):
        a = sorted(_table(first, name).column(key).to_pylist())
        b = sorted(_table(second, name).column(key).to_pylist())
        assert a == b and len(a) == len(set(a)) > 0
    clips = _table(first, "clips").to_pylist()
    for name, cuts in truth.items():
        starts = sorted({c["scene_start_frame"] for c in clips if c["uri"].endswith(name)})
        assert starts[1:] == cuts
    # Re-running split alone with the same settings skips it; forced, it replaces its outputs (never appends).
    (skipped,) = run_pipeline(smoke_config, str(first), stages=["split"])
    assert skipped.skipped and skipped.counts["clips"] > 0
    run_pipeline(smoke_config, str(first), stages=["split"], force=True)
    assert sorted(_table(first, "clips").column("clip_id").to_pylist()) == sorted(c["clip_id"] for c in clips)
    assert not [p for p in (first / "manifest" / "clips").iterdir() if p.name.startswith(".")]


def test_real_videos_through_ray(ray_session, videos_dir, smoke_config, tmp_path):
    out = tmp_path / "real"
    inputs = [str(videos_dir / "testvideo.mp4"), str(videos_dir / "*.webm")]
    run_pipeline(smoke_config, str(out), inputs=inputs, stages=["ingest", "split"])  # what this test checks
    videos = {Path(r["uri"]).name: r for r in _table(out, "videos").to_pylist()}
    assert videos["testvideo.mp4"]["num_frames"] == 720 and videos["testvideo.mp4"]["codec"] == "h264"
    assert videos["no_duration.webm"]["num_frames"] == 74  # counted: the container states no duration
    assert videos["no_duration.webm"]["duration_s"] == pytest.approx(4.94, abs=0.05)
    clips = [c for c in _table(out, "clips").to_pylist() if c["uri"].endswith("testvideo.mp4")]
    assert sorted({c["scene_start_frame"] for c in clips}) == [0, 30, 180, 394]
    first_after_cut = next(c for c in clips if c["start_frame"] == 30)
    assert first_after_cut["start_s"] == pytest.approx(30 * 1001 / 30000, abs=1e-6)


def test_split_without_ingest_says_what_to_do(ray_session, smoke_config, tmp_path):
    with pytest.raises(StageInputError, match="recap ingest"):
        run_pipeline(smoke_config, str(tmp_path / "nothing"), stages=["split"])
    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(smoke_config, str(tmp_path / "nothing"), stages=["train"])


def test_transcode_into_another_filesystem_and_storage_errors_stop_the_run(ray_session, sample_videos, smoke_config):
    """OUT on a tmpfs (/dev/shm) while temporaries used to go to /tmp: clips are written beside their final
    names. A storage failure stops the run (StorageError, exit 3 in the CLI) and rejects no video; the same
    command resumes once the storage is fixed."""
    import shutil
    import tempfile

    from pipeline.errors import StorageError

    root, _truth = sample_videos
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    out = Path(tempfile.mkdtemp(prefix="recap-test-", dir=shm))
    try:
        config = smoke_config.model_copy(deep=True)
        config.split.transcode.enabled = True
        (out / "media").write_text("a file where the clips directory should go")  # writing clips must fail
        with pytest.raises(StorageError) as failure:
            run_pipeline(config, str(out), inputs=[str(root / "sample-quick-cuts.mp4")], stages=["ingest", "split"])
        assert failure.value.errno and "media" in str(failure.value)
        assert not _table(out, "videos").filter(pads.field("status") != "ok").num_rows  # no video rejected
        (out / "media").unlink()
        (split,) = [r for r in run_pipeline(config, str(out), stages=["split"]) if r.stage == "split"]
        assert not split.skipped and split.counts["rejected_videos"] == 0
        clips = [c for c in _table(out, "clips").to_pylist() if c["passed"]]
        assert clips and all(Path(c["clip_uri"]).is_file() for c in clips)
        assert all(Path(c["clip_uri"]).parent == out / "media" / "clips" for c in clips)
        assert not [p.name for p in (out / "media" / "clips").iterdir() if not p.name.endswith(".mp4")]
    finally:
        shutil.rmtree(out, ignore_errors=True)
