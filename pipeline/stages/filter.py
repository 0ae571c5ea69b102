"""Filter stage: score every clip from frames sampled once, then decide pass/reject with reasons.

`score_video_clips` decodes a video once (in the isolated child) and scores all its clips with
the weights-free scorers; `TextDetectStage` (PP-OCRv6), `NsfwDetectStage` (NudeNet) and
`ClipModelStage` (CLIP) add model scores, each on its own actor pool, from the sampled frames the
CPU actors hand over as JPEGs; `decide` applies the configured thresholds. `run_filter` scores on Ray (committing
whole videos), resolves near-duplicates across the whole corpus (LSH bands, a Ray Data groupby, the keep rule of
`pipeline.scoring.dedup`), decides, and writes `clips` with scores and the filter rejects.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.config import FilterConfig, RecapConfig
from pipeline.engine import (
    Source,
    Stage,
    StagedRows,
    StageResult,
    StageRun,
    map_stage,
    rebuild_table,
    stage_checkpoint,
    stage_progress,
)
from pipeline.errors import StageInputError
from pipeline.progress import StageProgress
from pipeline.resume import StageCheckpoint
from pipeline.schema import (
    CLIPS_SCHEMA,
    FILTERED_CLIPS_SCHEMA,
    REJECTS_SCHEMA,
    SCORE_REJECT_REASONS,
    RejectReason,
    table_of,
)
from pipeline.scoring.dedup import band_keys, duplicate_edges, phash64, resolve_duplicates
from pipeline.scoring.image_quality import score_quality
from pipeline.scoring.motion import score_cut_inside, score_frozen, score_motion
from pipeline.stages.common import IsolatedStage
from pipeline.video.decode import display_turns, open_video, upright
from pipeline.video.isolation import heartbeat

CLIP_FRAME_SIDE = 224  # short side of the frames handed to the CLIP scorer

SCORED_SCHEMA = pa.schema(list(FILTERED_CLIPS_SCHEMA) + [pa.field("frames_jpeg", pa.list_(pa.binary()))])


def sample_positions(start: int, end: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over [start, end), centred in equal segments."""
    length = end - start
    if length <= 0:
        return []
    n = min(count, length)
    return sorted({start + int((k + 0.5) * length / n) for k in range(n)})


class _ClipFrames:
    """Sampled frames of one clip as they arrive from the sequential decode."""

    def __init__(self, clip: dict[str, Any], count: int, gap: int):
        start, end = clip["start_frame"], clip["end_frame"]
        self.clip = clip
        self.gap = gap
        self.positions = sample_positions(start, end, count)
        # A frame `gap` after each sample (or before, near the clip's end) for optical flow. A gap of
        # about 0.1 s, not 1 frame: pulldown and animation "on twos" repeat frames, which would read
        # as no motion.
        self.partners: dict[int, int] = {}
        for p in self.positions:
            q = p + gap if p + gap < end else p - gap
            if q < start:
                q = end - 1 if p != end - 1 else start
            if q != p:
                self.partners[q] = p
        self.last_needed = max([*self.positions, *self.partners], default=start)
        self.grey: dict[int, np.ndarray] = {}
        self.bgr: dict[int, np.ndarray] = {}
        self.rgb: dict[int, np.ndarray] = {}


def model_frame_sides(cfg: FilterConfig) -> tuple[int, int]:
    """(short side, long side) the frames handed to the model stages need at least: CLIP's input, and the
    text detector's resolution (PP-OCR finds 20 px subtitles at 640 px, not at 320)."""
    short = CLIP_FRAME_SIDE if cfg.clip.model is not None else 0
    long = cfg.text.max_side if cfg.text.enabled else 0
    if cfg.nsfw.enabled:
        long = max(long, 320)  # NudeNet 320n's input
    return short, long


def wants_model_frames(cfg: FilterConfig) -> bool:
    return cfg.clip.model is not None or cfg.text.enabled or cfg.nsfw.enabled


def _convert(
    frame: Any, width: int, want_rgb: bool, sides: tuple[int, int] = (CLIP_FRAME_SIDE, 0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    turns = display_turns(frame)  # scores, motion directions and CLIP see the frame as players show it
    stored_width = width if turns % 2 == 0 else max(2, round(frame.width * width / frame.height / 2) * 2)
    height = max(2, round(frame.height * stored_width / frame.width / 2) * 2)
    bgr = upright(frame.to_ndarray(width=stored_width, height=height, format="bgr24", interpolation="AREA"), turns)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    rgb = None
    if want_rgb:
        # Short side at least CLIP's (small sources are enlarged, as CLIP would), long side at least the
        # detectors' resolution unless the source is smaller.
        short_side, long_side = sides
        scale = max(short_side / min(frame.width, frame.height), min(1.0, long_side / max(frame.width, frame.height)))
        w, h = max(2, round(frame.width * scale)), max(2, round(frame.height * scale))
        rgb = upright(frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA"), turns)
    return bgr, grey, rgb


def score_frames(state: _ClipFrames, fps: float, cfg: FilterConfig, want_frames: bool) -> dict[str, Any]:
    """Every weights-free score of one clip from its sampled frames."""
    samples = [p for p in state.positions if p in state.grey]
    greys = [state.grey[p] for p in samples]
    pairs = []
    for q, p in state.partners.items():
        if p in state.grey and q in state.grey:
            pairs.append((state.grey[min(p, q)], state.grey[max(p, q)], abs(q - p)))
    scores: dict[str, Any] = {}
    scores.update(score_motion(pairs, fps, cfg.flow_width))
    scores["score_frozen"] = score_frozen(greys)
    scores.update(score_quality(greys))
    scores["score_cut_inside"] = score_cut_inside([state.bgr[p] for p in samples])
    scores["phashes"] = [phash64(g) for g in greys]
    # A mirrored re-upload matches these (near-duplicate detection compares both ways).
    scores["phashes_mirrored"] = [phash64(cv2.flip(g, 1)) for g in greys]
    if want_frames:
        scores["frames_jpeg"] = [
            cv2.imencode(".jpg", cv2.cvtColor(state.rgb[p], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[
                1
            ].tobytes()
            for p in samples
            if p in state.rgb
        ]
    if len(samples) < len(state.positions):
        scores["filter_detail"] = f"decoded {len(samples)} of {len(state.positions)} sampled frames"
    return scores


def iter_clip_frames(
    uri: str, clips: list[dict[str, Any]], cfg: FilterConfig, fps: float, want_frames: bool = False
) -> Iterator[tuple[int, _ClipFrames]]:
    """Decode `uri` once, yielding (clip index, its sampled frames) as soon as each clip is complete.

    Memory holds only the frames of clips still being read. If the decoder fails part-way, the
    remaining clips are yielded with the frames that did decode.
    """
    gap = max(1, round(fps * cfg.motion_gap_s))
    states: list[_ClipFrames | None] = [_ClipFrames(c, cfg.frames_per_clip, gap) for c in clips]
    needed: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        for index in {*state.positions, *state.partners}:
            needed.setdefault(index, []).append(i)
    last = max(needed, default=-1)
    sides = model_frame_sides(cfg)
    by_last = sorted(range(len(states)), key=lambda i: states[i].last_needed)
    done = 0
    try:
        with open_video(uri) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            for index, frame in enumerate(container.decode(stream)):
                owners = needed.get(index)
                if owners:
                    want_rgb = want_frames and any(index in states[i].positions for i in owners)
                    bgr, grey, rgb = _convert(frame, cfg.analysis_width, want_rgb, sides)
                    for i in owners:
                        states[i].grey[index] = grey
                        if index in states[i].positions:
                            states[i].bgr[index] = bgr
                            if rgb is not None:
                                states[i].rgb[index] = rgb
                while done < len(by_last) and states[by_last[done]].last_needed <= index:
                    i = by_last[done]
                    yield i, states[i]
                    states[i] = None  # its frames are freed once scored
                    done += 1
                if index % 32 == 0:
                    heartbeat()
                if index >= last:
                    break
    except av.error.FFmpegError:
        pass
    for i, state in enumerate(states):
        if state is not None:
            yield i, state


def score_video_clips(
    uri: str, clips: list[dict[str, Any]], cfg_dict: dict[str, Any], fps: float, want_frames: bool = False
) -> list[dict[str, Any]]:
    """Decode `uri` once and score each clip; runs in the isolated child. One dict per clip, in order."""
    cfg = FilterConfig.model_validate(cfg_dict)
    results: list[dict[str, Any]] = [{} for _ in clips]
    for i, state in iter_clip_frames(uri, clips, cfg, fps, want_frames):
        results[i] = score_frames(state, fps, cfg, want_frames)
    return results


THRESHOLD_REASONS = frozenset(r.value for pair in SCORE_REJECT_REASONS.values() for r in pair)
DECISION_REASONS = THRESHOLD_REASONS | {RejectReason.NEAR_DUPLICATE.value, RejectReason.SCORE_UNAVAILABLE.value}


def upstream_reason(row: dict[str, Any]) -> str | None:
    """The reject reason an earlier stage gave (e.g. too_short), not one this stage decided."""
    reason = row.get("reject_reason")
    return reason if reason and reason not in (row.get("filter_reasons") or []) else None


def scoring_failures(row: dict[str, Any]) -> list[str]:
    """Reasons from scoring itself (the clip's frames did not decode), as opposed to decisions."""
    return [r for r in (row.get("filter_reasons") or []) if r not in DECISION_REASONS]


def decide(row: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
    """Reason codes of every threshold the clip's scores fail. A NaN score fails as score_unavailable (a check
    that could not be made is not a pass); a missing one (that scorer is off) is not judged."""
    reasons = []
    unavailable = False
    for name in SCORE_REJECT_REASONS:  # fixed order: the first failure is the primary reason
        limit = thresholds.get(name)
        if limit is None:
            continue
        value = row.get(f"score_{name}")
        low, high = SCORE_REJECT_REASONS[name]
        lo = limit.min if hasattr(limit, "min") else limit.get("min")
        hi = limit.max if hasattr(limit, "max") else limit.get("max")
        if value is None or (lo is None and hi is None):
            continue
        if isinstance(value, float) and math.isnan(value):
            unavailable = True
            continue
        if lo is not None and value < lo:
            reasons.append(low.value)
        elif hi is not None and value > hi:
            reasons.append(high.value)
    if unavailable:
        reasons.append(RejectReason.SCORE_UNAVAILABLE.value)
    return reasons


class FilterScoreStage(IsolatedStage):
    """Batch transform: one row per video (with its clips as JSON) -> one scored row per clip."""

    name = "filter"
    input_columns = ("video_id", "uri", "fps", "clips_json")
    output_schema = SCORED_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        super().__init__(config)
        self._cfg = self.config.filter.model_dump(mode="json")
        self._want_frames = wants_model_frames(self.config.filter)

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        from pipeline.stages.common import rows_of

        out: list[dict[str, Any]] = []
        for row in rows_of(batch):
            out.extend(self.process_video(row))
        return table_of(out, self.output_schema)

    def process_video(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        clips = json.loads(row["clips_json"])
        outcome = self.run_isolated(
            "pipeline.stages.filter:score_video_clips",
            row["uri"],
            clips,
            self._cfg,
            row["fps"] or 25.0,
            self._want_frames,
        )
        rejected = self.reject_of(outcome)
        if rejected is not None:
            return [
                {**c, "filter_detail": f"{rejected[0]}: {rejected[1]}", "filter_reasons": [rejected[0]]} for c in clips
            ]
        return [{**c, **scores} for c, scores in zip(clips, outcome.result, strict=True)]


def clip_scorer_from_config(cfg: RecapConfig) -> Any:
    """The configured CLIP scorer; `recap-tiny:clip` is a tiny random model built once and cached (smoke runs)."""
    from pipeline.scoring.clip import ClipScorer
    from pipeline.scoring.tiny_clip import TINY_PREFIX, ensure_tiny_clip

    c = cfg.filter.clip
    model, pretrained, model_config, head = c.model, c.pretrained, c.model_config_path, c.aesthetic_head
    if model and model.startswith(TINY_PREFIX):
        tiny = ensure_tiny_clip()
        model, pretrained, model_config = tiny["model"], tiny["checkpoint"], tiny["config"]
        head = head or tiny["head"]
    return ClipScorer(
        model=model,
        pretrained=pretrained,
        device=c.device,
        aesthetic_head=head,
        batch_size=c.batch_size,
        safety_prompts=c.safety,
        model_config=model_config,
        head_activation=c.aesthetic_head_activation,
    )


def frames_of(row: dict[str, Any], count: int | None = None, rgb: bool = True) -> list[np.ndarray]:
    """The sampled frames a scoring actor handed over as JPEGs (at most `count`, evenly chosen)."""
    data = row.get("frames_jpeg") or []
    if count is not None and len(data) > count:
        data = [data[int((k + 0.5) * len(data) / count)] for k in range(count)]
    frames = []
    for jpeg in data:
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if rgb else bgr)
    return frames


class _DetectorStage:
    """Frames in, scores out: a detector (loaded once per actor) scores each clip's decoded frames; a clip whose
    frames did not decode keeps its scoring failure."""

    input_columns = ("clip_id", "frames_jpeg")
    output_schema = SCORED_SCHEMA
    frames: int | None = None  # frames of each clip the detector looks at (evenly chosen); None: all sampled

    def __init__(self, config: RecapConfig | dict[str, Any]):
        self.config = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)

    @staticmethod
    def threads(section: Any) -> int:
        """onnxruntime intra-op threads: the section's own, else the pool's CPUs per actor."""
        return section.threads or max(1, round(section.resources.num_cpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips = [frames_of(row, self.frames, rgb=False) for row in rows]
        for row, scores in zip(rows, self.detector.score_clips(clips), strict=True):
            if row.get("frames_jpeg"):
                row.update(scores)
        return table_of(rows, self.output_schema)


class TextDetectStage(_DetectorStage):
    """Adds `score_text` (and `text_ocr`) from the PP-OCRv6 text detector."""

    name = "filter-text"

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.scoring.ocr import TextDetector

        super().__init__(config)
        t = self.config.filter.text
        self.frames = t.frames
        self.detector = TextDetector(
            max_side=t.max_side,
            box_thresh=t.box_thresh,
            device=t.device,
            threads=self.threads(t),
            batch_size=t.batch_size,
            recognize=t.recognize,
        )


class NsfwDetectStage(_DetectorStage):
    """Adds `score_nsfw` from NudeNet's exposed-content classes."""

    name = "filter-nsfw"

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.scoring.nsfw import NsfwDetector

        super().__init__(config)
        n = self.config.filter.nsfw
        self.detector = NsfwDetector(device=n.device, threads=self.threads(n), batch_size=n.batch_size)


class ClipModelStage:
    """Adds CLIP embeddings and model scores (aesthetic, watermark, and nsfw unless NudeNet gives it); the
    model loads once per actor."""

    name = "filter-clip"
    input_columns = ("clip_id", "frames_jpeg")
    output_schema = FILTERED_CLIPS_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.scorer = clip_scorer_from_config(cfg)
        self.keys = ("score_aesthetic", "score_watermark") + (() if cfg.filter.nsfw.enabled else ("score_nsfw",))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips_frames = [frames_of(row) for row in rows]
        for row in rows:
            row.pop("frames_jpeg", None)
        for row, scores in zip(rows, self.scorer.score_clips(clips_frames), strict=True):
            embedding = scores.get("clip_embedding")
            row["clip_embedding"] = None if embedding is None else np.asarray(embedding, np.float32).tolist()
            for key in self.keys:
                if scores.get(key) is not None:
                    row[key] = float(scores[key])
        return table_of(rows, self.output_schema)


# ---------------------------------------------------------------------------------------------
# the stage on Ray: score, dedupe across the corpus, decide, write

SCRATCH_SCORED = "_filter_scored"  # scores before decisions; ignored by readers (leading "_")
PREVIOUS_PREFIX = "previous:"  # marks a clip of an earlier corpus in near_duplicate_of


class ClipsToScore:
    """`score_clips`'s input, made by Ray workers from the `clips` table as they read it: a batch of clip rows ->
    one row per video with its clips still to score as JSON (the filter decodes a video once for all of them; a
    video whose clips two batches hold is decoded once for each). `done`: clips an interrupted run scored."""

    def __init__(self, refilter: bool, done: list[str]):
        self.refilter = refilter  # filtered before: undo that run's decisions, keep earlier stages' (too_short)
        self.done = pa.array(done, pa.string())

    def __call__(self, clips: pa.Table) -> pa.Table:
        if len(self.done):
            clips = clips.filter(pc.invert(pc.is_in(clips.column("clip_id"), self.done)))
        by_video: dict[str, dict[str, Any]] = {}
        for row in clips.to_pylist():
            if self.refilter:
                row["reject_reason"] = upstream_reason(row)
                row["passed"] = row["reject_reason"] is None
                del row["filter_reasons"]
            entry = by_video.setdefault(
                row["video_id"], {"video_id": row["video_id"], "uri": row["uri"], "fps": row["fps"], "clips": []}
            )
            entry["clips"].append(row)
        rows = sorted(by_video.values(), key=lambda e: -sum(c["end_frame"] - c["start_frame"] for c in e["clips"]))
        return pa.table(
            {
                "video_id": pa.array([e["video_id"] for e in rows], pa.string()),
                "uri": pa.array([e["uri"] for e in rows], pa.string()),
                "fps": pa.array([e["fps"] for e in rows], pa.float64()),
                "clips_json": pa.array([json.dumps(e["clips"]) for e in rows], pa.string()),
            }
        )


def model_stages(f: FilterConfig) -> list[tuple[type, Any]]:
    """The model scorers the config turns on (text, NSFW, CLIP), in the order they run, with their resources."""
    return [
        (stage_cls, resources)
        for stage_cls, enabled, resources in (
            (TextDetectStage, f.text.enabled, f.text.resources),
            (NsfwDetectStage, f.nsfw.enabled, f.nsfw.resources),
            (ClipModelStage, bool(f.clip.model), f.clip.resources),
        )
        if enabled
    ]


def score_clips(
    config: RecapConfig, output: str, checkpoint: StageCheckpoint, progress: StageProgress | None = None
) -> dict[str, int]:
    """Score every clip the checkpoint does not have on Ray; the last scoring stage's actors write the scored clips
    as staged parts of `checkpoint`, which the driver commits as they come. Returns counts."""

    done = checkpoint.done("clip_id")
    refilter = "filter_reasons" in manifest.table_columns(output, "clips")
    columns = list(CLIPS_SCHEMA.names) + (["filter_reasons"] if refilter else [])
    # Workers read the clips table (its clip columns only) and group the clips by video on the way.
    clips = Source.table(output, "clips", columns=columns, prepare=ClipsToScore(refilter, sorted(done)))
    total_clips = max(clips.num_rows() - len(done), 0)
    progress = stage_progress(config, "filter", total_clips, "clips", progress=progress)
    if total_clips:
        cfg = config.to_dict()
        f = config.filter
        models = model_stages(f)
        post = (StagedRows, (checkpoint.uri, FILTERED_CLIPS_SCHEMA, ("clip_id",)))
        ds = map_stage(
            clips.blocks(max(1, total_clips // 10_000)),  # about a thousand blocks of videos
            FilterScoreStage,
            f.resources,
            (cfg,),
            columns=("video_id", "uri", "fps", "clips_json"),  # what ClipsToScore makes
            post=None if models else post,
        )
        for i, (stage_cls, resources) in enumerate(models):
            last = i == len(models) - 1
            ds = map_stage(
                ds, stage_cls, resources, (cfg,), columns=tuple(SCORED_SCHEMA.names), post=post if last else None
            )
        for record in ds.iter_rows():
            if record["part"] is not None:
                checkpoint.adopt(record["part"])
            progress.update(record["rows"])
    progress.close()
    return {"clips": total_clips, "resumed_clips": len(done)}


def _band_rows(batch: pa.Table, thresholds: dict[str, Any], previous: bool, mirror: bool = True) -> pa.Table:
    """Clips that pass every other check, one row per LSH band key of their frame hashes (and, with `mirror`,
    of their mirrored frames' hashes, so that a mirrored copy shares a band with its source)."""
    out: dict[str, list] = {
        k: []
        for k in ("band", "clip_id", "phashes", "phashes_mirrored", "previous", "aesthetic", "duration", "sharpness")
    }
    for row in batch.to_pylist():
        if not row.get("phashes"):
            continue
        if not previous and (upstream_reason(row) or scoring_failures(row) or decide(row, thresholds)):
            continue
        if previous and row.get("passed") is False:
            continue
        mirrored = (row.get("phashes_mirrored") or None) if mirror else None
        for key in band_keys(row["phashes"]) | band_keys(mirrored or []):
            out["band"].append(key)
            # Clips of earlier corpora get their own node ids: the same file crawled again has the same clip_id.
            out["clip_id"].append(PREVIOUS_PREFIX + row["clip_id"] if previous else row["clip_id"])
            out["phashes"].append(row["phashes"])
            out["phashes_mirrored"].append(mirrored)
            out["previous"].append(previous)
            out["aesthetic"].append(row.get("score_aesthetic"))
            out["duration"].append(row.get("duration_s"))
            out["sharpness"].append(row.get("score_sharpness"))
    return pa.table(
        out,
        schema=pa.schema(
            [
                ("band", pa.string()),
                ("clip_id", pa.string()),
                ("phashes", pa.list_(pa.int64())),
                ("phashes_mirrored", pa.list_(pa.int64())),
                ("previous", pa.bool_()),
                ("aesthetic", pa.float64()),
                ("duration", pa.float64()),
                ("sharpness", pa.float64()),
            ]
        ),
    )


_EDGE_SCHEMA = pa.schema(
    [("a", pa.string()), ("b", pa.string()), ("distance", pa.float64()), ("info_json", pa.string())]
)


def _group_edges(group: pa.Table, max_hamming: float) -> pa.Table:
    rows = {r["clip_id"]: r for r in group.to_pylist()}.values()  # a clip may repeat within a band
    members = list(rows)
    if len(members) < 2:
        return _EDGE_SCHEMA.empty_table()
    # Identical hash lists are duplicates outright: chain them, then compare one of each.
    by_hashes: dict[tuple, list[dict]] = {}
    for m in members:
        by_hashes.setdefault(tuple(m["phashes"]), []).append(m)
    edges = []
    for same in by_hashes.values():
        edges += [
            (x["clip_id"], y["clip_id"], 0.0)
            for x, y in zip(same[:-1], same[1:], strict=True)
            if not (x["previous"] and y["previous"])
        ]
    edges += duplicate_edges([same[0] for same in by_hashes.values()], max_hamming)
    info = {
        m["clip_id"]: {
            "previous": m["previous"],
            "score_aesthetic": m["aesthetic"],
            "duration_s": m["duration"],
            "score_sharpness": m["sharpness"],
        }
        for m in members
    }
    return pa.table(
        {
            "a": [e[0] for e in edges],
            "b": [e[1] for e in edges],
            "distance": [e[2] for e in edges],
            "info_json": [json.dumps({e[0]: info[e[0]], e[1]: info[e[1]]}) for e in edges],
        },
        schema=_EDGE_SCHEMA,
    )


def find_near_duplicates(config: RecapConfig, scored_paths: list[str], previous_paths: list[str]) -> dict[str, str]:
    """{dropped clip_id: kept clip_id} across the corpus (and earlier corpora) via Ray Data groupby."""
    import ray.data

    cfg = config.filter
    thresholds = {k: v.model_dump() for k, v in cfg.thresholds.items()}
    parts = []
    for paths, previous in ((scored_paths, False), (previous_paths, True)):
        if paths:
            ds = ray.data.read_parquet(paths)
            parts.append(
                ds.map_batches(
                    _band_rows,
                    batch_format="pyarrow",
                    fn_kwargs={"thresholds": thresholds, "previous": previous, "mirror": cfg.dedup.mirror},
                )
            )
    if not parts:
        return {}
    bands = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    edges_ds = bands.groupby("band").map_groups(
        _group_edges, batch_format="pyarrow", fn_kwargs={"max_hamming": cfg.dedup.max_hamming}
    )
    edges, info = [], {}
    for batch in edges_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            edges.append((row["a"], row["b"], row["distance"]))
            info.update(json.loads(row["info_json"]))
    return resolve_duplicates(edges, info)


def _filter_decisions(row: dict[str, Any], thresholds: dict[str, Any], dropped: dict[str, str]) -> dict[str, Any]:
    upstream = upstream_reason(row)
    reasons = scoring_failures(row)
    reasons += [r for r in decide(row, thresholds) if r not in reasons]
    if row["clip_id"] in dropped:
        reasons.append(RejectReason.NEAR_DUPLICATE.value)
        row["near_duplicate_of"] = dropped[row["clip_id"]]
    row["filter_reasons"] = reasons
    if upstream:  # rejected by an earlier stage (too_short): that reason stays first
        row["passed"] = False
        row["reject_reason"] = upstream
    else:
        row["passed"] = not reasons
        row["reject_reason"] = reasons[0] if reasons else None
    return row


class FilterDecisions:
    """A table rebuild's transform (`engine.rebuild_table`): scored clips -> the clips table's rows with the
    filter's decisions (thresholds, near-duplicates), and a reject row for each clip the filter rejected."""

    def __init__(self, thresholds: dict[str, Any], dropped: dict[str, str]):
        self.thresholds, self.dropped = thresholds, dropped

    def __call__(self, scored: pa.Table) -> tuple[pa.Table, pa.Table]:
        rows = [_filter_decisions(r, self.thresholds, self.dropped) for r in scored.to_pylist()]
        rejects = []
        for r in rows:
            if r["filter_reasons"] and r["reject_reason"] in r["filter_reasons"]:
                detail = r.get("filter_detail") or ", ".join(r["filter_reasons"])
                if r.get("near_duplicate_of") and r["reject_reason"] == "near_duplicate":
                    detail = f"near duplicate of {r['near_duplicate_of']}"
                rejects.append(
                    {
                        "stage": "filter",
                        "item_id": r["clip_id"],
                        "uri": r["uri"],
                        "reason": r["reject_reason"],
                        "detail": detail,
                    }
                )
        return (
            pa.Table.from_pylist(rows, schema=FILTERED_CLIPS_SCHEMA),
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
        )


def _previous_corpora(config: RecapConfig) -> list[str]:
    paths = []
    for corpus in config.filter.dedup.against:
        if not manifest.table_exists(corpus, "clips"):
            raise StageInputError(f"filter.dedup.against: {corpus!r} has no clips table")
        if "phashes" not in manifest.table_columns(corpus, "clips"):
            raise StageInputError(f"filter.dedup.against: {corpus!r} was not filtered (no phashes column)")
        paths.extend(manifest.table_files(corpus, "clips"))
    return paths


def filter_counts(scored: list[dict[str, Any]], config: RecapConfig, dropped: dict[str, str]) -> dict[str, int]:
    """Clips each threshold would reject (a clip failing two thresholds counts under both)."""
    thresholds = {k: v.model_dump() for k, v in config.filter.thresholds.items()}
    counts: dict[str, int] = {}
    for row in scored:
        if upstream_reason(row):
            continue
        for reason in scoring_failures(row) + decide(row, thresholds):
            counts[reason] = counts.get(reason, 0) + 1
        if row["clip_id"] in dropped:
            counts["near_duplicate"] = counts.get("near_duplicate", 0) + 1
    return counts


def run_filter(
    config: RecapConfig,
    output: str,
    dry_run: bool = False,
    checkpoint: StageCheckpoint | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    """Score clips, dedupe across the corpus, decide; write `clips` with scores and filter rejects. `progress`: a
    streaming run's line for this stage (what it committed is in `checkpoint`: only the rest is scored here)."""
    start = time.monotonic()
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run `recap split` first")
    previous = _previous_corpora(config)
    thresholds = {k: v.model_dump() for k, v in config.filter.thresholds.items()}
    scratch_out = tempfile.mkdtemp(prefix="recap-filter-dry-") if dry_run else output
    if dry_run:
        checkpoint = StageCheckpoint(scratch_out, "filter", "dry-run")
    else:
        checkpoint = stage_checkpoint(output, "filter", checkpoint)
    resumed = 0
    try:
        if dry_run and "phashes" in manifest.table_columns(output, "clips"):
            # Already scored: re-decide from the stored scores in seconds, nothing decoded.
            scored_paths = manifest.table_files(output, "clips")
        else:
            resumed = score_clips(config, output, checkpoint, progress)["resumed_clips"]
            scored_paths = checkpoint.parts()
        dropped = find_near_duplicates(config, scored_paths, previous) if config.filter.dedup.enabled else {}
        if dry_run:
            import pyarrow.dataset as pads

            rows = pads.dataset(scored_paths, format="parquet").to_table().to_pylist() if scored_paths else []
            counts = filter_counts(rows, config, dropped)
            considered = sum(not upstream_reason(r) for r in rows)
            return StageResult(
                "filter (dry run)",
                time.monotonic() - start,
                counts={"clips": len(rows), "considered": considered},
                rejects_by_reason=counts,
            )
        # Ray workers apply the decisions to the scored clips and write the clips table and the rejects.
        scored = Source(checkpoint.parts(), checkpoint.fs, FILTERED_CLIPS_SCHEMA)
        rebuilt = rebuild_table(
            output, "clips", "filter", [scored], FILTERED_CLIPS_SCHEMA, FilterDecisions, (thresholds, dropped)
        )
    finally:
        if dry_run:
            shutil.rmtree(scratch_out, ignore_errors=True)
    return StageResult(
        "filter",
        time.monotonic() - start,
        counts={
            "clips": rebuilt.rows,
            "passed": rebuilt.passed,
            "rejected": sum(rebuilt.rejects_by_reason.values()),
            "near_duplicates": len(dropped),
        },
        rejects_by_reason=rebuilt.rejects_by_reason,
        resumed=resumed,
    )


def _run(run: StageRun) -> StageResult:
    return run_filter(run.config, run.output, checkpoint=run.checkpoint, progress=run.progress)


def _dry_run(config: RecapConfig, output: str) -> StageResult:
    return run_filter(config, output, dry_run=True)


STAGE = Stage(
    "filter",
    _run,
    unit="clips",
    needs=("clips", "no clips table under {output}/manifest: run `recap split` first"),
    dry_run=_dry_run,
)
