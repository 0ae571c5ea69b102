"""`recap run`: which stages run, in which order, and whether each is skipped, resumed or re-run.

The three layers: `pipeline.engine` (Ray session, wiring, commits, progress; it knows no stage), the stages in
`pipeline.stages` (each module holds its whole stage: what it reads, its transform, what it writes and commits),
and this module on top, which lists them and keeps run.json's record of each.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from pipeline import manifest
from pipeline.config import RecapConfig
from pipeline.engine import RaySession, StageResult, infrastructure_failure, stage_progress
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
    utc_now,
)
from pipeline.schema import RejectReason
from pipeline.stages.caption import run_caption
from pipeline.stages.encode import caption_encode_unfit, run_encode, stream_caption_encode
from pipeline.stages.filter import run_filter
from pipeline.stages.ingest import run_ingest
from pipeline.stages.split import run_split
from pipeline.stream import STREAMED, first_stream_unfit, stream_first_stages

log = logging.getLogger("recap")


STAGE_ORDER = ("ingest", "split", "filter", "caption", "encode")
AVAILABLE_STAGES = ("ingest", "split", "filter", "caption", "encode")


def _encode_meta(state: dict[str, Any]) -> dict[str, Any]:
    """The VAE facts an encode run recorded (what a repair that encodes nothing new must report again)."""
    bookkeeping = {"seconds", "counts", "rejects_by_reason", "status", "fingerprint", "settings", "updated_at"}
    bookkeeping |= {"started_at", "finished_at"}
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

        def begin(
            stage: str, settings: dict[str, Any], started_at: str | None = None
        ) -> tuple[str, StageCheckpoint, list[str] | None] | None:
            """Decide the stage again (an earlier stage of this command changed run.json); None when it is skipped
            (its result appended), else its fingerprint and checkpoint, and the stage marked running (since
            `started_at`: a stream's stages share its start)."""
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
                    return None
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
            state.start(stage, fp, settings, cfg_dict, started_at)
            return fp, checkpoint, repaired

        def finish(
            stage: str,
            settings: dict[str, Any],
            begun: tuple[str, StageCheckpoint, list[str] | None],
            result: StageResult,
        ) -> None:
            fp, checkpoint, repaired = begun
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

        with RaySession(config, address):
            if not dry_run and config.ray.streaming and _streams(config, state, plan, uris, force):
                _run_streamed(config, output, inputs, uris or [], skipped, plan[:3], begin, finish)
                plan = plan[3:]
            handled: set[str] = set()  # stages a caption -> encode stream already finished (or skipped)
            for stage, settings in plan:
                if dry_run and stage == "filter":
                    results.append(run_filter(config, output, dry_run=True))
                    continue
                if stage in handled:
                    continue
                begun = begin(stage, settings)
                if begun is None:
                    continue
                later = dict(plan)
                if stage == "caption" and "encode" in later and config.ray.streaming and not begun[1].parts():
                    handled |= _run_caption_encode(
                        config, output, state, settings, begun, later["encode"], begin, finish
                    )
                    if "caption" in handled:
                        continue
                with _infrastructure_stops(stage):
                    result = _run_stage(stage, config, output, inputs, uris, begun[1], skipped)
                finish(stage, settings, begun, result)
        return results


@contextlib.contextmanager
def _infrastructure_stops(what: str) -> Any:
    """A broken worker (DecoderUnavailable in a stage actor, which Ray reports as text) stops the run, one line."""
    try:
        yield
    except Exception as exc:
        failure = infrastructure_failure(exc)
        if failure is None:
            raise
        raise DecoderUnavailable(
            f"the {what} stage stopped: {failure} -- no video was rejected for it; fix the worker "
            "(install, runtime env, memory) and re-run the same command to resume"
        ) from None


def _streams(
    config: RecapConfig, state: RunState, plan: list[tuple[str, dict[str, Any]]], uris: list[str] | None, force: bool
) -> bool:
    """Whether `recap run` streams ingest, split and filter scoring together: all three are chosen and none was
    finished earlier (a finished ingest leaves split and filter to run, resumed, one at a time)."""
    if [stage for stage, _ in plan[:3]] != list(STREAMED):
        return False
    if unfit := first_stream_unfit(config):
        log.warning("recap: ingest, split and filter run one after the other, not streamed: %s", unfit)
        return False
    upstream = None
    for stage, settings in plan[:3]:
        fp = fingerprint(settings, upstream, uris if stage == "ingest" else None)
        action = state.decide(stage, fp, settings, force, uris)
        if action == "skip":
            return False
        if action == "run":
            return True  # the stages after a re-run one re-run too
        upstream = fp
    return True


def _run_streamed(
    config: RecapConfig,
    output: str,
    inputs: list[str] | None,
    uris: list[str],
    skipped: dict[str, int],
    plan: list[tuple[str, dict[str, Any]]],
    begin: Any,
    finish: Any,
) -> None:
    """Ingest, split and filter scoring as one stream (pipeline.stream), then each stage finishes as it does alone,
    in order: ingest writes `videos`, split `clips`, filter dedupes, decides and writes. run.json gets each stage's
    start (the stream's) and its own finish."""
    start, started_at = time.monotonic(), utc_now()
    begun = {}
    for stage, settings in plan:
        b = begin(stage, settings, started_at)
        assert b is not None, f"{stage} was to run, not be skipped"
        begun[stage] = b
    checkpoints = {stage: b[1] for stage, b in begun.items()}
    units = {"ingest": ("files", None), "split": ("videos", "frames"), "filter": ("clips", None)}
    progress = {s: stage_progress(config, s, 0, unit, rate=rate) for s, (unit, rate) in units.items()}
    with _infrastructure_stops("ingest/split/filter"):
        before = stream_first_stages(config, output, uris, checkpoints, progress)
    for stage, settings in plan:
        with _infrastructure_stops(stage):
            result = _run_stage(stage, config, output, inputs, uris, checkpoints[stage], skipped, progress[stage])
        result.seconds = time.monotonic() - start  # from the stream's start: the stages overlap
        result.resumed = before[stage]
        finish(stage, settings, begun[stage], result)


def _run_caption_encode(
    config: RecapConfig,
    output: str,
    state: RunState,
    caption_settings: dict[str, Any],
    caption_begun: tuple[str, StageCheckpoint, list[str] | None],
    encode_settings: dict[str, Any],
    begin: Any,
    finish: Any,
) -> set[str]:
    """Caption and encode as one stream (`stream_caption_encode`) when both start fresh, then each finishes as it
    does alone (finding nothing left but what a lost worker took). Returns the stages it finished or found
    skipped; an encode with committed work leaves both to run one at a time."""
    unfit = caption_encode_unfit(config)
    if unfit:
        log.warning("recap: caption and encode run one after the other, not streamed: %s", unfit)
        return set()
    start = time.monotonic()
    encode_begun = begin("encode", encode_settings)
    if encode_begun is None:
        return {"encode"}  # done earlier with these settings (begin recorded it): caption runs alone
    if encode_begun[1].parts():
        return set()
    started_at = state.stages()["caption"]["started_at"]
    state.start("encode", encode_begun[0], encode_settings, config.to_dict(), started_at)
    with _infrastructure_stops("caption/encode"):
        stream_caption_encode(config, output, caption_begun[1], encode_begun[1])
    for stage, settings, begun in (
        ("caption", caption_settings, caption_begun),
        ("encode", encode_settings, encode_begun),
    ):
        with _infrastructure_stops(stage):
            result = _run_stage(stage, config, output, None, None, begun[1])
        result.seconds = time.monotonic() - start  # from the stream's start: the stages overlap
        result.resumed = 0  # both started fresh: everything was done in this command
        if "resumed_shards" in result.counts:
            result.counts["resumed_shards"] = 0
        finish(stage, settings, begun, result)
    return {"caption", "encode"}


def _run_stage(
    stage: str,
    config: RecapConfig,
    output: str,
    inputs: list[str] | None,
    uris: list[str] | None,
    checkpoint: StageCheckpoint,
    skipped: dict[str, int] | None = None,
    progress: StageProgress | None = None,
) -> StageResult:
    if stage == "ingest":
        inputs = list(inputs or [])
        return run_ingest(config, inputs, output, uris, checkpoint=checkpoint, skipped=skipped, progress=progress)
    if stage == "split":
        return run_split(config, output, checkpoint=checkpoint, progress=progress)
    if stage == "filter":
        return run_filter(config, output, checkpoint=checkpoint, progress=progress)
    if stage == "caption":
        return run_caption(config, output, checkpoint=checkpoint)
    return run_encode(config, output, checkpoint=checkpoint)
