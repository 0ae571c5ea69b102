"""The only module that imports Ray: stages become Ray Data `map_batches` over actor pools.

Each stage declares its input columns and output schema; the runner checks them when it
builds the pipeline, streams results back to the driver, writes the manifest tables as
results arrive, and prints progress. Stage logic itself lives in `pipeline.stages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest
from pipeline.config import RecapConfig, Resources
from pipeline.errors import DecoderUnavailable, StageInputError
from pipeline.io.sources import discover_inputs
from pipeline.lease import WriterLease
from pipeline.progress import StageProgress
from pipeline.resume import (
    UPSTREAM,
    RunState,
    StageCheckpoint,
    fingerprint,
    missing_outputs,
    reopen_rejected,
    seed_encode_checkpoint,
    stage_settings,
)
from pipeline.schema import REJECTS_SCHEMA, SAMPLES_SCHEMA, VIDEOS_SCHEMA, RejectReason, VideoStatus
from pipeline.stages.ingest import IngestStage, mark_duplicates
from pipeline.stages.split import (
    SPLIT_RESULT_SCHEMA,
    STORAGE_ERROR,
    SplitStage,
    clip_rows_from_results,
    raise_storage_errors,
)

log = logging.getLogger("recap")


STAGE_ORDER = ("ingest", "split", "filter", "caption", "encode")
AVAILABLE_STAGES = ("ingest", "split", "filter", "caption", "encode")


@dataclass
class StageResult:
    stage: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # more for run.json (caption version, VAE, ...)
    skipped: bool = False  # finished by an earlier run with the same settings
    resumed: int = 0  # work items an earlier, interrupted run had already committed

    def summary_line(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_reason.items())) or "none"
        note = (
            " (done earlier, skipped)"
            if self.skipped
            else (f" (resumed: {self.resumed:,} done before)" if self.resumed else "")
        )
        return f"{self.stage:<7} {self.seconds:7.1f}s  {counts}; rejects: {rejects}{note}"


class RaySession:
    """Connects to a cluster (`address` or RAY_ADDRESS) or starts a local Ray; reuses a live one."""

    def __init__(self, config: RecapConfig, address: str | None = None):
        self.config = config
        self.address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
        self._started = False
        self._reaper: Any = None

    def __enter__(self) -> RaySession:
        import ray
        import ray.data

        if not ray.is_initialized():
            # Ray's notice that a local cluster turned token auth on is for cluster admins, not a recap user: the
            # auth stays on, the line stays off the terminal.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if self.address:
                kwargs["address"] = self.address
            elif self.config.ray.num_cpus:
                kwargs["num_cpus"] = self.config.ray.num_cpus
            ray.init(**kwargs)
            self._started = True
            if not self.address:  # a local Ray goes down with this process, even if it is SIGKILLed
                from pipeline.ray_reaper import start_reaper

                self._reaper = start_reaper()
        ctx = ray.data.DataContext.get_current()
        # recap prints its own per-stage progress; Ray's bars (or INFO blocks off a terminal) are noise.
        ctx.enable_progress_bars = False
        # A decoding process that cannot start is the worker's trouble, not the batch's: Ray runs the batch
        # again before the run gives up (DecoderUnavailable at the driver).
        retried = ctx.retried_map_errors
        if retried is not True:
            retried = list(retried or [])
            if DecoderUnavailable.MARKER not in retried:
                retried.append(DecoderUnavailable.MARKER)
            ctx.retried_map_errors = retried
        ctx.max_map_retries = max(ctx.max_map_retries, self.config.isolation.infrastructure_retries)
        for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            from pipeline.ray_reaper import stop_reaper

            ray.shutdown()
            stop_reaper(self._reaper)


def _infrastructure_failure(exc: BaseException) -> DecoderUnavailable | None:
    """The DecoderUnavailable a stage actor raised, found in the error Ray Data reports (it keeps only text)."""
    import re

    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        if isinstance(current, DecoderUnavailable) and type(current) is DecoderUnavailable:
            return current
        seen.append(current)
        found = re.search(
            r"DecoderUnavailable: (.*?)(?:\n\nThe above exception|\nFailed to apply UDF|\Z)", str(current), re.S
        )
        if found:
            return DecoderUnavailable(found.group(1).strip())
        nxt = getattr(current, "cause", None)
        current = nxt if isinstance(nxt, BaseException) else (current.__cause__ or current.__context__)
    return None


def _map_stage(
    ds: Any, stage_cls: type, resources: Resources, constructor_args: tuple, runtime_env: dict | None = None
) -> Any:
    import ray.data

    missing = [c for c in stage_cls.input_columns if c not in ds.schema().names]
    if missing:
        raise StageInputError(f"stage {stage_cls.name} needs columns {missing}; the input has {ds.schema().names}")
    return ds.map_batches(
        stage_cls,
        fn_constructor_args=constructor_args,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
        runtime_env=runtime_env,
    )


def _rejects_from(table: pa.Table, stage: str, id_column: str) -> pa.Table:
    mask = pc.equal(table.column("status"), VideoStatus.REJECTED.value)
    bad = table.filter(mask)
    return pa.table(
        {
            "stage": pa.array([stage] * bad.num_rows, pa.string()),
            "item_id": bad.column(id_column),
            "uri": bad.column("uri"),
            "reason": bad.column("reject_reason"),
            "detail": bad.column("reject_detail"),
        },
        schema=REJECTS_SCHEMA,
    )


def _count_by(values: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return counts


def _progress(config: RecapConfig, stage: str, total: int, unit: str, rate: str | None = None) -> StageProgress:
    return StageProgress(
        stage, total, unit, mode=config.ray.progress, log_interval_s=config.ray.log_interval_s, rate_counter=rate
    )


def _checkpoint(output: str, stage: str, checkpoint: StageCheckpoint | None) -> StageCheckpoint:
    """The run's checkpoint, or (a stage function called on its own) a fresh one for this call."""
    return checkpoint if checkpoint is not None else StageCheckpoint(output, stage, f"direct-{time.time_ns()}")


def run_ingest(
    config: RecapConfig,
    inputs: list[str],
    output: str,
    uris: list[str] | None = None,
    checkpoint: StageCheckpoint | None = None,
    skipped: dict[str, int] | None = None,
) -> StageResult:
    """Find input files, hash and probe each on Ray, write the `videos` table and ingest rejects. `skipped`: files
    the extension filter left out, by reason (found here when `uris` is not given)."""
    import ray.data

    start = time.monotonic()
    if uris is None:
        skipped = {}
        uris = discover_inputs(inputs, config.ingest.extensions, skipped)
    skipped = skipped or {}
    checkpoint = _checkpoint(output, "ingest", checkpoint)
    done = checkpoint.done("uri")
    todo = [u for u in uris if u not in done]
    progress = _progress(config, "ingest", len(todo), "files")
    if todo:
        ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=min(len(todo), 1000))
        ds = _map_stage(ds, IngestStage, config.ingest.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            checkpoint.commit(batch)
            statuses = batch.column("status").to_pylist()
            progress.update(batch.num_rows, rejected=sum(s != "ok" for s in statuses))
    probed = checkpoint.read(schema=VIDEOS_SCHEMA)
    wanted = set(uris)
    rows = [r for r in (probed.to_pylist() if probed is not None else []) if r["uri"] in wanted]
    rejected_before = sum(r["status"] != "ok" for r in rows)
    rows = mark_duplicates(rows)
    progress.update(0, rejected=sum(r["status"] != "ok" for r in rows) - rejected_before)  # duplicates
    progress.close()
    rows.sort(key=lambda r: r["uri"])
    videos = pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA)
    manifest.write_table(output, "videos", videos, prefix="videos")
    rejects = _rejects_from(videos, "ingest", "video_id")
    manifest.write_table(output, "rejects", rejects, prefix="ingest")
    ok = sum(r["status"] == "ok" for r in rows)
    return StageResult(
        "ingest",
        time.monotonic() - start,
        counts={"files": len(rows), "ok": ok, "rejected": len(rows) - ok}
        | ({"skipped": sum(skipped.values())} if skipped else {}),
        rejects_by_reason=_count_by(rejects.column("reason").to_pylist()),
        info={"inputs": list(inputs)} | ({"skipped": dict(sorted(skipped.items()))} if skipped else {}),
        resumed=len(uris) - len(todo),
    )


def run_split(config: RecapConfig, output: str, checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Detect scenes in every ok video on Ray; write `clips`, split rejects, and update `videos`."""
    import ray.data

    start = time.monotonic()
    if not manifest.table_exists(output, "videos"):
        raise StageInputError(f"no videos table under {output}/manifest: run `recap ingest` first")
    videos = manifest.read_table(output, "videos")
    todo = videos.filter(pc.equal(videos.column("status"), VideoStatus.OK.value))
    todo = todo.select(["video_id", "uri", "num_frames", "num_frames_exact"])
    # Longest first, so a long video does not end up as the run's tail.
    todo = todo.take(pc.sort_indices(todo, sort_keys=[("num_frames", "descending"), ("video_id", "ascending")]))
    clips_dir = f"{output.rstrip('/')}/media/clips" if config.split.transcode.enabled else None
    checkpoint = _checkpoint(output, "split", checkpoint)
    done = checkpoint.done("video_id")
    resumed = len(done)
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("video_id"), pa.array(sorted(done), pa.string()))))
    progress = _progress(config, "split", todo.num_rows, "videos", rate="frames")
    if todo.num_rows:
        ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
        ds = _map_stage(ds, SplitStage, config.split.resources, (config.to_dict(), clips_dir))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ok = pc.not_equal(batch.column("status"), STORAGE_ERROR)
            checkpoint.commit(batch.filter(ok))  # one row per finished video, its clips as JSON
            batch = raise_storage_errors(batch)
            clip_rows = clip_rows_from_results(batch)
            frames = sum(n or 0 for n in batch.column("num_frames").to_pylist())
            progress.update(
                batch.num_rows,
                frames=frames,
                clips=len(clip_rows),
                too_short=sum(not c["passed"] for c in clip_rows),
                rejected=sum(s != "ok" for s in batch.column("status").to_pylist()),
            )
    progress.close()
    # Every video's result, this run's and those an interrupted run committed, into the clips table at once.
    committed = checkpoint.read(schema=SPLIT_RESULT_SCHEMA)
    split_results = committed if committed is not None else SPLIT_RESULT_SCHEMA.empty_table()
    clips_writer = manifest.TableWriter(output, "clips", prefix="split", replace_table=True)
    for batch in split_results.to_batches(max_chunksize=1000):
        clips_writer.write_rows(clip_rows_from_results(pa.Table.from_batches([batch])))
    clips_writer.close()
    split_results = split_results.drop_columns(["clips_json"])
    video_rejects = _rejects_from(split_results, "split", "video_id")
    clips = manifest.read_table(output, "clips", columns=["clip_id", "uri", "reject_reason", "passed"])
    bad = clips.filter(pc.invert(clips.column("passed")))
    clip_rejects = pa.table(
        {
            "stage": pa.array(["split"] * bad.num_rows, pa.string()),
            "item_id": bad.column("clip_id"),
            "uri": bad.column("uri"),
            "reason": bad.column("reject_reason"),
            "detail": pa.array(
                [
                    "frames in it were damaged: the decoder concealed errors (see videos.reject_detail)"
                    if reason == "decode_damaged"
                    else f"scene shorter than split.min_clip_s={config.split.min_clip_s} "
                    f"or split.min_clip_frames={config.split.min_clip_frames}"
                    for reason in bad.column("reject_reason").to_pylist()
                ],
                pa.string(),
            ),
        },
        schema=REJECTS_SCHEMA,
    )
    rejects = pa.concat_tables([video_rejects, clip_rejects])
    manifest.write_table(output, "rejects", rejects, prefix="split")
    _update_videos_after_split(output, videos, split_results)
    return StageResult(
        "split",
        time.monotonic() - start,
        counts={
            "videos": split_results.num_rows,
            "frames": sum(n or 0 for n in split_results.column("num_frames").to_pylist()),
            "clips": clips.num_rows,  # every clip row, as the funnel counts them
            "too_short": pc.sum(pc.equal(clips.column("reject_reason"), "too_short")).as_py() or 0,
            "damaged": pc.sum(pc.equal(clips.column("reject_reason"), "decode_damaged")).as_py() or 0,
            "rejected_videos": video_rejects.num_rows,
        },
        rejects_by_reason=_count_by(rejects.column("reason").to_pylist()),
        resumed=resumed,
    )


def _update_videos_after_split(output: str, videos: pa.Table, split_results: pa.Table) -> None:
    """Split decodes every frame: record exact frame counts and videos whose decode failed."""
    by_id = {r["video_id"]: r for r in split_results.to_pylist()}
    rows = videos.to_pylist()
    for row in rows:
        res = by_id.get(row["video_id"])
        if res is None or row["status"] != VideoStatus.OK.value:
            continue
        if res["status"] == VideoStatus.OK.value:
            row["num_frames"] = res["num_frames"]
            row["num_frames_exact"] = True
            if res.get("reject_detail"):  # kept, with a note (e.g. only the part before a cut-off decoded)
                row["reject_detail"] = res["reject_detail"]
        else:
            row.update(
                status=VideoStatus.REJECTED.value,
                reject_reason=res["reject_reason"],
                reject_detail=res["reject_detail"],
            )
    manifest.write_table(output, "videos", pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA), prefix="videos")


def _encode_meta(state: dict[str, Any]) -> dict[str, Any]:
    """The VAE facts an encode run recorded (what a repair that encodes nothing new must report again)."""
    bookkeeping = {"seconds", "counts", "rejects_by_reason", "status", "fingerprint", "settings", "updated_at"}
    return {k: v for k, v in state.items() if k not in bookkeeping and k != "repaired"}


DECODER_FAILURES = (RejectReason.DECODER_CRASH.value, RejectReason.DECODE_TIMEOUT.value)


def decoder_failure_alarm(config: RecapConfig, output: str) -> str | None:
    """One loud line when more than `isolation.max_decoder_failure_share` of the inputs were rejected for a
    crashed or hung decoder: that many is a sick worker or machine far more often than bad files."""
    if not manifest.table_exists(output, "videos"):
        return None
    reasons = manifest.read_table(output, "videos", columns=["reject_reason"]).column(0).to_pylist()
    failed = sum(r in DECODER_FAILURES for r in reasons)
    share = failed / len(reasons) if reasons else 0.0
    if share <= config.isolation.max_decoder_failure_share:
        return None
    return (
        f"RECAP RUN UNHEALTHY: {failed:,} of {len(reasons):,} input videos ({share:.0%}) were rejected "
        f"decoder_crash/decode_timeout, more than isolation.max_decoder_failure_share="
        f"{config.isolation.max_decoder_failure_share}. Check the workers (memory, install), then re-process them "
        f"with --retry-rejected {','.join(DECODER_FAILURES)}"
    )


def resolve_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(AVAILABLE_STAGES)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; allowed: {', '.join(STAGE_ORDER)}")
    missing = [s for s in stages if s not in AVAILABLE_STAGES]
    if missing:
        raise ValueError(f"--stages: {missing} not built yet; available now: {', '.join(AVAILABLE_STAGES)}")
    return sorted(set(stages), key=STAGE_ORDER.index)


def run_pipeline(
    config: RecapConfig,
    output: str,
    inputs: list[str] | None = None,
    stages: list[str] | None = None,
    address: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    retry_rejected: list[str] | None = None,
    lease: WriterLease | None = None,
) -> list[StageResult]:
    """Run the chosen stages in order on Ray and return what each did (`dry_run`: filter writes nothing).

    Writes happen under the corpus's writer lease: `lease`, the caller's (the CLI takes it before anything else),
    or one taken here; LeaseHeld when another writer holds it.

    Re-running resumes: a stage finished with the same settings is skipped, an interrupted one continues from
    its committed work; a stage that ran with other settings is refused (ConfigChanged) unless `force`.
    `retry_rejected`: reject reasons (e.g. decoder_crash) whose videos are processed again, and only those.
    """
    chosen = resolve_stages(stages)
    if retry_rejected and "ingest" not in chosen:
        raise ValueError("--retry-rejected re-processes videos from the ingest stage on: include it in --stages")
    uris: list[str] | None = None
    skipped: dict[str, int] = {}  # files the extension filter left out, by reason
    if "ingest" in chosen:
        if not inputs:
            raise ValueError("the ingest stage needs --input (files, directories, globs or URIs)")
        uris = discover_inputs(inputs, config.ingest.extensions, skipped)  # fail on a bad input before Ray starts
    elif "split" in chosen and not manifest.table_exists(output, "videos"):
        raise StageInputError(f"no videos table under {output}/manifest: run `recap ingest` first")
    elif chosen[0] == "filter" and not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run `recap split` first")
    # Everything from here writes OUT (a dry run writes nothing): under the corpus's writer lease.
    if dry_run:
        taken: Any = contextlib.nullcontext(None)
    elif lease is not None:
        taken = contextlib.nullcontext(lease)
    else:
        taken = WriterLease(
            output,
            f"python: run_pipeline(stages={','.join(chosen)})",
            timeout_s=config.lease.timeout_s,
            heartbeat_s=config.lease.heartbeat_s,
        )
    with taken as held:
        if held is not None and held.taken_over and lease is None:
            log.warning("recap: %s", held.taken_over)
        for repaired in manifest.recover_tables(output):
            log.warning("recap: %s", repaired)
        if retry_rejected:
            again = reopen_rejected(output, retry_rejected, config.to_dict())
            log.warning(
                "recap: --retry-rejected %s: %d video(s) to probe again, %d to split again",
                ",".join(retry_rejected),
                again.get("ingest", 0),
                again.get("split", 0),
            )
        state = RunState(output)
        plan = []
        for stage in chosen:  # decide every stage before any work: a refused config change costs nothing
            settings = stage_settings(config, stage)
            upstream = UPSTREAM[stage]
            # A stage run earlier in this command changes its fingerprint: resolved again when the stage starts.
            upstream_fp = None if upstream in chosen else state.fingerprint_of(upstream)
            if not (dry_run and stage == "filter") and upstream not in chosen:
                state.decide(
                    stage,
                    fingerprint(settings, upstream_fp, uris if stage == "ingest" else None),
                    settings,
                    force,
                    uris,
                )
            plan.append((stage, settings))
        results: list[StageResult] = []
        cfg_dict = config.to_dict()
        with RaySession(config, address):
            for stage, settings in plan:
                if dry_run and stage == "filter":
                    results.append(run_filter(config, output, dry_run=True))
                    continue
                held.check()  # a writer judged dead (its lease taken over) stops before it writes more
                fp = fingerprint(settings, state.fingerprint_of(UPSTREAM[stage]), uris if stage == "ingest" else None)
                action = state.decide(stage, fp, settings, force, uris)
                repaired = None
                if action == "skip":
                    previous = state.stages()[stage]
                    gone = missing_outputs(output, stage)
                    if not gone:
                        results.append(
                            StageResult(
                                stage,
                                0.0,
                                counts=previous.get("counts", {}),
                                rejects_by_reason=previous.get("rejects_by_reason", {}),
                                skipped=True,
                            )
                        )
                        continue
                    log.warning(
                        "recap: %s finished earlier but its outputs are missing: %s; redoing", stage, ", ".join(gone)
                    )
                    action, repaired = (
                        ("resume", gone) if stage == "encode" and gone[0].startswith("shards/") else ("run", gone)
                    )
                if action == "run":
                    state.mark_stale_after(stage, cfg_dict)
                checkpoint = StageCheckpoint(output, stage, fp, guard=getattr(held, "check", None))
                if repaired and action == "resume":  # keep the intact shards; re-encode the samples of the others
                    seed_encode_checkpoint(output, checkpoint, _encode_meta(state.stages()[stage]))
                state.start(stage, fp, settings, cfg_dict)
                try:
                    result = _run_stage(stage, config, output, inputs, uris, checkpoint, skipped)
                except Exception as exc:
                    failure = _infrastructure_failure(exc)
                    if failure is None:
                        raise
                    raise DecoderUnavailable(
                        f"the {stage} stage stopped: {failure} -- no video was rejected for it; fix the worker "
                        "(install, runtime env, memory) and re-run the same command to resume"
                    ) from None
                info = {
                    "seconds": result.seconds,
                    "counts": result.counts,
                    "rejects_by_reason": result.rejects_by_reason,
                    **result.info,
                }
                if repaired:
                    info["repaired"] = repaired
                held.check()
                state.finish(stage, fp, settings, cfg_dict, info)
                checkpoint.clear()
                results.append(result)
        return results


def _run_stage(
    stage: str,
    config: RecapConfig,
    output: str,
    inputs: list[str] | None,
    uris: list[str] | None,
    checkpoint: StageCheckpoint,
    skipped: dict[str, int] | None = None,
) -> StageResult:
    if stage == "ingest":
        return run_ingest(config, list(inputs or []), output, uris, checkpoint=checkpoint, skipped=skipped)
    if stage == "split":
        return run_split(config, output, checkpoint=checkpoint)
    if stage == "filter":
        return run_filter(config, output, checkpoint=checkpoint)
    if stage == "caption":
        return run_caption(config, output, checkpoint=checkpoint)
    return run_encode(config, output, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------
# filter

SCRATCH_SCORED = "_filter_scored"  # scores before decisions; ignored by readers (leading "_")
PREVIOUS_PREFIX = "previous:"  # marks a clip of an earlier corpus in near_duplicate_of


def _videos_with_clips(output: str) -> pa.Table:
    """One row per video with its clips as JSON: the filter decodes each video once."""
    import json

    from pipeline.schema import CLIPS_SCHEMA
    from pipeline.stages.filter import upstream_reason

    refilter = "filter_reasons" in manifest.table_columns(output, "clips")
    columns = list(CLIPS_SCHEMA.names) + (["filter_reasons"] if refilter else [])
    clips = manifest.read_table(output, "clips", columns=columns)
    by_video: dict[str, dict[str, Any]] = {}
    for row in clips.to_pylist():
        if refilter:  # filtered before: undo that run's decisions, keep earlier stages' (too_short)
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
            "video_id": [e["video_id"] for e in rows],
            "uri": [e["uri"] for e in rows],
            "fps": pa.array([e["fps"] for e in rows], pa.float64()),
            "clips_json": [json.dumps(e["clips"]) for e in rows],
            "num_clips": [len(e["clips"]) for e in rows],
        }
    )


def score_clips(config: RecapConfig, output: str, checkpoint: StageCheckpoint) -> dict[str, int]:
    """Score every clip on Ray, committing whole videos' scored clips to `checkpoint`; returns counts."""
    import ray.data

    from pipeline.stages.filter import ClipModelStage, FilterScoreStage, NsfwDetectStage, TextDetectStage

    videos = _videos_with_clips(output)
    expected = dict(zip(videos.column("video_id").to_pylist(), videos.column("num_clips").to_pylist(), strict=True))
    done = checkpoint.done("video_id")
    todo = videos.filter(pc.invert(pc.is_in(videos.column("video_id"), pa.array(sorted(done), pa.string()))))
    total_clips = sum(todo.column("num_clips").to_pylist())
    progress = _progress(config, "filter", total_clips, "clips")
    # Ray may cut blocks anywhere between the two map stages: a video is committed once all its clips arrived.
    partial: dict[str, list[pa.Table]] = {}
    ready: list[pa.Table] = []
    last_commit = time.monotonic()
    if todo.num_rows:
        ds = ray.data.from_arrow(todo.drop_columns(["num_clips"]), override_num_blocks=min(todo.num_rows, 1000))
        ds = _map_stage(ds, FilterScoreStage, config.filter.resources, (config.to_dict(),))
        if config.filter.text.enabled:
            ds = _map_stage(ds, TextDetectStage, config.filter.text.resources, (config.to_dict(),))
        if config.filter.nsfw.enabled:
            ds = _map_stage(ds, NsfwDetectStage, config.filter.nsfw.resources, (config.to_dict(),))
        if config.filter.clip.model:
            ds = _map_stage(ds, ClipModelStage, config.filter.clip.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if "frames_jpeg" in batch.column_names:
                batch = batch.drop_columns(["frames_jpeg"])
            ids = batch.column("video_id")
            for video_id in pc.unique(ids).to_pylist():
                rows = partial.setdefault(video_id, [])
                rows.append(batch.filter(pc.equal(ids, video_id)))
                if sum(t.num_rows for t in rows) >= expected[video_id]:
                    ready.extend(partial.pop(video_id))
            if ready and (sum(t.num_rows for t in ready) >= 1000 or time.monotonic() - last_commit > 30):
                checkpoint.commit(pa.concat_tables(ready, promote_options="permissive"))
                ready, last_commit = [], time.monotonic()
            progress.update(batch.num_rows)
    if ready:
        checkpoint.commit(pa.concat_tables(ready, promote_options="permissive"))
    progress.close()
    return {"clips": total_clips, "resumed_videos": len(done)}


def _band_rows(batch: pa.Table, thresholds: dict[str, Any], previous: bool, mirror: bool = True) -> pa.Table:
    """Clips that pass every other check, one row per LSH band key of their frame hashes (and, with `mirror`,
    of their mirrored frames' hashes, so that a mirrored copy shares a band with its source)."""
    from pipeline.scoring.dedup import band_keys
    from pipeline.stages.filter import decide, scoring_failures, upstream_reason

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
    import json

    from pipeline.scoring.dedup import duplicate_edges

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
    import json

    import ray.data

    from pipeline.scoring.dedup import resolve_duplicates

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
    from pipeline.schema import RejectReason
    from pipeline.stages.filter import decide, scoring_failures, upstream_reason

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
    from pipeline.stages.filter import decide, scoring_failures, upstream_reason

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
    config: RecapConfig, output: str, dry_run: bool = False, checkpoint: StageCheckpoint | None = None
) -> StageResult:
    """Score clips, dedupe across the corpus, decide; write `clips` with scores and filter rejects."""
    import shutil
    import tempfile

    from pipeline.schema import FILTERED_CLIPS_SCHEMA
    from pipeline.stages.filter import upstream_reason

    start = time.monotonic()
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run `recap split` first")
    previous = _previous_corpora(config)
    thresholds = {k: v.model_dump() for k, v in config.filter.thresholds.items()}
    scratch_out = tempfile.mkdtemp(prefix="recap-filter-dry-") if dry_run else output
    if dry_run:
        checkpoint = StageCheckpoint(scratch_out, "filter", "dry-run")
    else:
        checkpoint = _checkpoint(output, "filter", checkpoint)
    resumed = 0
    try:
        if dry_run and "phashes" in manifest.table_columns(output, "clips"):
            # Already scored: re-decide from the stored scores in seconds, nothing decoded.
            scored_paths = manifest.table_files(output, "clips")
        else:
            resumed = score_clips(config, output, checkpoint)["resumed_videos"]
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
        scored = checkpoint.read(schema=FILTERED_CLIPS_SCHEMA)
        if scored is None:
            scored = FILTERED_CLIPS_SCHEMA.empty_table()
        writer = manifest.TableWriter(
            output, "clips", prefix="filter", schema=FILTERED_CLIPS_SCHEMA, replace_table=True
        )
        reject_rows: list[dict[str, Any]] = []
        passed = 0
        for batch in scored.to_batches(max_chunksize=10_000):
            rows = [_filter_decisions(r, thresholds, dropped) for r in batch.to_pylist()]
            writer.write_rows(rows)
            for r in rows:
                passed += bool(r["passed"])
                if r["filter_reasons"] and r["reject_reason"] in r["filter_reasons"]:
                    detail = r.get("filter_detail") or ", ".join(r["filter_reasons"])
                    if r.get("near_duplicate_of") and r["reject_reason"] == "near_duplicate":
                        detail = f"near duplicate of {r['near_duplicate_of']}"
                    reject_rows.append(
                        {
                            "stage": "filter",
                            "item_id": r["clip_id"],
                            "uri": r["uri"],
                            "reason": r["reject_reason"],
                            "detail": detail,
                        }
                    )
        writer.close()
        manifest.write_table(
            output, "rejects", pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA), prefix="filter"
        )
    finally:
        if dry_run:
            shutil.rmtree(scratch_out, ignore_errors=True)
    return StageResult(
        "filter",
        time.monotonic() - start,
        counts={
            "clips": scored.num_rows,
            "passed": passed,
            "rejected": len(reject_rows),
            "near_duplicates": len(dropped),
        },
        rejects_by_reason=_count_by([r["reason"] for r in reject_rows]),
        resumed=resumed,
    )


# ---------------------------------------------------------------------------------------------
# caption


def _caption_match(config: RecapConfig, clips: pa.Table, captions: dict[str, dict[str, Any]]) -> dict[str, float]:
    """score_caption_match per captioned clip, when the filter stored CLIP embeddings and a CLIP model is set."""
    import ray.data

    from pipeline.stages.caption import CaptionMatchStage

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
    ds = _map_stage(ds, CaptionMatchStage, config.filter.clip.resources, (config.to_dict(),))
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
    from pipeline.schema import CAPTION_FIELDS, RejectReason
    from pipeline.stages.caption import CAPTIONS_SCHEMA, CaptionModelStage, CaptionPrepStage, caption_version

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
    checkpoint = _checkpoint(output, "caption", checkpoint)
    done = checkpoint.done("clip_id")
    resumed = len(done)
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("clip_id"), pa.array(sorted(done), pa.string()))))
    progress = _progress(config, "caption", todo.num_rows, "clips")
    if todo.num_rows:
        ds = ray.data.from_arrow(todo, override_num_blocks=min(todo.num_rows, 1000))
        ds = _map_stage(ds, CaptionPrepStage, cfg.preprocess_resources, (config.to_dict(),))
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
        ds = _map_stage(ds, CaptionModelStage, model_resources, (config.to_dict(),), runtime_env=env)
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
        rejects_by_reason=_count_by([r["reason"] for r in reject_rows]),
        info={
            "caption_version": version,
            "caption_model": cfg.model,
            "caption_prompt_version": prompt.version_id,
        },
        resumed=resumed,
    )


# ---------------------------------------------------------------------------------------------
# encode + shards


def _sample_meta(clip: dict[str, Any], latent_row: dict[str, Any]) -> dict[str, Any]:
    """KEY.json: the clip's ids, source, times, scores and caption model, plus how its latent was made."""
    keep = {k: v for k, v in clip.items() if k not in ("phashes", "clip_embedding") and not isinstance(v, bytes)}
    keep.update(json.loads(latent_row["vae_info"]))  # vae, vae_sha256, scaling/shift, latent_dtype, logvar_stored...
    keep.update(
        frame_indices=latent_row["frame_indices"],
        frame_stride=latent_row["frame_stride"],
        resize={"height": latent_row["height"], "width": latent_row["width"], "mode": "resize+center_crop"},
        latent_shape=latent_row["latent_shape"],
    )
    return keep


def _vae_spec(cfg: Any) -> dict[str, str | None]:
    """The VAE as a later reader (the trainer's sampler) loads it again: an absolute path or hub id, subfolder."""
    from pipeline.vae.load import resolve_vae_spec

    spec, subfolder = resolve_vae_spec(cfg.vae, cfg.vae_fallback, cfg.vae_subfolder)
    return {"vae_spec": spec, "vae_subfolder": subfolder}


def run_encode(config: RecapConfig, output: str, checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Encode every passing (and, when captioned, captioned) clip and write shards plus samples/shards tables."""
    import io

    import numpy as np
    import ray.data

    from pipeline.schema import RejectReason
    from pipeline.shards.writer import write_corpus_shards
    from pipeline.stages.encode import EncodeModelStage, EncodePrepStage
    from pipeline.vae.load import fallback_note

    start = time.monotonic()
    cfg = config.encode
    if not manifest.table_exists(output, "clips"):
        raise StageInputError(f"no clips table under {output}/manifest: run the earlier stages first")
    fallback = fallback_note(cfg.vae, cfg.vae_fallback)
    if fallback:
        log.warning("recap: WARNING: %s", fallback)
    clips = manifest.read_table(output, "clips")
    mask = pc.equal(clips.column("passed"), True)
    if "caption" in clips.column_names:
        mask = pc.and_(mask, pc.is_valid(clips.column("caption")))
    todo = clips.filter(mask)
    checkpoint = _checkpoint(output, "encode", checkpoint)
    done = checkpoint.done("key")  # samples in shards an interrupted run finished
    if done:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("clip_id"), pa.array(sorted(done), pa.string()))))
    by_id = {r["clip_id"]: r for r in todo.to_pylist()}
    # The clip's scores ride along in the samples table, so a trainer can filter on them before reading shards.
    score_fields = [f for f in clips.schema if f.name.startswith("score_")]
    score_columns = [f.name for f in score_fields]
    samples_schema = pa.schema(list(SAMPLES_SCHEMA) + score_fields)
    progress = _progress(config, "encode", todo.num_rows, "clips")
    reject_rows: list[dict[str, Any]] = []
    vae_info: dict[str, Any] = {}

    def samples():
        if not todo.num_rows:
            return
        cols = ["clip_id", "uri", "start_frame", "end_frame", "start_s", "fps"]
        if "caption" in todo.column_names:
            cols.append("caption")
        ds = ray.data.from_arrow(todo.select(cols), override_num_blocks=min(todo.num_rows, 1000))
        ds = _map_stage(ds, EncodePrepStage, cfg.prep_resources, (config.to_dict(),))
        ds = _map_stage(ds, EncodeModelStage, cfg.resources, (config.to_dict(),))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                clip = by_id[row["clip_id"]]
                if not vae_info:
                    vae_info.update(json.loads(row["vae_info"]), **_vae_spec(cfg))
                    if fallback:
                        vae_info["vae_fallback_note"] = fallback
                    checkpoint.save_meta(vae_info)
                if row["error"]:
                    reject_rows.append(
                        {
                            "stage": "encode",
                            "item_id": row["clip_id"],
                            "uri": clip["uri"],
                            "reason": RejectReason.ENCODE_ERROR.value,
                            "detail": row["error"],
                        }
                    )
                    continue
                latent = np.load(io.BytesIO(row["latent"]), allow_pickle=False)
                extra = {name: row[col] for name, col in (("logvar.npy", "logvar"), ("text_emb.npy", "text_emb"))}
                yield {
                    "key": row["clip_id"],
                    "latent": latent,
                    "caption": clip.get("caption") or "",
                    "meta": _sample_meta(clip, row),
                    "extra": {name: data for name, data in extra.items() if data},
                    "row": {
                        **{name: clip.get(name) for name in score_columns},
                        "latent_dtype": row["latent_dtype"],
                        "vae": row["vae"],
                        "vae_sha256": row["vae_sha256"],
                        "has_text_emb": bool(row["text_emb"]),
                        "logvar_stored": bool(row["logvar"]),
                        "num_frames": len(row["frame_indices"]),
                        "frame_stride": row["frame_stride"],
                        "height": row["height"],
                        "width": row["width"],
                    },
                }
            progress.update(batch.num_rows, rejected=sum(1 for e in batch.column("error").to_pylist() if e))

    counts = write_corpus_shards(
        output,
        samples(),
        max_bytes=cfg.shard_max_bytes,
        max_count=cfg.shard_max_count,
        samples_schema=samples_schema,
        checkpoint=checkpoint,
    )
    if not vae_info:  # nothing new encoded (all resumed): what the interrupted run recorded
        vae_info.update(checkpoint.load_meta())
    progress.close()
    manifest.write_table(output, "rejects", pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA), prefix="encode")
    return StageResult(
        "encode",
        time.monotonic() - start,
        counts={"clips": todo.num_rows + len(done), **counts, "rejected": len(reject_rows)},
        rejects_by_reason=_count_by([r["reason"] for r in reject_rows]),
        info=vae_info,
        resumed=len(done),
    )
