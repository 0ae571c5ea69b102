"""Caption stage: CPU actors decode and resize each clip's frames; model actors caption them and run QC.

Keeping decode apart from the model means the GPU never waits on FFmpeg. Captions are versioned by
(model, prompt hash) in their own table, so changing either re-runs only captioning. `run_caption` runs both
pools on Ray over the passing clips, commits each batch, and writes `captions` and the caption columns of `clips`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.config import CaptionConfig, RecapConfig
from pipeline.engine import StageResult, count_by, map_stage, stage_checkpoint, stage_progress
from pipeline.errors import StageInputError
from pipeline.resume import StageCheckpoint
from pipeline.schema import CAPTION_FIELDS, CAPTIONS_TABLE_SCHEMA, REJECTS_SCHEMA, RejectReason, table_of
from pipeline.stages.common import IsolatedStage, rows_of

PREP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("frames_jpeg", pa.list_(pa.binary())),
        ("sample_fps", pa.float64()),
        ("frame_times", pa.list_(pa.float64())),  # each sampled frame's real time from the clip's start
        ("user_text", pa.string()),
        ("prep_error", pa.string()),
    ]
)

CAPTIONS_SCHEMA = CAPTIONS_TABLE_SCHEMA  # one row per clip and caption version (model + prompt hash)


def caption_version(model: str, prompt_version_id: str) -> str:
    return hashlib.sha256(f"{model}\n{prompt_version_id}".encode()).hexdigest()[:12]


def prepare_clip(uri: str, start_s: float, end_s: float, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Sampled, resized frames of one clip as JPEG bytes; runs in the isolated child."""
    from captioner.frames import family_sampling, read_clip_frames

    cfg = CaptionConfig.model_validate(cfg_dict)
    num_frames, target_fps, least = family_sampling(cfg.model, cfg.num_frames, cfg.target_fps)
    frames, times = read_clip_frames(
        uri, start_s, end_s, num_frames, target_fps, cfg.max_frames, cfg.max_side, min_frames=least
    )
    duration = max(end_s - start_s, 1e-6)
    encoded = [
        cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        for f in frames
    ]
    return {"frames_jpeg": encoded, "sample_fps": len(frames) / duration, "frame_times": [t - start_s for t in times]}


class CaptionPrepStage(IsolatedStage):
    """CPU actors: clip rows -> sampled frames (JPEG) and the rendered prompt text."""

    name = "caption-prep"
    input_columns = ("clip_id", "uri", "start_s", "end_s")
    output_schema = PREP_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from captioner.prompts import load_prompt

        super().__init__(config)
        self._cfg = self.config.caption.model_dump(mode="json")
        self.prompt = load_prompt(self.config.caption.prompt)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from captioner.prompts import render_user_text

        out: dict[str, Any] = {"clip_id": row["clip_id"], "user_text": render_user_text(self.prompt, row)}
        outcome = self.run_isolated(
            "pipeline.stages.caption:prepare_clip", row["uri"], row["start_s"], row["end_s"], self._cfg
        )
        rejected = self.reject_of(outcome)
        if rejected is not None:
            out.update(frames_jpeg=[], sample_fps=None, frame_times=[], prep_error=f"{rejected[0]}: {rejected[1]}")
        else:
            out.update(outcome.result)
        return out


def build_backend(cfg: CaptionConfig) -> Any:
    if cfg.model is None:
        raise ValueError("caption.model is not set: name a hub id, a local path, or recap-tiny:qwen2_5_vl")
    if cfg.backend == "vllm":
        from captioner.backends.vllm import VLLMBackend

        return VLLMBackend(cfg)
    from captioner.backends.transformers import TransformersBackend

    return TransformersBackend(
        cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=cfg.batch_size,
        device_map=cfg.device_map,
        attn_implementation=cfg.attn_implementation,
    )


class CaptionModelStage:
    """Model actors: frames -> caption, QC, one retry with sampling for flagged captions."""

    name = "caption"
    input_columns = ("clip_id", "frames_jpeg", "sample_fps", "user_text")
    output_schema = CAPTIONS_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from captioner.prompts import load_prompt, token_budget
        from captioner.quality import QCConfig

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.cfg = cfg.caption
        self.prompt = load_prompt(self.cfg.prompt)
        self.version = caption_version(self.cfg.model or "", self.prompt.version_id)
        self.qc = QCConfig(
            min_words=self.cfg.qc.min_words,
            max_words=self.cfg.qc.max_words,
            max_repeat_ngram_frac=self.cfg.qc.max_repeat_frac,
        )
        self.max_new_tokens = self.cfg.max_new_tokens or token_budget(self.prompt, self.cfg.qc.max_words)
        self.backend = build_backend(self.cfg)

    def _sampling(self, retry: bool) -> Any:
        from captioner.backends.base import Sampling

        c = self.cfg
        temperature = c.qc.retry_temperature if retry else c.temperature
        return Sampling(
            max_new_tokens=self.max_new_tokens * (2 if retry else 1),  # a retry may finish a cut-off caption
            temperature=temperature,
            top_p=c.top_p,
            repetition_penalty=c.repetition_penalty,
            seed=1 if retry else 0,
        )

    def _caption(self, requests: list[Any], sampling: Any) -> list[str | Exception]:
        """Captions of `requests`, or per request the error the model raised on it: a batch that fails is split in
        halves until the clip the model cannot take is alone, so one such clip never fails the others (or the
        stage). Out-of-memory is not the clip's fault and is raised."""
        try:
            return list(self.backend.caption(requests, sampling))
        except Exception as exc:  # noqa: BLE001 - any model error on a clip becomes its reject
            if _is_oom(exc):
                raise
            if len(requests) == 1:
                return [exc]
            half = len(requests) // 2
            return self._caption(requests[:half], sampling) + self._caption(requests[half:], sampling)

    def _judge(self, raw: str) -> tuple[Any, bool]:
        from captioner.quality import check_caption

        result = check_caption(raw, self.qc)
        failing = [f for f in result.flags if f in self.cfg.qc.fail_on]
        return result, bool(failing)

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        from captioner.backends.base import CaptionRequest

        rows = rows_of(batch)
        out: list[dict[str, Any]] = []
        requests, owners = [], []
        for row in rows:
            base = {
                "clip_id": row["clip_id"],
                "caption_version": self.version,
                "caption_model": self.cfg.model,
                "caption_prompt_version": self.prompt.version_id,
                "caption_attempts": 0,
            }
            if not row.get("frames_jpeg"):
                out.append(
                    {
                        **base,
                        "caption": None,
                        "caption_raw": None,
                        "caption_failed": True,
                        "caption_flags": ["no_frames"],
                    }
                )
                continue
            frames = [
                cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                for b in row["frames_jpeg"]
            ]
            requests.append(
                CaptionRequest(
                    row["clip_id"],
                    frames,
                    float(row["sample_fps"] or 1.0),
                    row["user_text"],
                    system=self.prompt.system,
                    timestamps=list(row.get("frame_times") or []),
                )
            )
            owners.append(base)
        if requests:
            answers = self._caption(requests, self._sampling(retry=False))
            errors = {i: a for i, a in enumerate(answers) if isinstance(a, Exception)}
            for i in sorted(errors, reverse=True):  # the model cannot take these clips: rejected, never retried
                exc = errors[i]
                out.append(
                    {
                        **owners.pop(i),
                        "caption": None,
                        "caption_raw": f"{type(exc).__name__}: {exc}"[:500],
                        "caption_failed": True,
                        "caption_flags": ["model_error"],
                        "caption_attempts": 1,
                    }
                )
                del requests[i], answers[i]
            raws = list(answers)
            results = [self._judge(raw) for raw in raws]
            retry_idx = [i for i, (_r, failed) in enumerate(results) if failed] if self.cfg.qc.retry else []
            attempts = [1] * len(requests)
            if retry_idx:
                again = self._caption([requests[i] for i in retry_idx], self._sampling(retry=True))
                for i, raw in zip(retry_idx, again, strict=True):
                    if not isinstance(raw, Exception):  # a retry the model raised on keeps the first answer
                        raws[i], results[i], attempts[i] = raw, self._judge(raw), 2
            for base, raw, (result, failed), n in zip(owners, raws, results, attempts, strict=True):
                out.append(
                    {
                        **base,
                        "caption": result.caption,
                        "caption_raw": raw,
                        "caption_flags": list(result.flags),
                        "caption_failed": failed,
                        "caption_attempts": n,
                    }
                )
        return table_of(out, CAPTIONS_SCHEMA)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


MATCH_SCHEMA = pa.schema([("clip_id", pa.string()), ("score_caption_match", pa.float64())])


class CaptionMatchStage:
    """CLIP text-video agreement: the caption's text embedding against the filter's clip embedding."""

    name = "caption-match"
    input_columns = ("clip_id", "caption", "clip_embedding")
    output_schema = MATCH_SCHEMA

    def __init__(self, config: RecapConfig | dict[str, Any]):
        from pipeline.stages.filter import clip_scorer_from_config

        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.scorer = clip_scorer_from_config(cfg)

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        rows = rows_of(batch)
        scores = self.scorer.caption_match(
            [r["caption"] for r in rows], [np.asarray(r["clip_embedding"], np.float32) for r in rows]
        )
        return pa.table(
            {"clip_id": [r["clip_id"] for r in rows], "score_caption_match": scores.astype(float)}, schema=MATCH_SCHEMA
        )


# ---------------------------------------------------------------------------------------------
# the stage on Ray: caption the passing clips, write captions and clips


def _caption_match(config: RecapConfig, clips: pa.Table, captions: dict[str, dict[str, Any]]) -> dict[str, float]:
    """score_caption_match per captioned clip, when the filter stored CLIP embeddings and a CLIP model is set."""
    import ray.data

    if not config.filter.clip.model or "clip_embedding" not in clips.column_names:
        return {}
    rows = [
        {"clip_id": r["clip_id"], "caption": captions[r["clip_id"]]["caption"], "clip_embedding": r["clip_embedding"]}
        for r in clips.select(["clip_id", "clip_embedding"]).to_pylist()
        if r["clip_id"] in captions and r["clip_embedding"] and captions[r["clip_id"]]["caption"]
    ]
    if not rows:
        return {}
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows), override_num_blocks=min(len(rows), 100))
    ds = map_stage(ds, CaptionMatchStage, config.filter.clip.resources, (config.to_dict(),))
    out: dict[str, float] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.update(
            zip(batch.column("clip_id").to_pylist(), batch.column("score_caption_match").to_pylist(), strict=True)
        )
    return out


def run_caption(config: RecapConfig, output: str, checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Caption every passing clip; write the `captions` table (per version) and caption columns in `clips`."""
    import ray.data

    from captioner.prompts import load_prompt

    start = time.monotonic()
    cfg = config.caption
    if cfg.model is None:
        raise StageInputError("caption.model is not set: name a hub id, a local path, or recap-tiny:qwen2_5_vl")
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run `recap split` (and filter) first")
    prompt = load_prompt(cfg.prompt)  # a bad prompt file fails here, before any actor starts
    version = caption_version(cfg.model, prompt.version_id)
    clips = manifest.read_table(output, "clips")
    caption_cols = {f.name for f in CAPTION_FIELDS}
    clips = clips.drop_columns([c for c in clips.column_names if c in caption_cols])
    # Clips this stage rejected last time are candidates again: undo only its own decisions.
    reasons = clips.column("reject_reason").to_pylist()
    own = [bool(r and r.startswith("caption_")) for r in reasons]
    if any(own):
        clips = clips.set_column(
            clips.schema.get_field_index("passed"),
            "passed",
            pa.array([p or o for p, o in zip(clips.column("passed").to_pylist(), own, strict=True)]),
        )
        clips = clips.set_column(
            clips.schema.get_field_index("reject_reason"),
            "reject_reason",
            pa.array([None if o else r for r, o in zip(reasons, own, strict=True)], pa.string()),
        )
    wanted = [
        c
        for c in ("clip_id", "uri", "start_s", "end_s", "duration_s", "fps", "camera_motion")
        if c in clips.column_names
    ]
    todo = clips.filter(pc.equal(clips.column("passed"), True)).select(wanted)
    checkpoint = stage_checkpoint(output, "caption", checkpoint)
    done = checkpoint.done("clip_id")
    resumed = len(done)
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("clip_id"), pa.array(sorted(done), pa.string()))))
    progress = stage_progress(config, "caption", todo.num_rows, "clips")
    if todo.num_rows:
        ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
        ds = map_stage(ds, CaptionPrepStage, cfg.preprocess_resources, (config.to_dict(),))
        env = None
        model_resources = cfg.resources
        if cfg.backend == "vllm":
            from captioner.backends.vllm import runtime_env

            env = runtime_env(cfg)
            # One actor per data-parallel replica, each holding tensor_parallel_size GPUs.
            model_resources = cfg.resources.model_copy(
                update={
                    "concurrency": cfg.vllm.data_parallel_replicas,
                    "num_gpus": max(cfg.resources.num_gpus, float(cfg.vllm.tensor_parallel_size)),
                }
            )
        ds = map_stage(ds, CaptionModelStage, model_resources, (config.to_dict(),), runtime_env=env)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            checkpoint.commit(batch)
            progress.update(batch.num_rows, failed=sum(batch.column("caption_failed").to_pylist()))
    progress.close()
    committed = checkpoint.read(schema=CAPTIONS_SCHEMA)
    committed = committed if committed is not None else CAPTIONS_SCHEMA.empty_table()
    manifest.write_table(output, "captions", committed, prefix=version, schema=CAPTIONS_SCHEMA)
    captions: dict[str, dict[str, Any]] = {row["clip_id"]: row for row in committed.to_pylist()}
    matches = _caption_match(config, clips, captions)
    rows = clips.to_pylist()
    reject_rows = []
    for row in rows:
        cap = captions.get(row["clip_id"])
        if cap is None:
            continue
        match = matches.get(row["clip_id"])
        row.update(
            caption=cap["caption"],
            caption_model=cap["caption_model"],
            caption_prompt_version=cap["caption_prompt_version"],
            caption_version=version,
            caption_flags=cap["caption_flags"],
            score_caption_match=match,
        )
        mismatch = match is not None and cfg.min_caption_match is not None and match < cfg.min_caption_match
        if mismatch and not cap["caption_failed"]:
            row.update(passed=False, reject_reason=RejectReason.CAPTION_MISMATCH.value)
            reject_rows.append(
                {
                    "stage": "caption",
                    "item_id": row["clip_id"],
                    "uri": row["uri"],
                    "reason": RejectReason.CAPTION_MISMATCH.value,
                    "detail": f"caption-video match {match:.3f} < {cfg.min_caption_match}",
                }
            )
        elif cap["caption_failed"]:
            failing = [f for f in cap["caption_flags"] if f in cfg.qc.fail_on or f in ("no_frames", "model_error")]
            reason = RejectReason(f"caption_{failing[0]}").value
            row.update(passed=False, reject_reason=reason)
            reject_rows.append(
                {
                    "stage": "caption",
                    "item_id": row["clip_id"],
                    "uri": row["uri"],
                    "reason": reason,
                    "detail": f"flags {cap['caption_flags']} after {cap['caption_attempts']} attempt(s): "
                    f"{(cap['caption_raw'] or '')[:200]!r}",
                }
            )
    schema = pa.schema([f for f in clips.schema if f.name not in caption_cols] + CAPTION_FIELDS)
    clip_writer = manifest.TableWriter(output, "clips", prefix="caption", schema=schema, replace_table=True)
    clip_writer.write_rows(rows)
    clip_writer.close()
    manifest.write_table(output, "rejects", pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA), prefix="caption")
    return StageResult(
        "caption",
        time.monotonic() - start,
        counts={"clips": len(captions), "captioned": len(captions) - len(reject_rows), "rejected": len(reject_rows)},
        rejects_by_reason=count_by([r["reason"] for r in reject_rows]),
        info={
            "caption_version": version,
            "caption_model": cfg.model,
            "caption_prompt_version": prompt.version_id,
        },
        resumed=resumed,
    )
