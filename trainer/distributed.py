"""Process groups and model parallelisation, kept apart from the model: one process (CPU or GPU), torchrun or
Ray Train workers (DDP, gloo on CPU / NCCL on GPU), FSDP2 `fully_shard` per block for large presets on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (torchrun); Ray Train creates and destroys its own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for but no CUDA device is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto", device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun (env RANK/WORLD_SIZE) or Ray Train set up; a lone process needs none."""
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = device or pick_device(device_preference, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device, owns)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def use_fsdp(strategy: str, info: DistInfo, num_params: int, fsdp_min_params: int) -> bool:
    if not info.distributed:
        return False
    if strategy == "fsdp":
        return True
    return strategy == "auto" and info.device.type == "cuda" and num_params >= fsdp_min_params


def parallelize(model: nn.Module, info: DistInfo, fsdp: bool, bf16: bool) -> nn.Module:
    """DDP, or FSDP2 with each transformer block its own shard unit (params in bf16, reductions in fp32)."""
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _full(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().to("cpu", copy=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (every rank must call it: FSDP gathers)."""
    return {k: _full(v) for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    module = unwrap(model)
    own = module.state_dict()
    fixed = {}
    for name, value in state.items():
        target = own[name]
        if hasattr(target, "device_mesh"):  # FSDP2 DTensor: keep only this rank's shard
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        fixed[name] = value
    module.load_state_dict(fixed)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool
) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    )


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# Dense bf16 tensor-core peaks (NVIDIA datasheets), matched on the whole device name without "NVIDIA ": variants of one
# chip differ (H100 SXM 989, NVL 835, PCIe 756), so a name matches exactly one pattern or none (MFU is then left out).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100 (80GB HBM3|SXM5?( \d+GB)?)", 989.4),
    (r"H100 NVL", 835.5),
    (r"H100 PCIe", 756.5),
    (r"H200( SXM)?( \d+GB)?( HBM3e)?", 989.4),
    (r"H200 NVL", 835.5),
    (r"A100[- ](SXM4|PCIE)[- ](40|80)GB", 312.0),
    (r"L40S", 362.05),
    (r"L40", 181.05),
    (r"L4", 121.0),
    (r"A10", 125.0),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its exact device name (e.g. 'NVIDIA H100 PCIe'), None when not listed."""
    import re

    bare = name.removeprefix("NVIDIA ").strip()
    for pattern, value in PEAK_BF16_TFLOPS:
        if re.fullmatch(pattern, bare, flags=re.IGNORECASE):
            return value
    return None


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Dense bf16 peak of the GPU (for MFU), from the config or the device name; None on CPU or unknown GPUs."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


# Filesystems whose paths every node of a cluster can share (network and cluster filesystems, FUSE mounts of
# object stores). A run directory elsewhere is one machine's disk.
SHARED_FS_TYPES = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "fuse",
    "9p",
)


def filesystem_of(path: str | os.PathLike) -> str:
    """The type of the filesystem holding `path` (its nearest existing parent), from the mount table."""
    import psutil

    target = os.path.realpath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    best, fstype = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = target == mount or target.startswith(mount.rstrip("/") + "/") or mount == "/"
        if inside and len(mount) >= len(best):
            best, fstype = mount, part.fstype
    return fstype


def check_shared_run_dir(path: str | os.PathLike, nodes: int, assume_shared: bool = False, processes: int = 1) -> None:
    """Every rank reads RUN/ for the latest checkpoint and writes its own state there: with ranks on several
    nodes, RUN/ must be one shared directory, not each machine's own. RUN may be an fsspec URI: object stores
    (s3://, gs://, ...) are shared; memory:// is one process's memory, refused for several processes.
    Raises StageInputError naming the fix."""
    from pipeline.errors import StageInputError
    from trainer.run_dir import local_path, protocol

    local = local_path(path)
    if local is None:
        if protocol(path) == "memory" and processes > 1:
            raise StageInputError(
                f"the run directory {path} is in one process's memory, but this run has {processes} processes "
                "(training ranks, or Ray workers and the driver): use a file:// path or a store every process "
                "reaches (s3://, gs://, ...)"
            )
        return
    if nodes <= 1 or assume_shared:
        return
    fstype = filesystem_of(local)
    if any(fstype.lower().startswith(kind) for kind in SHARED_FS_TYPES):
        return
    raise StageInputError(
        f"the run directory {path} is on a {fstype} filesystem of this machine, but the training ranks run on "
        f"{nodes} nodes: each would read and write its own copy of RUN/ (checkpoints, resume positions, metrics). "
        "Put --output on a filesystem every node mounts at the same path (NFS, Lustre, GPFS, a FUSE mount of "
        "object storage) or on an object store URI (s3://..., gs://...), or set train.assume_shared_run_dir: true "
        "if it is shared in a way recap cannot see"
    )
