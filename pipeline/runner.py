"""`recap run`: which stages run, in which order, and whether each is skipped, resumed or re-run.

The three layers: `pipeline.engine` (Ray session, wiring, commits, progress; it knows no stage), the stages in
`pipeline.stages` (each module holds its whole stage: what it reads, its transform, what it writes and commits),
and this module on top, which lists them (`STAGES`, and the `STREAMS` of consecutive stages that run as one
pipeline) and keeps run.json's record of each. Nothing here is particular to one stage: what a stage reads,
needs, counts or repairs is declared by its module's `STAGE`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

from pipeline import manifest
from pipeline.config import RecapConfig
from pipeline.engine import (
    RaySession,
    Stage,
    StageResult,
    StageRun,
    StreamGroup,
    infrastructure_failure,
    stage_progress,
)
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
    stage_settings,
    utc_now,
)
from pipeline.schema import RejectReason
from pipeline.stages import caption, encode, filter, ingest, split  # noqa: A004 - the stage module
from pipeline.stream import FIRST_STAGES

log = logging.getLogger("recap")


# The stages in order, and the runs of consecutive stages that stream as one pipeline when all run together.
STAGES: dict[str, Stage] = {s.name: s for s in (ingest.STAGE, split.STAGE, filter.STAGE, caption.STAGE, encode.STAGE)}
STREAMS: tuple[StreamGroup, ...] = (FIRST_STAGES, encode.CAPTION_ENCODE)
STAGE_ORDER = tuple(STAGES)
AVAILABLE_STAGES = STAGE_ORDER


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
    elif (needs := STAGES[chosen[0]].needs) and not manifest.table_exists(output, needs[0]):
        raise StageInputError(needs[1].format(output=output))
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
    with taken as held, contextlib.ExitStack() as ray_up:  # Ray comes up early only for --retry-rejected
        if held is not None and held.taken_over and lease is None:
            log.warning("recap: %s", held.taken_over)
        for repaired in manifest.recover_tables(output):
            log.warning("recap: %s", repaired)
        if retry_rejected:
            ray_up.enter_context(RaySession(config, address))
            split_results = functools.partial(STAGES["split"].reopen, output)  # type: ignore[arg-type]
            again = reopen_rejected(output, retry_rejected, config.to_dict(), split_results)
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
                fixable = STAGES[stage].repairable
                action, repaired = ("resume", gone) if fixable and fixable(gone) else ("run", gone)
            if action == "run":
                state.mark_stale_after(stage, cfg_dict)
            checkpoint = StageCheckpoint(output, stage, fp, guard=getattr(held, "check", None))
            if repaired and action == "resume":  # keep what is intact; redo only what is missing
                STAGES[stage].repair(output, checkpoint, state.stages()[stage])  # type: ignore[misc]
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

        def run_one(stage: str, settings: dict[str, Any], begun: Any, restart: bool = False) -> None:
            """Run a begun stage alone (`restart`: begun with a stream that did not happen: it starts now)."""
            if restart:
                state.start(stage, begun[0], settings, cfg_dict)
            with _infrastructure_stops(stage):
                result = STAGES[stage].run(StageRun(config, output, begun[1], inputs, uris, skipped))
            finish(stage, settings, begun, result)

        with RaySession(config, address):  # (reuses the Ray of ray_up)
            i = 0
            while i < len(plan):
                stage, settings = plan[i]
                if dry_run and STAGES[stage].dry_run is not None:
                    results.append(STAGES[stage].dry_run(config, output))
                    i += 1
                    continue
                group = _stream_at(plan, i) if config.ray.streaming and not dry_run else None
                if group is not None:
                    took = plan[i : i + len(group.stages)]
                    handled = _run_group(group, took, config, output, inputs, uris, skipped, begin, finish, run_one)
                    if handled:
                        i += handled
                        continue
                begun = begin(stage, settings)  # alone (a group that does not fit the cluster: its first stage)
                if begun is not None:
                    run_one(stage, settings, begun)
                i += 1
        return results


def _stream_at(plan: list[tuple[str, dict[str, Any]]], i: int) -> StreamGroup | None:
    """The stream group whose stages are the plan's from `i` on, if any."""
    names = tuple(stage for stage, _ in plan[i:])
    return next((g for g in STREAMS if names[: len(g.stages)] == g.stages), None)


def _run_group(
    group: StreamGroup,
    plan: list[tuple[str, dict[str, Any]]],
    config: RecapConfig,
    output: str,
    inputs: list[str] | None,
    uris: list[str] | None,
    skipped: dict[str, int],
    begin: Any,
    finish: Any,
    run_one: Any,
) -> int:
    """Run a stream group's stages as one pipeline, then let each finish as it does alone (run.json: the stream's
    start, each stage's own finish). When the pools do not fit the cluster, a stage was done earlier, or (a
    group that does not resume) a stage has committed work, the stages begun so far run one at a time instead.
    Returns how many of the plan's stages it took care of (0: none, the pools do not fit; the caller runs them
    one at a time)."""
    names = ", ".join(group.stages)
    if unfit := group.unfit(config):
        log.warning("recap: %s run one after the other, not streamed: %s", names, unfit)
        return 0
    start, started_at = time.monotonic(), utc_now()
    begun: dict[str, Any] = {}
    for stage, settings in plan:
        b = begin(stage, settings, started_at)
        if b is None:  # done earlier with these settings (begin recorded it): the others run alone
            break
        begun[stage] = b
    fresh = all(not b[1].parts() for b in begun.values())
    if len(begun) < len(plan) or not (group.resumes or fresh):
        for k, (stage, settings) in enumerate(plan[: len(begun)]):
            run_one(stage, settings, begun[stage], restart=k > 0)
        return len(begun) + (len(begun) < len(plan))
    checkpoints = {stage: b[1] for stage, b in begun.items()}
    progress = {s: stage_progress(config, s, 0, STAGES[s].unit, rate=STAGES[s].rate) for s in group.stages}
    with _infrastructure_stops("/".join(group.stages)):
        streamed = group.run(config, output, uris or [], checkpoints, progress)
    for stage, settings in plan:
        with _infrastructure_stops(stage):
            run = StageRun(config, output, checkpoints[stage], inputs, uris, skipped, progress[stage])
            result = STAGES[stage].run(run)
        result.seconds = time.monotonic() - start  # from the stream's start: the stages overlap
        result.resumed = streamed[stage].resumed
        result.counts.update({k: v for k, v in streamed[stage].counts.items() if k in result.counts})
        finish(stage, settings, begun[stage], result)
    return len(plan)


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
