"""Resuming a run: stage fingerprints and states in run.json, and per-stage checkpoints of finished work.

A stage's fingerprint hashes the settings that change its output (not resources or devices) and the
fingerprint of the stage it reads from. Re-running a finished stage with the same fingerprint skips it; with
another, recap refuses unless forced. While a stage runs, each finished batch of work (videos, clips, shards)
is committed to `manifest/_work/<stage>/` so a crashed run redoes only what was not committed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults, manifest
from pipeline.errors import StageInputError

# The stage each stage reads from (its fingerprint is part of the next one's).
UPSTREAM = {"ingest": None, "split": "ingest", "filter": "split", "caption": "filter", "encode": "caption"}
# Settings that change how fast or where a stage runs, not what it writes: not part of a fingerprint.
_RUNTIME_KEYS = {
    "resources",
    "prep_resources",
    "preprocess_resources",
    "device",
    "batch_size",
    "frames_per_batch",
    "concurrency",
    "threads",
}


class ConfigChanged(StageInputError):
    """A finished (or half-finished) stage would be re-run with other settings: refused unless forced."""


def _stable(section: Any) -> Any:
    if isinstance(section, dict):
        return {k: _stable(v) for k, v in sorted(section.items()) if k not in _RUNTIME_KEYS}
    if isinstance(section, list):
        return [_stable(v) for v in section]
    return section


def stage_settings(config: Any, stage: str) -> dict[str, Any]:
    """The part of the config that decides what `stage` writes."""
    return _stable(config.to_dict()[stage])


def fingerprint(settings: dict[str, Any], upstream: str | None, extra: Any = None) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}")
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def utc_now() -> str:
    """ISO 8601 in UTC to the millisecond: stages that overlap, or follow within a second, stay ordered."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class RunState:
    """The stages' states in run.json: what ran, with which fingerprint, and whether it finished."""

    def __init__(self, out: str):
        self.out = out

    def stages(self) -> dict[str, Any]:
        return manifest.read_run_json(self.out).get("stages", {})

    def fingerprint_of(self, stage: str | None) -> str | None:
        if stage is None:
            return None
        return self.stages().get(stage, {}).get("fingerprint")

    def decide(self, stage: str, fp: str, settings: dict[str, Any], force: bool, uris: list[str] | None = None) -> str:
        """'skip' (done, same settings), 'resume' (started, same settings) or 'run'; raises ConfigChanged.

        `uris`: ingest's input files, to name the ones added or removed since the stage ran."""
        state = self.stages().get(stage)
        if not state or "fingerprint" not in state:
            return "run"
        if state["fingerprint"] == fp:
            return "skip" if state.get("status") == "done" else "resume"
        if state.get("status") == "stale" or force:
            return "run"
        changes = _diff(state.get("settings", {}), settings, stage)
        if changes:
            why = "; ".join(changes)
        elif UPSTREAM[stage] is None:
            why = self._input_changes(uris or [])
        else:
            why = f"the {UPSTREAM[stage]} stage it reads from changed"
        done = "finished" if state.get("status") == "done" else "started"
        raise ConfigChanged(
            f"{self.out}: the {stage} stage {done} with other settings ({why}). Refusing to mix outputs: "
            f"re-run with --force to redo {stage} (and mark the stages after it for re-running), or use another "
            "--output"
        )

    def _input_changes(self, uris: list[str]) -> str:
        before = set(manifest.read_table(self.out, "videos", columns=["uri"]).column("uri").to_pylist())
        now = set(uris)
        parts = []
        for label, names in (("added", sorted(now - before)), ("removed", sorted(before - now))):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                parts.append(f"{len(names)} input file(s) {label}: {shown}")
        return "; ".join(parts) or "the input files changed"

    def start(
        self, stage: str, fp: str, settings: dict[str, Any], config: dict[str, Any], started_at: str | None = None
    ) -> str:
        """The stage is running (since `started_at`, e.g. when a stream that does its work began; default now)."""
        started_at = started_at or utc_now()
        state = {"status": "running", "fingerprint": fp, "settings": settings, "started_at": started_at}
        self._update(config, stage, state)
        return started_at

    def finish(self, stage: str, fp: str, settings: dict[str, Any], config: dict[str, Any], info: dict) -> None:
        """The stage is done: `info` plus when it started (this command's start of it) and finished."""
        started_at = self.stages().get(stage, {}).get("started_at")
        state = {"status": "done", "fingerprint": fp, "settings": settings, "started_at": started_at}
        self._update(config, stage, {**info, **state, "finished_at": utc_now()})

    def mark_stale_after(self, stage: str, config: dict[str, Any]) -> None:
        """Stages downstream of a re-run stage read outputs that changed: they re-run without --force."""
        order = list(UPSTREAM)
        for later in order[order.index(stage) + 1 :]:
            state = self.stages().get(later)
            if state and state.get("status") != "stale":
                manifest.update_run_json(self.out, config, later, {**state, "status": "stale"}, keep=True)

    def _update(self, config: dict[str, Any], stage: str, info: dict[str, Any]) -> None:
        manifest.update_run_json(self.out, config, stage, info)


STAGED = ".staged"  # a checkpoint's folder of parts workers wrote and the driver has not committed


def stage_part(work_uri: str, table: pa.Table, key: tuple[str, ...]) -> str | None:
    """On a worker: write `table` as a staged part of the checkpoint at `work_uri` (`StageCheckpoint.uri`), named
    by a hash of its `key` columns, so a retried batch writes the same file; returns the name (None: no rows).
    Nothing is committed until the driver adopts the part (`StageCheckpoint.adopt`)."""
    if table.num_rows == 0:
        return None
    columns = [table.column(k).to_pylist() for k in key]
    keys = "\n".join(sorted("\t".join(str(v) for v in row) for row in zip(*columns, strict=True)))
    name = hashlib.sha256(keys.encode()).hexdigest()[:24] + ".parquet"
    manifest.write_part(f"{work_uri.rstrip('/')}/{STAGED}", name, table)
    return name


class StageCheckpoint:
    """Committed results of a stage's finished work under `manifest/_work/<stage>/`, one Parquet part per commit.

    A part appears under its final name only when whole (temporary name, then rename); a checkpoint written
    with another fingerprint is discarded on open. Workers write their results as staged parts (`stage_part`)
    which the driver commits by renaming them (`adopt`): the rows never pass through the driver. Opening a
    checkpoint removes the staged parts a crash left uncommitted (like the temporary files, their names start
    with a dot).
    """

    def __init__(self, out: str, stage: str, fp: str, guard: Any = None):
        self.stage = stage
        self.guard = guard  # called before every commit: the writer lease's check (a run judged dead stops)
        self.uri = f"{out.rstrip('/')}/manifest/_work/{stage}"  # workers write side outputs under it
        self.fs, self.dir = manifest._fs(self.uri)
        marker = f"{self.dir}/fingerprint"
        if self.fs.exists(self.dir):
            old = self.fs.cat_file(marker).decode() if self.fs.exists(marker) else None
            if old != fp:
                self.fs.rm(self.dir, recursive=True)
        self.fs.makedirs(self.dir, exist_ok=True)
        if not self.fs.exists(marker):
            self.fs.pipe_file(marker, fp.encode())
        for path in self.fs.ls(self.dir, detail=False):
            if path.rsplit("/", 1)[-1].startswith("."):  # a part whose write a crash interrupted
                self.fs.rm(path, recursive=True)
        self._seq = len(self.parts())
        self._taken: set[str] = set()  # staged parts adopted or discarded

    def parts(self) -> list[str]:
        return sorted(p for p in self.fs.ls(self.dir, detail=False) if p.endswith(".parquet"))

    def commit(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.guard is not None:
            self.guard()
        final = self._next_part()
        tmp = f"{self.dir}/.{final.rsplit('/', 1)[-1]}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        self.fs.mv(tmp, final)
        self._seq += 1
        faults.after_commit(self.stage)

    def _next_part(self) -> str:
        return f"{self.dir}/part-{self._seq:06d}-{uuid.uuid4().hex[:6]}.parquet"

    def adopt(self, name: str, keep: tuple[str, set[str]] | None = None) -> None:
        """Commit the staged part `name` as it is (a rename); with `keep` (a column and its values to keep), only
        those rows: the driver then reads the part and commits the rows it keeps itself, the rare path of a part
        that mixes rows to commit with rows another file already committed (identical files)."""
        if name in self._taken:
            return  # the same batch's record seen twice (a block Ray cut in two)
        self._taken.add(name)
        staged = f"{self.dir}/{STAGED}/{name}"
        if keep is not None:
            with self.fs.open(staged, "rb") as fh:
                table = pq.read_table(fh)
            column, values = keep
            self.commit(table.filter(pc.is_in(table.column(column), pa.array(sorted(values), pa.string()))))
            self.fs.rm(staged)
            return
        if self.guard is not None:
            self.guard()
        self.fs.mv(staged, self._next_part())
        self._seq += 1
        faults.after_commit(self.stage)

    def discard(self, name: str) -> None:
        """Drop a staged part none of whose rows are to be committed."""
        if name not in self._taken:
            self._taken.add(name)
            self.fs.rm(f"{self.dir}/{STAGED}/{name}")

    def read(self, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table | None:
        tables = []
        for path in self.parts():
            with self.fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns, schema=schema))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    def save_meta(self, meta: dict[str, Any]) -> None:
        """Facts about the work (e.g. which VAE made the latents) that a resumed run must report too."""
        self.fs.pipe_file(f"{self.dir}/meta.json", json.dumps(meta, sort_keys=True).encode())

    def load_meta(self) -> dict[str, Any]:
        path = f"{self.dir}/meta.json"
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else {}

    def done(self, column: str) -> set[str]:
        table = self.read(columns=[column])
        return set(table.column(column).to_pylist()) if table is not None else set()

    def clear(self) -> None:
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)
        parent = self.dir.rsplit("/", 1)[0]
        if self.fs.exists(parent) and not self.fs.ls(parent, detail=False):
            self.fs.rm(parent, recursive=True)


# The tables each stage writes: a finished stage whose table is gone is re-run.
STAGE_TABLES = {"ingest": ("videos",), "split": ("clips",), "filter": ("clips",), "caption": ("captions",)}


def missing_outputs(out: str, stage: str) -> list[str]:
    """What a finished stage committed that is no longer there (cheap: names and sizes, no hashing)."""
    problems = [f"the {name} table" for name in STAGE_TABLES.get(stage, ()) if not manifest.table_exists(out, name)]
    if problems and stage == "split" and not _any_ok_video(out):
        problems = []  # every video was rejected before split: it had no clips table to write
    if stage == "split" and not problems and "clip_uri" in manifest.table_columns(out, "clips"):
        uris = [u for u in manifest.read_table(out, "clips", columns=["clip_uri"]).column(0).to_pylist() if u]
        if uris:
            fs, _ = manifest._fs(uris[0])
            gone = [u for u in uris if not fs.exists(u)]
            if gone:
                problems.append(f"{len(gone)} clip file(s) under media/clips (e.g. {gone[0]})")
    if stage == "encode":
        problems += [f"the {n} table" for n in ("samples", "shards") if not manifest.table_exists(out, n)]
        if not problems:
            problems += [f"shards/{name}" for name in damaged_shards(out)]
    return problems


def _any_ok_video(out: str) -> bool:
    statuses = manifest.read_table(out, "videos", columns=["status"]).column(0).to_pylist()
    return "ok" in statuses


def damaged_shards(out: str) -> list[str]:
    """Shards in the `shards` table whose file is missing or has another size than recorded."""
    fs, shard_dir = manifest._fs(f"{out.rstrip('/')}/shards")
    sizes = {}
    if fs.exists(shard_dir):
        sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(shard_dir, detail=True)}
    table = manifest.read_table(out, "shards", columns=["shard", "bytes"])
    return [row["shard"] for row in table.to_pylist() if sizes.get(row["shard"]) != row["bytes"]]


def seed_encode_checkpoint(out: str, checkpoint: StageCheckpoint, meta: dict[str, Any]) -> int:
    """Commit the intact shards of a finished encode to its checkpoint, so a re-run redoes only the rest.

    Returns how many samples were kept."""
    from pipeline.shards.corpus import keep_intact_shards

    kept = keep_intact_shards(out, checkpoint, set(damaged_shards(out)))
    checkpoint.save_meta(meta)
    return kept


def reopen_rejected(
    out: str,
    reasons: list[str],
    config: dict[str, Any],
    split_results: Callable[[pa.Table, list[str], StageCheckpoint], None],
) -> dict[str, int]:
    """Make the videos rejected for `reasons` (e.g. decoder_crash) work to do again, and nothing else.

    Ingest and split go back to "running" with their finished work committed as checkpoints minus those videos,
    so a resumed run probes or splits exactly them; the stages after split read a clips table that changes, so
    they are marked stale (re-run). `split_results(kept, again, checkpoint)` commits the split results of the
    videos split keeps (`kept`: their per-video columns; their clips are in `clips`, which it reads on Ray
    workers) less the video ids in `again`. Returns how many videos each stage gives back."""
    from pipeline.schema import SPLIT_RESULT_SCHEMA, VIDEOS_SCHEMA, RejectReason, VideoStatus

    known = {r.value for r in RejectReason}
    unknown = [r for r in reasons if r not in known]
    if unknown:
        raise ValueError(f"--retry-rejected: unknown reason(s) {unknown}; allowed: {', '.join(sorted(known))}")
    state = RunState(out)
    stages = state.stages()
    if "ingest" not in stages or not manifest.table_exists(out, "videos"):
        return {}
    videos = manifest.read_table(out, "videos").select(VIDEOS_SCHEMA.names).to_pylist()  # a small table
    rejected_by: dict[str, str] = {}  # video_id -> the stage that rejected it (split wins over a duplicate's ingest)
    for r in manifest.read_table(out, "rejects", columns=["stage", "item_id"]).to_pylist():
        if r["stage"] == "split" or (r["stage"] == "ingest" and r["item_id"] not in rejected_by):
            rejected_by[r["item_id"]] = r["stage"]
    again = {
        v["uri"]: rejected_by.get(v["video_id"], "ingest")
        for v in videos
        if v["status"] == VideoStatus.REJECTED.value and v["reject_reason"] in reasons
    }
    counts = {"ingest": sum(s == "ingest" for s in again.values()), "split": sum(s == "split" for s in again.values())}
    if not again:
        return counts
    seed = []
    for row in videos:
        if again.get(row["uri"]) == "ingest":
            continue  # probed again
        if again.get(row["uri"]) == "split":  # its probe was fine: split decodes it again
            row = {**row, "status": VideoStatus.OK.value, "reject_reason": None, "reject_detail": None}
        seed.append(row)
    _reopen(state, "ingest", pa.Table.from_pylist(seed, schema=VIDEOS_SCHEMA), config)
    if "split" in stages and manifest.table_exists(out, "clips"):
        retried = sorted({v["video_id"] for v in videos if v["uri"] in again})
        kept: dict[str, dict[str, Any]] = {}
        for v in videos:
            if v["video_id"] in retried or v["video_id"] in kept:
                continue
            if v["status"] == VideoStatus.OK.value:
                kept[v["video_id"]] = {**_result(v, "ok"), "num_frames": v["num_frames"]}
            elif rejected_by.get(v["video_id"]) == "split" and v["reject_reason"] != RejectReason.DUPLICATE_FILE.value:
                kept[v["video_id"]] = {**_result(v, v["status"]), "reject_reason": v["reject_reason"]}
        table = pa.Table.from_pylist(list(kept.values()), schema=SPLIT_RESULT_SCHEMA).drop_columns(["clips_json"])
        _reopen(state, "split", None, config, lambda checkpoint: split_results(table, retried, checkpoint))
        state.mark_stale_after("split", config)
    else:
        state.mark_stale_after("ingest", config)
    return counts


def _result(video: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "video_id": video["video_id"],
        "uri": video["uri"],
        "status": status,
        "reject_detail": video["reject_detail"] if status != "ok" else None,
    }


def _reopen(
    state: RunState,
    stage: str,
    done: pa.Table | None,
    config: dict[str, Any],
    fill: Callable[[StageCheckpoint], None] | None = None,
) -> None:
    """Commit a finished stage's results, less what is to be redone, as its checkpoint (`done`, or what `fill`
    commits to it); mark it running."""
    info = state.stages()[stage]
    checkpoint = StageCheckpoint(state.out, stage, info["fingerprint"])
    for part in checkpoint.parts():
        checkpoint.fs.rm(part)
    if done is not None:
        checkpoint.commit(done)
    if fill is not None:
        fill(checkpoint)
    manifest.update_run_json(state.out, config, stage, {**info, "status": "running"})
