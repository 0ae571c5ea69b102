"""Checkpoint files and sharded directories: only complete ones are picked and kept, and loading them runs no
foreign code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP saves: intended


def _sharded(path, step: int) -> None:
    """A one-process DCP checkpoint in the trainer's layout (what save_sharded writes, without a process group)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.full((2,), float(step))}, "ema": {"w": torch.zeros(2)}}
    own = {"data": {"batches": step}, "rng": {}, "generator": torch.zeros(1)}
    dcp.save({**state, "rank_0": (own,)}, checkpoint_id=str(path), no_dist=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))


def test_only_complete_checkpoints_are_picked_and_leftovers_are_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        _sharded(folder / f"step-0000000{step}", step)
    _sharded(folder / "step-00000003", 3)
    (folder / "step-00000003" / "meta.json").unlink()  # interrupted before meta.json: incomplete
    _sharded(folder / ".step-00000004.tmp", 4)  # interrupted before the rename
    assert latest_checkpoint(tmp_path).endswith("/step-00000002")
    ckpt = load_checkpoint(tmp_path)
    assert (
        ckpt["step"] == 2 and ckpt["model"]["w"].tolist() == [2.0, 2.0] and ckpt["data"]["ranks"] == [{"batches": 2}]
    )
    _sharded(folder / "step-00000005", 5)
    prune_checkpoints(tmp_path, keep=1)
    assert [p.rsplit("/", 1)[1] for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000005"]


def test_checkpoint_metadata_naming_a_foreign_callable_is_refused(tmp_path):
    run = tmp_path / "checkpoints" / "step-00000001"
    _sharded(run, 1)

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run / ".metadata").write_bytes(pickle.dumps(Payload()))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match=r"refers to (io|builtins)\.open, which DCP does not write"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_sharded_save_on_an_object_store_uri_commits_with_meta_json(tmp_path):
    # One gloo rank is enough to run save_sharded's collectives; memory:// stands in for an object store.
    import fsspec
    import torch.distributed as dist

    from trainer.checkpoint import save_sharded

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    url = f"memory://recap-tests/{tmp_path.name}/run"
    try:
        path = f"{url}/checkpoints/step-00000007"
        state = {"model": {"w": torch.arange(3.0)}, "ema": {"w": torch.ones(3)}}
        save_sharded(path, state, {"data": {"batches": 7}, "rng": {}, "generator": torch.zeros(1)}, {"step": 7,
                     "world_size": 1}, rank=0)  # fmt: skip
        memory = fsspec.filesystem("memory")
        assert [name.rsplit("/", 1)[1] for name in memory.ls(f"{url}/checkpoints", detail=False)] == [
            "step-00000007"
        ]  # written in place: no temporary directory to copy from
        assert sorted(name.rsplit("/", 1)[1] for name in memory.ls(path, detail=False)) == [
            ".metadata",
            "__0_0.distcp",
            "meta.json",
        ]
        ckpt = load_checkpoint(url)
        assert ckpt["step"] == 7 and ckpt["model"]["w"].tolist() == [0.0, 1.0, 2.0]
        assert ckpt["data"]["ranks"] == [{"batches": 7}]
    finally:
        dist.destroy_process_group()
        fsspec.filesystem("memory").rm(url, recursive=True)
