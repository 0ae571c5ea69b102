"""Filter stage: score every clip from frames sampled once, then decide pass/reject with reasons.

`score_video_clips` decodes a video once (in the isolated child) and scores all its clips with
the weights-free scorers; `TextDetectStage` (PP-OCRv6), `NsfwDetectStage` (NudeNet) and
`ClipModelStage` (CLIP) add model scores, each on its own actor pool, from the sampled frames the
CPU actors hand over as JPEGs; `decide` applies the configured thresholds. Near-duplicates are resolved across the
whole corpus by the runner (`pipeline.scoring.dedup`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import av
import cv2
import numpy as np
import pyarrow as pa

from pipeline.config import FilterConfig, RecapConfig
from pipeline.schema import FILTERED_CLIPS_SCHEMA, SCORE_REJECT_REASONS, RejectReason, table_of
from pipeline.scoring.dedup import phash64
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


class TextDetectStage:
    """Adds `score_text` (and `text_ocr`) from the PP-OCRv6 text detector; the model loads once per actor."""

    name = "filter-text"
    input_columns = ("clip_id", "frames_jpeg")
    output_schema = SCORED_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.scoring.ocr import TextDetector

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.cfg = cfg.filter.text
        t = self.cfg
        self.detector = TextDetector(
            max_side=t.max_side,
            box_thresh=t.box_thresh,
            device=t.device,
            threads=t.threads or max(1, round(t.resources.num_cpus)),
            batch_size=t.batch_size,
            recognize=t.recognize,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips = [frames_of(row, self.cfg.frames, rgb=False) for row in rows]
        for row, scores in zip(rows, self.detector.score_clips(clips), strict=True):
            if row.get("frames_jpeg"):  # a clip whose frames did not decode keeps its scoring failure
                row.update(scores)
        return table_of(rows, self.output_schema)


class NsfwDetectStage:
    """Adds `score_nsfw` from NudeNet's exposed-content classes; the model loads once per actor."""

    name = "filter-nsfw"
    input_columns = ("clip_id", "frames_jpeg")
    output_schema = SCORED_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.scoring.nsfw import NsfwDetector

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        n = cfg.filter.nsfw
        threads = n.threads or max(1, round(n.resources.num_cpus))
        self.detector = NsfwDetector(device=n.device, threads=threads, batch_size=n.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips = [frames_of(row, rgb=False) for row in rows]
        for row, scores in zip(rows, self.detector.score_clips(clips), strict=True):
            if row.get("frames_jpeg"):
                row.update(scores)
        return table_of(rows, self.output_schema)


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
