"""What every stage shares: batch in/batch out over pyarrow tables, and isolated decoding.

A stage is a callable class: `__init__` takes the config (and loads models, later), `__call__`
takes a batch (pyarrow table or dict of columns) and returns a table of its output schema.
Ray Data wires it with `map_batches`; tests call it directly.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import faults
from pipeline.config import RecapConfig
from pipeline.schema import RejectReason, table_of
from pipeline.video.isolation import IsolatedWorker, JobOutcome

REJECT_KEY = "__reject__"


def call_rejectable(target: str, *args: Any, **kwargs: Any) -> Any:
    """Child-side wrapper: a VideoRejected becomes a value, not an error, so its code survives."""
    from pipeline.video.decode import VideoRejected

    faults.decoder_job(target, args)
    module_name, func_name = target.rsplit(":", 1)
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return func(*args, **kwargs)
    except VideoRejected as exc:
        return {REJECT_KEY: [exc.reason.value, exc.detail]}


def rows_of(batch: pa.Table | dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, dict):
        columns = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        return [{k: _plain(v[i]) for k, v in columns.items()} for i in range(n)]
    raise TypeError(f"unsupported batch type {type(batch).__name__}")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class IsolatedStage:
    """Base for stages that decode video: each row's work runs in this worker's child process."""

    name: ClassVar[str] = "stage"
    input_columns: ClassVar[tuple[str, ...]] = ()
    output_schema: ClassVar[pa.Schema]

    def __init__(self, config: RecapConfig | dict[str, Any]):
        self.config = config if isinstance(config, RecapConfig) else RecapConfig.model_validate(config)
        self._worker: IsolatedWorker | None = None

    @property
    def worker(self) -> IsolatedWorker:
        if self._worker is None:
            iso = self.config.isolation
            self._worker = IsolatedWorker(
                stall_timeout_s=iso.stall_timeout_s,
                max_jobs_per_child=iso.max_jobs_per_child,
                start_timeout_s=iso.start_timeout_s,
                start_attempts=iso.start_attempts,
            )
        return self._worker

    def run_isolated(self, target: str, *args: Any) -> JobOutcome:
        """Run one file's job in the child. A crash is retried once in a fresh child (nothing else running in
        it) before it counts against the file; a child that cannot start raises DecoderUnavailable."""
        outcome = JobOutcome("error")
        attempts = self.config.isolation.max_attempts
        attempt = 0
        while True:
            outcome = self.worker.run("pipeline.stages.common:call_rejectable", target, *args, fresh=attempt > 0)
            attempt += 1
            if outcome.status in ("ok", "error"):
                return outcome
            if attempt >= attempts and not (outcome.status == "crash" and attempt < 2):
                break
        if attempt > 1:
            outcome.message += f" (on each of {attempt} attempts, each in a fresh process)"
        return outcome

    @staticmethod
    def reject_of(outcome: JobOutcome) -> tuple[str, str] | None:
        """The (reason, detail) of a failed job, or None when it succeeded."""
        if outcome.ok:
            if isinstance(outcome.result, dict) and REJECT_KEY in outcome.result:
                reason, detail = outcome.result[REJECT_KEY]
                return reason, detail
            return None
        if outcome.status == "timeout":
            return RejectReason.DECODE_TIMEOUT.value, outcome.message
        if outcome.status == "crash":
            return RejectReason.DECODER_CRASH.value, outcome.message
        return RejectReason.DECODE_ERROR.value, f"{outcome.error_type}: {outcome.message}"

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        faults.actor_call(self.name)
        rows = [self.process_row(row) for row in rows_of(batch)]
        return table_of(rows, self.output_schema)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __del__(self) -> None:
        self.close()
