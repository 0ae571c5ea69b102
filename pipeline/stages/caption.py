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
from pipeline.engine import Source, Stage, StageResult, StageRun, conform, stage_checkpoint, stage_progress
from pipeline.errors import StageInputError
from pipeline.progress import StageProgress
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
        scored = [i for i, r in enumerate(rows) if r.get("caption") and r.get("clip_embedding")]
        out: list[float | None] = [None] * len(rows)  # no caption, or no embedding from the filter: no score
        if scored:
            values = self.scorer.caption_match(
                [rows[i]["caption"] for i in scored],
                [np.asarray(rows[i]["clip_embedding"], np.float32) for i in scored],
            )
            for i, value in zip(scored, values.astype(float), strict=True):
                out[i] = float(value)
        return pa.table({"clip_id": [r["clip_id"] for r in rows], "score_caption_match": out}, schema=MATCH_SCHEMA)


# ---------------------------------------------------------------------------------------------
# the stage on Ray: caption the passing clips; the workers write each batch's captions as a part, the driver
# commits the parts' names, then publishes `captions` (the parts) and writes the caption columns of `clips`

# A batch's captions as a worker writes them: the `captions` table's columns plus the CLIP caption match.
PART_SCHEMA = pa.schema(list(CAPTIONS_SCHEMA) + [pa.field("score_caption_match", pa.float64())])
# What the driver commits per part (the stage checkpoint's rows).
PART_RECORD_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64())])
CAPTION_ONLY = ("caption_raw", "caption_failed", "caption_attempts")  # in `captions`, not in `clips`
# The streaming pipeline's own columns (never a table's): the part a row's caption is in, and the decision.
RECORD_COLUMNS = ("_caption_part", "_caption_rows", "_skip")


def parts_dir(work_uri: str, kind: str = "parts") -> str:
    """Where the caption actors write a batch's files, one of each kind under the same name: `parts` (its
    captions), `clips` (its clips' full rows with captions and decisions), `rejects` (its caption rejects)."""
    return f"{work_uri.rstrip('/')}/{kind}"


PART_KINDS = ("clips", "rejects", "parts")  # written in this order: a caption part vouches for the other two


def clip_rows_schema(clips: pa.Schema) -> pa.Schema:
    """The `clips` table's schema once captioned: the clip columns before caption, then the caption columns."""
    caption_cols = {f.name for f in CAPTION_FIELDS}
    return pa.schema([f for f in clips if f.name not in caption_cols] + CAPTION_FIELDS)


def caption_reject(cap: dict[str, Any], cfg: CaptionConfig) -> tuple[str, str] | None:
    """Why a captioned clip is rejected (reason, detail), or None: a failed caption, or a caption that does not
    match the video (`score_caption_match` < caption.min_caption_match)."""
    match = cap.get("score_caption_match")
    mismatch = match is not None and cfg.min_caption_match is not None and match < cfg.min_caption_match
    if mismatch and not cap["caption_failed"]:
        return RejectReason.CAPTION_MISMATCH.value, f"caption-video match {match:.3f} < {cfg.min_caption_match}"
    if cap["caption_failed"]:
        failing = [f for f in cap["caption_flags"] if f in cfg.qc.fail_on or f in ("no_frames", "model_error")]
        return (
            RejectReason(f"caption_{failing[0]}").value,
            f"flags {cap['caption_flags']} after {cap['caption_attempts']} attempt(s): "
            f"{(cap['caption_raw'] or '')[:200]!r}",
        )
    return None


class CaptionRecordStage:
    """After the model: a batch's captions become one Parquet part in the stage's work directory (named by its
    clip ids, so a retried batch rewrites the same part); each clip goes on with its caption columns and the
    clip decision (`passed`, `reject_reason`), the part's name and size, and `_skip` when rejected."""

    name = "caption-record"
    input_columns = ("clip_id", *CAPTIONS_SCHEMA.names)

    def __init__(self, config: RecapConfig | dict[str, Any], work_uri: str, clip_schema: pa.Schema):
        cfg = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self.cfg = cfg.caption
        self.work = work_uri
        self.clip_schema = clip_schema

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        batch = batch if isinstance(batch, pa.Table) else pa.table(batch)
        if "score_caption_match" not in batch.column_names:
            batch = batch.append_column("score_caption_match", pa.nulls(batch.num_rows, pa.float64()))
        part = batch.select(PART_SCHEMA.names).cast(PART_SCHEMA)
        ids = batch.column("clip_id").to_pylist()
        name = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16] + ".parquet"
        reasons = [caption_reject(cap, self.cfg) for cap in part.to_pylist()]
        out = batch.drop_columns([c for c in CAPTION_ONLY if c in batch.column_names])
        if "passed" in out.column_names:
            passed = pc.and_(pc.fill_null(out.column("passed"), False), pa.array([r is None for r in reasons]))
            out = out.set_column(out.schema.get_field_index("passed"), "passed", passed)
        if "reject_reason" in out.column_names:
            merged = [
                r[0] if r else old for r, old in zip(reasons, out.column("reject_reason").to_pylist(), strict=True)
            ]
            out = out.set_column(
                out.schema.get_field_index("reject_reason"), "reject_reason", pa.array(merged, pa.string())
            )
        # The batch's clips as the `clips` table will hold them, its rejects, then its captions (the part the
        # driver commits): all three before the record leaves this actor.
        manifest.write_part(parts_dir(self.work, "clips"), name, conform(out, self.clip_schema))
        rejected = [
            (r, row) for r, row in zip(reasons, batch.select(["clip_id", "uri"]).to_pylist(), strict=True) if r
        ]
        rejects = pa.table(
            {
                "stage": pa.array(["caption"] * len(rejected), pa.string()),
                "item_id": pa.array([row["clip_id"] for _, row in rejected], pa.string()),
                "uri": pa.array([row["uri"] for _, row in rejected], pa.string()),
                "reason": pa.array([r[0] for r, _ in rejected], pa.string()),
                "detail": pa.array([r[1] for r, _ in rejected], pa.string()),
            },
            schema=REJECTS_SCHEMA,
        )
        if rejects.num_rows:
            manifest.write_part(parts_dir(self.work, "rejects"), name, rejects)
        manifest.write_part(parts_dir(self.work), name, part)
        n = batch.num_rows
        out = out.append_column("_caption_part", pa.array([name] * n, pa.string()))
        out = out.append_column("_caption_rows", pa.array([n] * n, pa.int64()))
        return out.append_column("_skip", pa.array([r is not None for r in reasons], pa.bool_()))

    @staticmethod
    def output_names(names: list[str]) -> list[str]:
        kept = [n for n in names if n not in CAPTION_ONLY]
        return kept + [n for n in ("score_caption_match", *RECORD_COLUMNS) if n not in kept]


def caption_pools(config: RecapConfig, with_match: bool) -> dict[str, Any]:
    """The caption stage's actor pools and what each asks for (the vLLM backend: one actor per replica)."""
    cfg = config.caption
    model = cfg.resources
    if cfg.backend == "vllm":
        # One actor per data-parallel replica, each holding tensor_parallel_size GPUs.
        model = cfg.resources.model_copy(
            update={
                "concurrency": cfg.vllm.data_parallel_replicas,
                "num_gpus": max(cfg.resources.num_gpus, float(cfg.vllm.tensor_parallel_size)),
            }
        )
    pools = {"caption-prep": cfg.preprocess_resources, "caption": model}
    if with_match:
        pools["caption-match"] = config.filter.clip.resources
    return pools


def caption_pipeline(
    ds: Any, names: list[str], config: RecapConfig, work_uri: str, clip_schema: pa.Schema
) -> tuple[Any, list[str]]:
    """The caption stage's part of a Ray Data pipeline over clip rows: decode (CPU pool) -> model (its pool, GPUs)
    -> CLIP caption match (when the filter's CLIP model is set) -> parts and decisions. The clip columns pass
    through, so a later stage (encode) can take the rows on."""
    from pipeline.engine import map_through

    cfg = config.caption
    cfg_dict = config.to_dict()
    clip_columns = tuple(names)
    match = bool(config.filter.clip.model and "clip_embedding" in names)
    pools = caption_pools(config, match)
    ds, names = map_through(ds, names, CaptionPrepStage, pools["caption-prep"], (cfg_dict,), clip_columns)
    env = None
    if cfg.backend == "vllm":
        from captioner.backends.vllm import runtime_env

        env = runtime_env(cfg)
    model_resources = pools["caption"]
    # The record step runs in the last caption actor: no pool of its own.
    record = (CaptionRecordStage, (cfg_dict, work_uri, clip_rows_schema(clip_schema)))
    ds, names = map_through(
        ds,
        names,
        CaptionModelStage,
        model_resources,
        (cfg_dict,),
        clip_columns,
        runtime_env=env,
        post=None if match else record,
    )
    if match:
        ds, names = map_through(
            ds,
            names,
            CaptionMatchStage,
            config.filter.clip.resources,
            (cfg_dict,),
            (*clip_columns, *names),
            post=record,
        )
    return ds, names


def committed_parts(checkpoint: StageCheckpoint) -> list[str]:
    table = checkpoint.read(schema=PART_RECORD_SCHEMA)
    return sorted(set(table.column("part").to_pylist())) if table is not None else []


def commit_parts(checkpoint: StageCheckpoint, parts: dict[str, int]) -> None:
    """Commit caption parts (name -> rows) the workers wrote; a part already committed is not committed again."""
    if parts:
        checkpoint.commit(pa.table({"part": list(parts), "rows": list(parts.values())}, schema=PART_RECORD_SCHEMA))


def read_parts(checkpoint: StageCheckpoint, columns: list[str] | None = None) -> pa.Table:
    """The committed captions (PART_SCHEMA), from the parts the workers wrote."""
    import pyarrow.parquet as pq

    fs, path = manifest._fs(parts_dir(checkpoint.uri))
    tables = []
    for name in committed_parts(checkpoint):
        with fs.open(f"{path}/{name}", "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns, schema=PART_SCHEMA))
    schema = PART_SCHEMA if columns is None else pa.schema([PART_SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()


class CaptionTodo:
    """A `Source`'s `prepare`: the rows of `clips` the caption stage takes (passing once its own earlier decisions
    are undone) that `done` (clips an interrupted run captioned) does not hold, caption columns dropped."""

    def __init__(self, done: pa.Array):
        self.where = taken_by_caption(done)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return undo_own_decisions(batch.filter(self.where))


def taken_by_caption(done: pa.Array) -> pc.Expression:
    """The rows the caption stage takes, as an Arrow expression (see `undo_own_decisions`), less `done`."""
    own = pc.coalesce(pc.starts_with(pc.field("reject_reason"), "caption_"), False)
    where = pc.coalesce(pc.field("passed"), False) | own
    return where & ~pc.field("clip_id").isin(done) if len(done) else where


def caption_todo(config: RecapConfig, output: str, checkpoint: StageCheckpoint) -> tuple[pa.Schema, Source, int, int]:
    """(the schema of clips as the caption stage starts from, caption columns dropped; the clips still to caption,
    as a Source the workers read, and how many; how many an interrupted run committed). Removes parts never
    committed."""
    committed = set(committed_parts(checkpoint))
    for kind in PART_KINDS:
        manifest.remove_unlisted(parts_dir(checkpoint.uri, kind), committed)
    done = read_parts(checkpoint, ["clip_id"]).column("clip_id").combine_chunks()
    clips = Source.table(output, "clips")
    caption_cols = {f.name for f in CAPTION_FIELDS}
    schema = pa.schema([f for f in clips.read_schema() if f.name not in caption_cols])
    todo = Source(clips.paths, clips.fs, prepare=CaptionTodo(done))
    return schema, todo, clips.num_rows(taken_by_caption(done)), len(done)


def run_caption(
    config: RecapConfig,
    output: str,
    checkpoint: StageCheckpoint | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    """Caption every passing clip; write the `captions` table (per version) and caption columns in `clips`.
    `progress`: a streaming run's line for this stage (what it committed is in `checkpoint`)."""

    from captioner.prompts import load_prompt

    start = time.monotonic()
    cfg = config.caption
    if cfg.model is None:
        raise StageInputError("caption.model is not set: name a hub id, a local path, or recap-tiny:qwen2_5_vl")
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run `recap split` (and filter) first")
    prompt = load_prompt(cfg.prompt)  # a bad prompt file fails here, before any actor starts
    version = caption_version(cfg.model, prompt.version_id)
    checkpoint = stage_checkpoint(output, "caption", checkpoint)
    schema, todo, count, resumed = caption_todo(config, output, checkpoint)
    progress = stage_progress(config, "caption", count, "clips", progress=progress)
    if count:
        ds = todo.blocks(max(1, count // 1000))  # about a thousand blocks, read by the workers
        ds, _names = caption_pipeline(ds, schema.names, config, checkpoint.uri, schema)
        # The driver takes the parts' names and the decisions, never the captions themselves.
        for batch in ds.select_columns(list(RECORD_COLUMNS)).iter_batches(batch_size=None, batch_format="pyarrow"):
            names = batch.column("_caption_part").to_pylist()
            parts = dict(zip(names, batch.column("_caption_rows").to_pylist(), strict=True))
            commit_parts(checkpoint, parts)
            progress.update(batch.num_rows, rejected=sum(batch.column("_skip").to_pylist()))
    progress.close()
    return finish_caption(config, output, checkpoint, schema, version, prompt.version_id, start, resumed)


def undo_own_decisions(clips: pa.Table) -> pa.Table:
    """`clips` without caption columns and with the caption stage's own earlier rejections undone (those clips
    are candidates again), the earlier stages' decisions kept."""
    caption_cols = {f.name for f in CAPTION_FIELDS}
    clips = clips.drop_columns([c for c in clips.column_names if c in caption_cols])
    reasons = clips.column("reject_reason")
    own = pc.fill_null(pc.starts_with(reasons, "caption_"), False)
    if pc.any(own).as_py():
        passed = pc.or_(pc.fill_null(clips.column("passed"), False), own)
        clips = clips.set_column(clips.schema.get_field_index("passed"), "passed", passed)
        cleared = pc.if_else(own, pa.scalar(None, pa.string()), reasons)
        clips = clips.set_column(clips.schema.get_field_index("reject_reason"), "reject_reason", cleared)
    return clips


def uncaptioned_rows(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table rebuild's input from the old `clips`: the rows the caption stage did not take (not passed, once
    its own earlier decisions are undone), caption columns null."""
    batch = undo_own_decisions(batch)
    return conform(batch.filter(pc.invert(pc.fill_null(batch.column("passed"), False))), schema)


def finish_caption(
    config: RecapConfig,
    output: str,
    checkpoint: StageCheckpoint,
    clips: pa.Schema,
    version: str,
    prompt_version: str,
    start: float,
    resumed: int,
) -> StageResult:
    """Publish the committed parts as the `captions` table (this version); Ray workers rebuild `clips` from
    the captioned clips' rows the caption actors wrote and the clips the stage did not take; publish the caption
    rejects the actors wrote."""
    from functools import partial

    from pipeline.engine import rebuild_table

    cfg = config.caption
    names = committed_parts(checkpoint)
    manifest.publish_parts(
        output, "captions", version, [f"{parts_dir(checkpoint.uri)}/{n}" for n in names], PART_SCHEMA
    )
    schema = clip_rows_schema(clips)
    fs, clip_parts = manifest._fs(parts_dir(checkpoint.uri, "clips"))
    captioned = Source([f"{clip_parts}/{n}" for n in names], fs, schema)
    others = Source.table(output, "clips", prepare=partial(uncaptioned_rows, schema=schema))
    _, reject_dir = manifest._fs(parts_dir(checkpoint.uri, "rejects"))
    written = {p.rsplit("/", 1)[-1] for p in fs.ls(reject_dir, detail=False)} if fs.exists(reject_dir) else set()
    reject_parts = tuple(f"{parts_dir(checkpoint.uri, 'rejects')}/{n}" for n in names if n in written)
    rebuilt = rebuild_table(output, "clips", "caption", [others, captioned], schema, reject_parts=reject_parts)
    records = checkpoint.read(schema=PART_RECORD_SCHEMA)
    # A part committed twice (a retried batch) counts once.
    parts = records.group_by("part").aggregate([("rows", "max")]) if records is not None else None
    captioned_rows = int(pc.sum(parts.column("rows_max")).as_py() or 0) if parts is not None else 0
    rejected = sum(rebuilt.rejects_by_reason.values())
    return StageResult(
        "caption",
        time.monotonic() - start,
        counts={"clips": captioned_rows, "captioned": captioned_rows - rejected, "rejected": rejected},
        rejects_by_reason=rebuilt.rejects_by_reason,
        info={"caption_version": version, "caption_model": cfg.model, "caption_prompt_version": prompt_version},
        resumed=resumed,
    )


def _run(run: StageRun) -> StageResult:
    return run_caption(run.config, run.output, checkpoint=run.checkpoint, progress=run.progress)


STAGE = Stage(
    "caption",
    _run,
    unit="clips",
    needs=("clips", "no clips table under {output}/manifest: run `recap split` (and filter) first"),
)
