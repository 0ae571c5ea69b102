"""Scale-out on CPU: 2-process DDP under torchrun (gloo) and a 2-worker Ray Train run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.checkpoint import load_checkpoint

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


def test_fsdp_run_matches_ddp(ddp_run, overfit_corpus, make_config, metrics_of, tmp_path):
    # FSDP2 on CPU (gloo): the same data and, within float tolerance, the same weights as the DDP run.
    run = tmp_path / "run"
    _torchrun(_config(make_config, "fsdp"), overfit_corpus, run, "--steps", "3")
    assert [r["batch_keys"] for r in metrics_of(run)] == [r["batch_keys"] for r in metrics_of(ddp_run)]
    fsdp, ddp = load_checkpoint(run), load_checkpoint(ddp_run)
    assert fsdp["step"] == 3
    for part in ("model", "ema"):
        for name, tensor in ddp[part].items():
            assert torch.allclose(fsdp[part][name], tensor, atol=1e-5, rtol=1e-4), (part, name)


def test_ray_train_two_workers(ray_session, overfit_corpus, make_config, metrics_of, tmp_path):
    from trainer.train import run_ray

    cfg = make_config(data={"batch_size": 2}, train={"steps": 2})
    summary = run_ray(cfg, str(overfit_corpus), tmp_path / "run", num_workers=2)
    assert summary["step"] == 2
    assert [r["step"] for r in metrics_of(tmp_path / "run")] == [1, 2]
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
