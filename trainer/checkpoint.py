"""Checkpoints of a run in RUN/checkpoints/, RUN a local path or any fsspec URI (trainer.run_dir).

One process writes `step-NNNNNNNN.pt`: tensors and plain values, loaded with torch.load(weights_only=True). Several
ranks write `step-NNNNNNNN/` with torch.distributed.checkpoint (DCP): each rank its own shards of model, EMA and
optimizer plus its own data position and RNG (`rank_R`), rank 0 the run's metadata (`meta.json`). Both are written
under a temporary name and renamed (DCP directories on object stores, where a rename is a copy, in place); a
directory counts only once `meta.json` is in it (written last), so a reader never picks half a checkpoint. `load_checkpoint` reads either into the same dict (a DCP directory consolidated).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import run_dir as rd

_FILE = re.compile(r"^step-(\d{8})\.pt$")
_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> str:
    return rd.join(rd.normalize(run_dir), "checkpoints", f"step-{step:08d}" + ("" if sharded else ".pt"))


def is_sharded(path: str | Path) -> bool:
    """A DCP checkpoint directory (not a single .pt file)."""
    return _DIR.match(rd.basename(str(path))) is not None


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoints of a run (files and DCP directories), oldest first."""
    folder = rd.join(rd.normalize(run_dir), "checkpoints")
    found = []
    for name in rd.listdir(folder):
        if _FILE.match(name) or (_DIR.match(name) and rd.exists(rd.join(folder, name, META))):
            found.append((int(name[5:13]), name))
    return [rd.join(folder, name) for _, name in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint (file or DCP directory), or a run directory (its latest checkpoint)."""
    p = rd.normalize(path)
    if is_sharded(p) and rd.exists(rd.join(p, META)):
        return p
    if rd.is_dir(p):
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"{p} holds no complete checkpoints/step-*")
        return latest
    if not rd.exists(p):
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = rd.normalize(path)
    folder, name = path.rsplit("/", 1)
    rd.makedirs(folder)
    tmp = rd.join(folder, f".{name}.tmp")
    with rd.open_file(tmp, "wb") as f:
        torch.save(state, f)
    rd.move(tmp, path)


def _load_file(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    with rd.open_file(path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", optimizer: bool = False
) -> dict[str, Any]:
    """A checkpoint as one dict: a .pt file as saved, a DCP directory consolidated to the same layout (full
    tensors on CPU; its optimizer state, keyed by parameter name, only when `optimizer`)."""
    path = resolve_checkpoint(path)
    if not is_sharded(path):
        return _load_file(path, map_location)
    meta = read_meta(path)
    keys = {"model", "ema", *(f"rank_{r}" for r in range(meta["world_size"]))} | (
        {"optimizer"} if optimizer else set()
    )
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # As torch's dcp_to_torch_save does (dcp.load fills only keys it is given), with the safe reader and planner.
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=_reader(path), planner=_safe_planners()[1](keys=keys), no_dist=True)
    ranks = [state.pop(f"rank_{r}")[0] for r in range(meta["world_size"])]
    state.update({k: v for k, v in meta.items() if k != "world_size"})
    state["data"] = {"ranks": [r["data"] for r in ranks]}
    state["rng"] = [r["rng"] for r in ranks]
    state["generator"] = [r["generator"] for r in ranks]
    if map_location != "cpu":
        state["model"] = {k: v.to(map_location) for k, v in state["model"].items()}
        state["ema"] = {k: v.to(map_location) for k, v in state["ema"].items()}
    return state


def export_checkpoint(path: str | Path, output: str | Path) -> str:
    """One .pt file (weights, EMA, config, data positions; no optimizer) from a checkpoint or run directory: what
    `recap sample` and other tools load without torch.distributed. Returns the checkpoint it came from."""
    source = resolve_checkpoint(path)
    save_checkpoint(output, {k: v for k, v in load_checkpoint(source).items() if k != "optimizer"})
    return source


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints, and leftovers of interrupted saves older than them."""
    complete = list_checkpoints(run_dir)
    for old in complete[:-keep]:
        rd.remove(old)
    if not complete:
        return
    folder, newest = rd.join(rd.normalize(run_dir), "checkpoints"), rd.basename(complete[-1])
    for name in rd.listdir(folder):
        step = re.match(r"^\.?step-(\d{8})", name)
        if step and rd.join(folder, name) not in complete and f"step-{step.group(1)}" < newest[:13]:
            rd.remove(rd.join(folder, name))


def read_meta(path: str) -> dict[str, Any]:
    return json.loads(rd.read_text(rd.join(path, META)))


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def _writer(path: str) -> Any:
    if rd.is_uri(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # fsspec streams have no file descriptor to fsync: an object is committed when its stream closes.
        return FsspecWriter(path, sync_files=rd.local_path(path) is not None)
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(path)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: allow only the classes DCP writes there, so loading runs no foreign code."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self._ALLOWED_MODULES or (module, name) in self._ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which DCP does not write")


def _reader(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    base = FsspecReader if rd.is_uri(path) else FileSystemReader

    class SafeReader(base):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner(base: type) -> type:
    class SafePlanner(base):
        """Non-tensor entries are loaded with weights_only=True (DCP's default planner unpickles anything)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._nested_dict import set_element

            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner


def _safe_planners() -> tuple[type, type]:
    """DCP's load planner (into a given state dict) and its empty-state-dict variant (rebuilds the checkpoint's
    own layout, as dcp_to_torch_save does), both with safe non-tensor loads."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    return _safe_planner(DefaultLoadPlanner), _safe_planner(_EmptyStateDictLoadPlanner)


def save_sharded(path: str, state: dict[str, Any], own: dict[str, Any], meta: dict[str, Any], rank: int) -> None:
    """Every rank (a collective): its shards of `state` (model, EMA, optimizer: DTensors stay sharded) and its own
    `own` entry (data position, RNG) under `rank_R`; then rank 0 commits: renames the finished directory and writes
    meta.json into it. On object stores (no rename: a move copies every shard) the directory is written in place
    and meta.json, one object written last, is the commit alone."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder, name = path.rsplit("/", 1)
    in_place = rd.local_path(path) is None
    target = path if in_place else rd.join(folder, f".{name}.tmp")
    if rank == 0:
        rd.remove(target)  # left by an interrupted save of the same step
        rd.makedirs(folder)
    dist.barrier()
    # dcp.save returns on rank 0 after every rank's files are written and rank 0 wrote .metadata.
    # A tuple is one DCP entry (a dict would be flattened key by key): this rank's state in one small blob.
    dcp.save({**state, f"rank_{rank}": (own,)}, storage_writer=_writer(target))
    if rank == 0:
        if not in_place:
            rd.move(target, path)
        rd.write_text(rd.join(path, META), json.dumps(meta, indent=1))  # last: marks the checkpoint complete
    dist.barrier()


def load_sharded(path: str, state: dict[str, Any], rank: int | None) -> dict[str, Any] | None:
    """Load `path` into `state` in place (each rank reads its own shards; a collective under a process group) and
    return this rank's `own` entry, or None when `rank` is None (the checkpoint was written by another world size)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    request = dict(state)
    if rank is not None:
        request[f"rank_{rank}"] = (None,)
    alone = not (dist.is_available() and dist.is_initialized())  # one process resuming a multi-rank run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # that is the intent
        dcp.load(request, storage_reader=_reader(path), planner=_safe_planners()[0](), no_dist=alone)
    state.update({k: v for k, v in request.items() if k in state})
    return request[f"rank_{rank}"][0] if rank is not None else None


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """The global RNGs (torch CPU and CUDA, Python, NumPy) as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *(float(v) for v in np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
