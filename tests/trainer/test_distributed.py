"""Scale-out on CPU (gloo): 2-process DDP under torchrun, FSDP2 (accumulation, sharded checkpoints and exact resume, one
torchrun launch of fsdp_worker.py) and a 2-worker Ray Train run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(config, corpus: Path, run: Path, *extra: str) -> None:
    config_file = run.parent / f"{run.name}.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "trainer.train", "--config", str(config_file), "--data", str(corpus), "--output", str(run), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _config(make_config, parallel: str):
    # Epoch mode: each rank reads its own shard of the two, so the ranks' batches are disjoint. Frame conditioning
    # on: per-frame timesteps must shard and reduce under FSDP as under DDP.
    return make_config(
        data={"batch_size": 2, "resampled": False, "window_shards": 1},
        train={"log_batch_keys": True, "parallel": parallel, "conditioning": {"image": 0.5, "ends": 0.25}},
    )


@pytest.fixture(scope="module")
def ddp_run(overfit_corpus, make_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    _torchrun(_config(make_config, "ddp"), overfit_corpus, run, "--steps", "3")
    return run


def test_torchrun_two_process_ddp(ddp_run, metrics_of):
    records = metrics_of(ddp_run)
    assert [r["step"] for r in records] == [1, 2, 3]  # rank 0 alone writes
    for r in records:
        rank0, rank1 = r["batch_keys"]
        assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1)
    ckpt = load_checkpoint(ddp_run)
    assert ckpt["step"] == 3 and len(ckpt["data"]["ranks"]) == 2
    assert json.loads((ddp_run / "config.json").read_text())["train"]["steps"] == 3


@pytest.fixture(scope="module")
def fsdp_runs(overfit_corpus, make_config, tmp_path_factory) -> Path:
    """tests/trainer/fsdp_worker.py under torchrun: FSDP2 accumulation, a 3-step FSDP run, and the same run stopped
    at step 2 and resumed (through a file:// run directory)."""
    out = tmp_path_factory.mktemp("fsdp")
    config_file = out / "config.yaml"
    cfg = _config(make_config, "fsdp").to_dict()
    cfg["train"]["steps"] = 3
    config_file.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(ROOT / "tests" / "trainer" / "fsdp_worker.py"), str(config_file), str(overfit_corpus), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_fsdp_run_matches_ddp(ddp_run, fsdp_runs, metrics_of):
    # FSDP2 on CPU (gloo): the same data and, within float tolerance, the same weights as the DDP run.
    run = fsdp_runs / "fsdp"
    assert [r["batch_keys"] for r in metrics_of(run)] == [r["batch_keys"] for r in metrics_of(ddp_run)]
    fsdp, ddp = load_checkpoint(run), load_checkpoint(ddp_run)
    assert fsdp["step"] == 3
    for part in ("model", "ema"):
        for name, tensor in ddp[part].items():
            assert torch.allclose(fsdp[part][name], tensor, atol=1e-5, rtol=1e-4), (part, name)


def test_sharded_checkpoint_resumes_fsdp_exactly(fsdp_runs, metrics_of):
    # Every rank wrote its own shards (no gathered copy), and the run stopped at step 2 and resumed from them
    # (through a file:// URI) ends where the uninterrupted run ends: the same weights, EMA and batches.
    straight, resumed = fsdp_runs / "fsdp", fsdp_runs / "resumed"
    step3 = resumed / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in step3.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    meta = json.loads((step3 / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    a, b = load_checkpoint(straight, optimizer=True), load_checkpoint(resumed, optimizer=True)
    assert a["step"] == b["step"] == 3 and len(b["data"]["ranks"]) == 2
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.allclose(tensor, b[part][name], atol=1e-6, rtol=0), (part, name)
    for name, state in a["optimizer"]["state"].items():
        assert torch.allclose(state["exp_avg_sq"], b["optimizer"]["state"][name]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert a["data"] == b["data"]
    assert [r["batch_keys"] for r in metrics_of(straight)] == [r["batch_keys"] for r in metrics_of(resumed)]
    assert [r["step"] for r in metrics_of(resumed)] == [1, 2, 3]


def test_fsdp2_accumulation_matches_one_big_batch(fsdp_runs):
    # 2 ranks x 2 micro-batches of 1, reduce-scatter only after the last, against the 4 samples at once.
    result = torch.load(fsdp_runs / "accumulation.pt", weights_only=True)
    assert result["grads_after_first_micro"] == 0
    for name, grad in result["big_batch"].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(result["accumulated"][name], grad, atol=1e-6, rtol=1e-4), name


def test_ray_train_two_workers(ray_session, overfit_corpus, make_config, metrics_of, tmp_path):
    from trainer.train import run_ray

    # The run directory as a file:// URI: the workers' sharded checkpoint and the driver's metrics read go through
    # fsspec.
    cfg = make_config(data={"batch_size": 2}, train={"steps": 2})
    summary = run_ray(cfg, str(overfit_corpus), f"file://{tmp_path / 'run'}", num_workers=2)
    assert summary["step"] == 2
    assert [r["step"] for r in metrics_of(tmp_path / "run")] == [1, 2]
    assert latest_checkpoint(tmp_path / "run").endswith("/checkpoints/step-00000002")  # sharded (DCP)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 2 and len(ckpt["data"]["ranks"]) == 2


def test_multi_node_runs_refuse_a_run_directory_on_one_machines_disk(tmp_path):
    from pipeline.errors import StageInputError
    from trainer.distributed import check_shared_run_dir, filesystem_of

    check_shared_run_dir(tmp_path / "run", nodes=1)  # one node: any directory
    with pytest.raises(
        StageInputError, match=r"on a \S+ filesystem of this machine, but the training ranks run on 2 nodes"
    ):
        check_shared_run_dir(tmp_path / "run", nodes=2)
    check_shared_run_dir(tmp_path / "run", nodes=2, assume_shared=True)
    assert filesystem_of("/dev/shm") == "tmpfs"


def test_sample_and_export_read_a_sharded_checkpoint(fsdp_runs, tmp_path):
    import argparse

    from trainer.cli import add_commands
    from trainer.sample import sample_video

    run = f"file://{fsdp_runs / 'resumed'}"
    result = sample_video(run, "a rabbit", tmp_path / "clip.mp4", steps=1, frames=1)
    assert result.frames == 1 and (tmp_path / "clip.mp4").stat().st_size > 0
    parser = argparse.ArgumentParser(prog="recap")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-checkpoint", run, "--output", str(tmp_path / "weights.pt")])
    assert args.handler(args) == 0
    exported = torch.load(tmp_path / "weights.pt", weights_only=True)
    sharded = load_checkpoint(fsdp_runs / "resumed")
    assert exported["step"] == 3 and "optimizer" not in exported and exported["model_args"] == sharded["model_args"]
    for part in ("model", "ema"):
        for name, tensor in sharded[part].items():
            assert torch.equal(exported[part][name], tensor), (part, name)
