"""`recap run`: which stages run, in which order, and whether each is skipped, resumed or re-run.

The three layers: `pipeline.engine` (Ray session, wiring, commits, progress; it knows no stage), the stages in
`pipeline.stages` (each module holds its whole stage: what it reads, its transform, what it writes and commits),
and this module on top, which lists them and keeps run.json's record of each.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from pipeline import manifest
from pipeline.config import RecapConfig
from pipeline.engine import RaySession, StageResult, infrastructure_failure
from pipeline.errors import DecoderUnavailable, StageInputError
from pipeline.io.sources import discover_inputs
from pipeline.lease import WriterLease
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
from pipeline.schema import RejectReason
from pipeline.stages.caption import run_caption
from pipeline.stages.encode import run_encode, stream_caption_encode
from pipeline.stages.filter import run_filter
from pipeline.stages.ingest import run_ingest
from pipeline.stages.split import run_split

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
        streamed: dict[str, tuple[str, dict[str, Any]]] = {}  # stage -> (started_at, work done in a stream)
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
                if stage == "caption" and "encode" in chosen and config.ray.streaming:
                    streamed.update(_stream_caption_encode(config, output, state, action, fp, checkpoint, force, held))
                started_at, done_here = streamed.get(stage, (None, {}))
                state.start(stage, fp, settings, cfg_dict, started_at)
                try:
                    result = _run_stage(stage, config, output, inputs, uris, checkpoint, skipped)
                except Exception as exc:
                    failure = infrastructure_failure(exc)
                    if failure is None:
                        raise
                    raise DecoderUnavailable(
                        f"the {stage} stage stopped: {failure} -- no video was rejected for it; fix the worker "
                        "(install, runtime env, memory) and re-run the same command to resume"
                    ) from None
                if done_here:  # the stream before this call did that work in this command: not "resumed"
                    result.resumed = max(0, result.resumed - done_here.get("items", 0))
                    if "resumed_shards" in result.counts:
                        result.counts["resumed_shards"] -= done_here.get("shards", 0)
                    result.seconds += done_here.get("seconds", 0.0)
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


def _stream_caption_encode(
    config: RecapConfig,
    output: str,
    state: RunState,
    action: str,
    caption_fp: str,
    caption_checkpoint: StageCheckpoint,
    force: bool,
    held: Any,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run caption and encode as one streaming pipeline when both start fresh (nothing committed in either);
    the stages then finish as usual. Returns what the stream did per stage, for their run.json records."""
    import time

    if action == "skip" or caption_checkpoint.parts():
        return {}
    settings = stage_settings(config, "encode")
    fp = fingerprint(settings, caption_fp)
    if action != "run" and state.decide("encode", fp, settings, force) == "skip":
        return {}
    if action == "run":
        state.mark_stale_after("caption", config.to_dict())
    encode_checkpoint = StageCheckpoint(output, "encode", fp, guard=getattr(held, "check", None))
    if encode_checkpoint.parts():
        return {}
    cfg_dict = config.to_dict()
    started_at = state.start("caption", caption_fp, stage_settings(config, "caption"), cfg_dict)
    state.start("encode", fp, settings, cfg_dict, started_at)
    start = time.monotonic()
    done = stream_caption_encode(config, output, caption_checkpoint, encode_checkpoint)
    seconds = time.monotonic() - start
    return {
        "caption": (started_at, {"items": done["caption"], "seconds": seconds}),
        "encode": (started_at, {"items": done["encode"], "shards": done["shards"], "seconds": seconds}),
    }


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
