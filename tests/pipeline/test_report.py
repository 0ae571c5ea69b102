"""recap report: the projection arithmetic, histograms, paginated gallery data, and the page in headless Chromium
for a corpus built from the sample videos (full, and stopped after filter)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest
from pipeline.report import PlanRequest, build_report
from pipeline.report.histogram import histogram, render_svg
from pipeline.report.plan import measure_costs, project

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("RECAP_CHROMIUM", "/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------------- pure parts


def _run_json(stages: dict, caption_gpus: float = 1.0) -> dict:
    pool = lambda cpus, conc, gpus=0.0: {"num_cpus": cpus, "concurrency": conc, "num_gpus": gpus}  # noqa: E731
    config = {
        "ray": {"num_cpus": None},
        "ingest": {"resources": pool(1, 2)},
        "split": {"resources": pool(1, 2)},
        "filter": {"resources": pool(1, 2), "clip": {"model": None, "resources": pool(1, 1, 1)}},
        "caption": {"preprocess_resources": pool(1, 2), "resources": pool(1, 1, caption_gpus)},
        "encode": {"prep_resources": pool(1, 1), "resources": pool(1, 1, 1)},
    }
    return {"config": config, "stages": stages}


def test_projection_scales_measured_costs_and_names_the_bound():
    run = _run_json(
        {
            "ingest": {"status": "done", "seconds": 60.0},
            "split": {"status": "done", "seconds": 90.0},
            "filter": {"status": "done", "seconds": 300.0},  # CLIP off: its GPU pool is not counted
            "caption": {"status": "done", "seconds": 600.0},
            "encode": {"status": "running", "seconds": 5.0},  # interrupted: not a measurement
        }
    )
    costs = measure_costs(run, video_hours=0.5)
    assert [c.stage for c in costs] == ["ingest", "split", "filter", "caption"]
    caption = costs[-1]
    assert (caption.cpus, caption.gpus) == (3.0, 1.0)
    assert caption.gpu_s_per_video_hour == pytest.approx(1200.0)
    plan = project(
        costs, 0.5, video_hours=100, gpus=4, cpus=16, samples_by_bucket={"a": (3, 100.0), "b": (1, 200.0)},
        units_per_video_hour=8.0,
    )  # fmt: skip
    by_stage = {s.stage: s for s in plan.stages}
    assert by_stage["ingest"].wall_s == pytest.approx(2 * 60 / 0.5 * 100 / 16)  # 2 CPUs held, spread over 16
    assert by_stage["filter"].cpu_hours == pytest.approx(2 * 300 / 0.5 * 100 / 3600)
    # caption: 3 CPUs x 600 s -> 22,500 s over 16 CPUs, but 1 GPU x 600 s -> 30,000 s over 4 GPUs: GPU-bound
    assert by_stage["caption"].wall_s == pytest.approx(30_000.0) and by_stage["caption"].bound_by == "gpu"
    assert plan.bounding_stage == "caption"
    assert plan.wall_s == pytest.approx(sum(s.wall_s for s in plan.stages))
    assert plan.missing_stages == ["encode"]
    assert plan.expected_samples == pytest.approx(800.0)
    assert [(b["bucket"], b["samples"], b["bytes"]) for b in plan.storage] == [
        ("a", 600.0, 60_000.0),
        ("b", 200.0, 40_000.0),
    ]
    assert project(costs, 0.5, video_hours=100, gpus=0, cpus=16).infeasible  # caption held a GPU
    with pytest.raises(ValueError, match="--cpus"):
        project(costs, 0.5, video_hours=100, gpus=1, cpus=0)


def test_histogram_counts_and_threshold_lines():
    values = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, np.nan])
    passed = values >= 3
    hist = histogram(values, passed, bins=10, include=(12.0,))
    assert hist.edges[0] == 0.0 and hist.edges[-1] == 12.0  # widened to show the threshold
    assert hist.passed.sum() == 7 and hist.rejected.sum() == 3 and hist.missing == 1
    svg = render_svg(hist, "score_motion", {"min": 3.0, "max": 12.0, "other": 99.0})
    lines = {label: float(x) for x, label in re.findall(r'<line x1="([\d.]+)"[^>]*data-threshold="(\w+)"', svg)}
    assert set(lines) == {"min", "max"}  # 99 is outside the axis: not drawn
    assert lines["max"] > lines["min"] and "1 without a value" in svg


def _synthetic_corpus(out: Path, n: int) -> dict:
    """A manifest without videos on disk: n clips over 10 videos, scores, reasons, captions."""
    rng = np.random.default_rng(0)
    video_ids = [f"{i:016x}" for i in range(10)]
    videos = pa.table(
        {
            "video_id": video_ids,
            "uri": [f"/nowhere/v{i}.mp4" for i in range(10)],
            "status": ["ok"] * 9 + ["rejected"],
            "reject_reason": [None] * 9 + ["decode_error"],
            "duration_s": [600.0] * 10,
        }
    )
    motion = rng.uniform(0, 5, n).round(3)
    sharp = rng.uniform(0, 200, n).round(3)
    reasons = np.where(motion < 0.5, "low_motion", np.where(sharp < 20, "blurry", None))
    starts = np.arange(n) * 2.0
    clips = pa.table(
        {
            "clip_id": [f"{video_ids[i % 9]}-{i:07d}-{i + 48:07d}" for i in range(n)],
            "video_id": [video_ids[i % 9] for i in range(n)],
            "uri": [f"/nowhere/v{i % 9}.mp4" for i in range(n)],
            "start_s": starts,
            "end_s": starts + 2,
            "duration_s": np.full(n, 2.0),
            "passed": [r is None for r in reasons],
            "reject_reason": list(reasons),
            "score_motion": motion,
            "score_sharpness": sharp,
            "caption": [f"clip {i} of a synthetic corpus" for i in range(n)],
            "caption_flags": [["repetition"] if i % 50 == 0 else [] for i in range(n)],
        }
    )
    for name, table in (("videos", videos), ("clips", clips)):
        (out / "manifest" / name / "x").mkdir(parents=True)
        pq.write_table(table, out / "manifest" / name / "x" / "part-00000.parquet")
    config = {"filter": {"thresholds": {"motion": {"min": 0.5, "max": None}, "sharpness": {"min": 20, "max": None}}}}
    (out / "manifest" / "run.json").write_text(json.dumps({"config": config, "stages": {}}))
    return {"clips": clips}


def test_gallery_data_is_paginated_and_first_paint_bounded(tmp_path):
    from pipeline.vae.load import fallback_note

    synthetic = _synthetic_corpus(tmp_path, 250)
    note = fallback_note(str(tmp_path / "no-such-vae"), "recap-tiny:taesd")
    assert "RANDOM" in note and fallback_note("recap-tiny:taesd", "recap-tiny:taesd") is None
    run = json.loads((tmp_path / "manifest" / "run.json").read_text())
    run["stages"]["encode"] = {"status": "done", "vae_fallback_note": note}
    (tmp_path / "manifest" / "run.json").write_text(json.dumps(run))
    result = build_report(str(tmp_path), thumbnails=False, page_size=100)
    assert 'id="vae-fallback"' in (tmp_path / "report" / "index.html").read_text()  # said on the page too
    data = tmp_path / "report" / "data"
    assert result.chunks == 3 and sorted(p.name for p in data.glob("clips-*.js")) == [
        "clips-0000.js",
        "clips-0001.js",
        "clips-0002.js",
    ]
    rows = []
    for k in range(3):
        text = (data / f"clips-{k:04d}.js").read_text()
        name, payload = re.fullmatch(r'recapData\("([\w-]+)",(.*)\);\n', text, re.S).groups()
        assert name == f"clips-{k:04d}" and len(json.loads(payload)) == (100 if k < 2 else 50)
        rows += json.loads(payload)
    assert [r["id"] for r in rows] == sorted(synthetic["clips"].column("clip_id").to_pylist())
    assert [r["i"] for r in rows] == list(range(250))
    status = json.loads(re.search(r",(\[.*\])\);", (data / "col-status.js").read_text()).group(1))
    assert [s == 0 for s in status] == [r["p"] for r in rows]
    index = (tmp_path / "report" / "index.html").read_text()
    assert result.first_paint_bytes == len(index.encode()) + (data / "clips-0000.js").stat().st_size
    # the page embeds only bounded samples (per filter, flagged captions), never the gallery's later pages
    meta = json.loads(re.search(r'id="report-meta">(.*?)</script>', index, re.S).group(1))
    embedded = {r["id"] for f in meta["filters"] for r in f["sample"]} | {r["id"] for r in meta["flagged"]}
    assert all(len(f["sample"]) <= 6 for f in meta["filters"]) and len(embedded) < 30
    assert not [r["id"] for r in rows if r["id"] not in embedded and r["id"] in index]
    funnel = dict(re.findall(r'<td class="n count" data-key="(\w+)">([\d,]+)</td>', index))
    assert {k: int(v.replace(",", "")) for k, v in funnel.items()} == manifest.corpus_stats(str(tmp_path))["funnel"]


# ---------------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (no browser download); missing in CI is a failure, not a skip."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if os.environ.get("RECAP_REQUIRE_SHARED") == "1":
            pytest.fail(f"RECAP_REQUIRE_SHARED=1 and {problem}")
        pytest.skip(problem)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A page opened in `browser` that records console errors, page errors and failed requests."""

    def __init__(self, browser, url: str):
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on(
            "console", lambda m: m.type in ("error", "warning") and self.problems.append(f"{m.type}: {m.text}")
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        self.page.goto(url)
        self.page.wait_for_selector("#gallery[data-ready='1']", state="attached", timeout=15_000)

    def funnel(self) -> dict[str, int]:
        cells = self.page.locator("#funnel td.count")
        return {
            cells.nth(i).get_attribute("data-key"): int(cells.nth(i).inner_text().replace(",", ""))
            for i in range(cells.count())
        }

    def gallery_ids(self) -> list[str]:
        return self.page.locator("#gallery .card").evaluate_all("cards => cards.map(c => c.dataset.clip)")


def test_gallery_sorts_and_filters_across_pages_in_chromium(browser, tmp_path):
    synthetic = _synthetic_corpus(tmp_path, 250)
    build_report(str(tmp_path), thumbnails=False, page_size=100)
    page = Page(browser, (tmp_path / "report" / "index.html").as_uri())
    clips = synthetic["clips"].sort_by("clip_id")  # the gallery's natural order
    assert len(page.gallery_ids()) == 100 and "page 1 of 3" in page.page.inner_text("#gallery-info")
    page.page.select_option("#sort", "motion:desc")
    page.page.wait_for_function("document.querySelector('#gallery-info').textContent.includes('250 clips')")
    order = np.argsort(-clips.column("score_motion").to_numpy(), kind="stable")
    ids = clips.column("clip_id").to_numpy(zero_copy_only=False)
    page.page.wait_for_function(f"document.querySelector('#gallery .card').dataset.clip === '{ids[order[0]]}'")
    assert page.gallery_ids() == list(ids[order[:100]])  # the top 100 come from all three chunks
    page.page.select_option("#filter", "reason:low_motion")
    want = sorted(c for c, r in zip(ids, clips.column("reject_reason").to_pylist(), strict=True) if r == "low_motion")
    page.page.wait_for_function(f"document.querySelector('#gallery-info').textContent.includes(' {len(want)} clips')")
    shown = page.gallery_ids()
    assert 0 < len(want) < 100 and sorted(shown) == want
    motion = dict(zip(ids, clips.column("score_motion").to_pylist(), strict=True))
    assert [motion[c] for c in shown] == sorted((motion[c] for c in want), reverse=True)[: len(shown)]
    assert page.problems == []
    page.page.close()


@pytest.fixture(scope="module")
def corpora(sample_corpora, tmp_path_factory) -> tuple[Path, Path]:
    """(full, partial): copies of the session's sample corpora (stopped after filter for `partial`)."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(sample_corpora["full"], root / "corpus")
    shutil.copytree(sample_corpora["partial"], root / "partial")
    return root / "corpus", root / "partial"


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    artifacts = os.environ.get("RECAP_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(shot, os.path.join(artifacts, name))
    return shot


def test_report_of_sample_corpus_in_chromium(corpora, browser, tmp_path):
    from pipeline.cli import main

    full, _ = corpora
    assert main(["report", str(full), "--plan", "10", "--gpus", "2", "--cpus", "8"]) == 0
    clips = manifest.read_table(str(full), "clips", columns=["clip_id", "passed"])
    stats = manifest.corpus_stats(str(full))
    assert {"captioned", "samples"} <= set(stats["funnel"]) and stats["funnel"]["clips"] < 100

    page = Page(browser, (full / "report" / "index.html").as_uri())
    assert page.funnel() == stats["funnel"]
    assert sorted(page.gallery_ids()) == sorted(clips.column("clip_id").to_pylist())  # one card per clip
    # every card has its thumbnail strip, and it decoded
    widths = page.page.locator("#gallery .card img").evaluate_all(
        "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))"
    )
    assert len(widths) == clips.num_rows and min(widths) >= 4 * 96
    statuses = page.page.locator("#stages-ran span").evaluate_all("s => s.map(e => e.dataset.status)")
    assert statuses == ["done"] * 5
    assert page.page.locator("svg.hist[data-name='score_motion'] line[data-threshold='min']").count() == 1
    assert "score_aesthetic" in page.page.inner_text("#empty-scores")  # CLIP off: no empty histogram for it
    rejected = clips.num_rows - stats["funnel"]["passed"]
    assert rejected >= 1 and page.page.locator("#filters .card").count() == min(rejected, 6 * len(stats["rejects"]))

    plan = json.loads((full / "report" / "plan.json").read_text())
    assert (
        plan["bounding_stage"] in {"ingest", "split", "filter", "caption", "encode"} and plan["missing_stages"] == []
    )
    assert plan["expected_samples"] == pytest.approx(stats["funnel"]["samples"] / stats["hours"]["videos"] * 10)
    assert plan["storage_bytes"] > 0 and page.page.inner_text("#plan-bound") == plan["bounding_stage"]
    _save_screenshot(page.page, tmp_path, "report-sample-corpus.png")
    assert page.problems == []
    page.page.close()

    # the same files from a static HTTP server (loopback): nothing fails to load either
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(full / "report"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        served = Page(browser, f"http://127.0.0.1:{server.server_address[1]}/index.html")
        assert served.funnel() == stats["funnel"] and len(served.gallery_ids()) == clips.num_rows
        assert served.problems == []
        served.page.close()
    finally:
        server.shutdown()


def test_report_of_partial_corpus_says_which_stages_ran(corpora, browser, tmp_path):
    _, partial = corpora
    result = build_report(str(partial), plan=PlanRequest(5, 1, 4))
    assert result.plan.missing_stages == ["caption", "encode"] and not result.plan.storage
    stats = manifest.corpus_stats(str(partial))
    assert "captioned" not in stats["funnel"] and "samples" not in stats["funnel"]
    assert result.plan.expected_samples == pytest.approx(stats["funnel"]["passed"] / stats["hours"]["videos"] * 5)

    page = Page(browser, Path(result.path).as_uri())
    assert page.funnel() == stats["funnel"]
    assert len(page.gallery_ids()) == stats["funnel"]["clips"]
    statuses = page.page.locator("#stages-ran span").evaluate_all(
        "s => s.map(e => [e.dataset.stage, e.dataset.status])"
    )
    assert statuses == [
        ["ingest", "done"],
        ["split", "done"],
        ["filter", "done"],
        ["caption", "not run"],
        ["encode", "not run"],
    ]
    assert "stages run so far: ingest, split, filter" in page.page.inner_text("#partial")
    assert "encode has not run" in page.page.inner_text("#distributions")
    _save_screenshot(page.page, tmp_path, "report-partial-corpus.png")
    assert page.problems == []
    page.page.close()
