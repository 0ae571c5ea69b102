"""One torchrun launch (2 CPU ranks, gloo) of the FSDP2 checks, so the suite pays for process start-up once:

1. gradient accumulation under FSDP2 as the trainer does it (`set_requires_gradient_sync(False)` on the non-final
   micro-batch, the loss divided by the micro-batch count) against one big batch on an unsharded copy:
   OUT/accumulation.pt;
2. a 3-step FSDP run in OUT/fsdp (local path), and the same run stopped at step 2 and resumed in OUT/resumed
   through a file:// URI (sharded DCP checkpoints both ways).

Usage: torchrun --nproc-per-node 2 tests/trainer/fsdp_worker.py CONFIG.yaml CORPUS OUT
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def accumulation(out: Path) -> None:
    from trainer.distributed import init_distributed, parallelize
    from trainer.model import build_model

    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model("tiny", 4, 8)
    with torch.no_grad():  # away from adaLN-Zero's zeros, so every parameter gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = copy.deepcopy(model)
    sharded = parallelize(model, info, fsdp=True, bf16=False)
    # One global batch of 4 (the same on every rank); each rank trains on its 2 as 2 micro-batches of 1.
    x, v = torch.randn(4, 4, 2, 4, 4), torch.randn(4, 4, 2, 4, 4)
    t, text, mask = torch.rand(4), torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool)
    mine = [2 * info.rank, 2 * info.rank + 1]
    unsynced = None
    for micro, i in enumerate(mine):
        last = micro == len(mine) - 1
        sharded.set_requires_gradient_sync(last)
        loss = F.mse_loss(sharded(x[i : i + 1], t[i : i + 1], text[i : i + 1], mask[i : i + 1]), v[i : i + 1])
        (loss / len(mine)).backward()
        if not last:  # no reduce-scatter ran: the sharded .grad of every parameter is still unset
            unsynced = sum(p.grad is not None for p in sharded.parameters())
    accumulated = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    F.mse_loss(reference(x, t, text, mask), v).backward()
    if info.is_main:
        big = {n: p.grad for n, p in reference.named_parameters()}
        torch.save({"accumulated": accumulated, "big_batch": big, "grads_after_first_micro": unsynced}, out)


def main(config_file: str, corpus: str, out: str) -> None:
    from trainer.config import load_train_config
    from trainer.train import train

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    root = Path(out)
    accumulation(root / "accumulation.pt")
    cfg = load_train_config(config_file)
    train(cfg, corpus, root / "fsdp")
    resumed = f"file://{root / 'resumed'}"
    assert train(cfg, corpus, resumed, stop_at=2)["step"] == 2
    train(cfg, corpus, resumed)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
