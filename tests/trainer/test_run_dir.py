"""Run directories on fsspec URIs: a run on memory:// trains, resumes and samples; one process's memory is refused
for several processes, and a file:// URI gets the same shared-filesystem check as its local path."""

from __future__ import annotations

import json

import pytest
import torch

from trainer import run_dir as rd
from trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from trainer.sample import sample_video
from trainer.train import train


@pytest.fixture
def memory_run(tmp_path):
    import fsspec

    url = f"memory://recap-tests/{tmp_path.name}/run"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_a_run_on_memory_uri_trains_resumes_and_samples(overfit_corpus, make_config, memory_run, tmp_path):
    cfg = make_config(data={"batch_size": 2}, train={"steps": 3, "log_batch_keys": True, "keep_checkpoints": 1})
    assert train(cfg, str(overfit_corpus), memory_run, stop_at=2)["step"] == 2
    summary = train(cfg, str(overfit_corpus), memory_run)
    assert summary["step"] == 3 and summary["run_dir"] == memory_run
    records = [json.loads(line) for line in rd.read_text(rd.join(memory_run, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads(rd.read_text(rd.join(memory_run, "config.json")))["train"]["steps"] == 3
    assert [rd.basename(p) for p in list_checkpoints(memory_run)] == ["step-00000003.pt"]  # pruned to 1
    assert rd.listdir(rd.join(memory_run, "checkpoints")) == ["step-00000003.pt"]  # no temporary files left
    # The same weights as the run straight through on a local disk.
    train(cfg, str(overfit_corpus), tmp_path / "local")
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(memory_run)
    for name, tensor in a["ema"].items():
        assert torch.allclose(tensor, b["ema"][name], atol=1e-6, rtol=0), name
    result = sample_video(memory_run, "a rabbit", tmp_path / "clip.mp4", steps=1, frames=1)
    assert result.frames == 1 and (tmp_path / "clip.mp4").stat().st_size > 0


def test_a_checkpoint_file_replaces_the_old_one_whole(memory_run):
    path = rd.join(memory_run, "checkpoints", "step-00000001.pt")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.zeros(2)}})
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(2)}})
    assert load_checkpoint(memory_run)["model"]["w"].tolist() == [1.0, 1.0]


def test_memory_run_dirs_are_refused_for_several_processes_and_file_uris_are_checked(tmp_path):
    from pipeline.errors import StageInputError
    from trainer.distributed import check_shared_run_dir

    check_shared_run_dir("memory://run", nodes=1, processes=1)
    with pytest.raises(StageInputError, match=r"in one process's memory, but this run has 2 processes"):
        check_shared_run_dir("memory://run", nodes=1, processes=2)
    check_shared_run_dir("s3://bucket/run", nodes=4, processes=32)  # an object store is one namespace for all
    with pytest.raises(StageInputError, match=r"filesystem of this machine, but the training ranks run on 2 nodes"):
        check_shared_run_dir(f"file://{tmp_path}/run", nodes=2, processes=2)
