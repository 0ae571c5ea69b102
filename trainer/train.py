"""The training loop (after DiT's train.py): rectified-flow loss, AdamW with warm-up + cosine, gradient clipping and
accumulation, EMA, checkpoints with exact resume, one JSON line of metrics per step.

The same `train()` runs in one process, under torchrun (DDP, or FSDP for large presets on GPU) and in Ray Train
workers (`run_ray`). `python -m trainer.train ...` (or `recap train`) is the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer import run_dir as rd
from trainer.checkpoint import (
    checkpoint_path,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    prune_checkpoints,
    read_meta,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from trainer.conditioning import draw_given_frames
from trainer.config import TrainConfig
from trainer.data import Corpus, ResumableLoader, open_corpus
from trainer.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    check_shared_run_dir,
    cleanup,
    full_model_state,
    init_distributed,
    load_model_state,
    load_optimizer_state,
    mean_across_ranks,
    optimizer_state,
    parallelize,
    peak_tflops,
    unwrap,
    use_fsdp,
)
from trainer.flow import flow_matching_loss
from trainer.model import DiT, build_model, count_params
from trainer.text import TextConditioner

log = logging.getLogger("recap.train")


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR after `step` optimizer steps: linear warm-up, then cosine to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Ema:
    """Exponential moving average of the parameters in fp32 (sharded like them under FSDP)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().clone().float() for n, p in unwrap(model).named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        names = list(self.params)
        params = dict(unwrap(model).named_parameters())
        torch._foreach_lerp_(
            [self.params[n] for n in names], [params[n].detach().float() for n in names], 1 - self.decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        from trainer.distributed import _full

        return {n: _full(t) for n, t in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            target = self.params[name]
            if hasattr(target, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.float(), target.device_mesh, target.placements)
            target.copy_(value)


def tokens_per_sample(shape: Sequence[int], patch: Sequence[int]) -> int:
    return math.prod(-(-d // p) for d, p in zip(shape[-3:], patch, strict=True))


class MetricsLog:
    """metrics.jsonl (one object per step), console lines, and TensorBoard scalars when asked for; rank 0 only.

    On a local run directory each line is appended as it comes; on other fsspec URIs (object stores cannot append)
    the file is rewritten whole at every `flush` (each checkpoint) and at `close`."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = rd.join(run_dir, "metrics.jsonl")
        local = rd.local_path(run_dir)
        self.file = open(rd.join(local, "metrics.jsonl"), "a", buffering=1) if enabled and local else None  # noqa: SIM115
        self.lines: list[str] | None = None
        if enabled and local is None:
            self.lines = rd.read_text(self.path).splitlines(keepends=True) if rd.exists(self.path) else []
        self.tb = None
        if enabled and tensorboard:
            if local is None:
                raise ValueError(f"train.tensorboard writes event files to a local directory; {run_dir} is not one")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(rd.join(local, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        else:
            self.lines.append(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        if self.lines is not None:
            rd.write_text(self.path, "".join(self.lines))

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _setup_logging(info: DistInfo) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO if info.is_main else logging.WARNING)


def train(
    config: TrainConfig,
    data: str | list[str],
    output: str | Path,
    stop_at: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train (or resume the run in `output`) until config.train.steps, or `stop_at` steps; returns a summary.

    Every process of a torchrun / Ray Train job calls this; rank 0 writes metrics and checkpoints.
    """
    info = init_distributed(config.train.device, device)
    _setup_logging(info)
    try:
        return Trainer(config, data, rd.normalize(output), info).run(stop_at)
    finally:
        cleanup(info)


class Trainer:
    """One rank's model, optimizer, EMA, loader and run directory; `run` trains, `train_step` is one step."""

    def __init__(self, config: TrainConfig, data: str | list[str], run_dir: str, info: DistInfo):
        self.cfg = config
        self.info = info
        self.run_dir = run_dir  # a local path or an fsspec URI (trainer.run_dir)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))  # torchrun: ranks on this node
        nodes = -(-info.world_size // max(1, local))
        check_shared_run_dir(run_dir, nodes, config.train.assume_shared_run_dir, processes=info.world_size)
        if info.is_main:
            rd.makedirs(run_dir)
        cfg = config
        self.corpus: Corpus = open_corpus(data, cfg.data)
        log.info("data: %s", self.corpus.summary())
        on_cuda = info.device.type == "cuda"
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_cuda)
        encoder = cfg.data.text_encoder if self.corpus.text_emb_dim is None else None
        self.text = TextConditioner(
            encoder, str(info.device), cfg.data.text_max_length, trust_remote_code=cfg.data.trust_remote_code
        )
        self.text_encoder_id = encoder or self.corpus.text_encoder
        text_dim = self.corpus.text_emb_dim or self.text.dim
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model.preset, self.corpus.latent_channels, text_dim, **cfg.model.overrides())
        self.num_params = count_params(model)
        log.info(
            "model: DiT-%s, %.2fM parameters, args %s", cfg.model.preset, self.num_params / 1e6, model.args.to_dict()
        )
        model.activation_checkpointing = cfg.train.activation_checkpointing
        model.to(info.device)
        self.fsdp = use_fsdp(cfg.train.parallel, info, self.num_params, cfg.train.fsdp_min_params)
        self.model = parallelize(model, info, self.fsdp, self.bf16)
        self.module: DiT = unwrap(self.model)
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.ema = Ema(self.model, cfg.train.ema_decay)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, fused=on_cuda
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr_ratio),
        )
        self.generator = torch.Generator(info.device).manual_seed(cfg.train.seed * 1_000_003 + info.rank)
        self.step = 0
        data_state = self._resume()
        self.loader = ResumableLoader(self.corpus, cfg.data, info.rank, info.world_size, data_state, on_cuda)
        self.peak = peak_tflops(info.device, cfg.train.peak_tflops)

    def _resume(self) -> dict[str, Any] | None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None
        if is_sharded(path):
            return self._resume_sharded(path)
        ckpt = load_checkpoint(path)
        load_model_state(self.model, ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(self.model, self.optimizer, ckpt["optimizer"], self.fsdp)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        ranks = ckpt["data"]["ranks"]
        log.info("resumed from %s at step %d", path, self.step)
        if len(ranks) != self.info.world_size:
            log.warning(
                "the checkpoint was written by %d ranks, this run has %d: data restarts from fresh positions",
                len(ranks),
                self.info.world_size,
            )
            return None
        set_rng_state(ckpt["rng"][self.info.rank])
        self.generator.set_state(ckpt["generator"][self.info.rank].to("cpu"))
        return ranks[self.info.rank]

    def _resume_sharded(self, path: str) -> dict[str, Any] | None:
        # Each rank reads its own shards of model, EMA and optimizer (resharded if the world size changed) and, when
        # the world size is the same, its own data position and RNG.
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = read_meta(path)
        same_world = meta["world_size"] == self.info.world_size
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "ema": self.ema.params, "optimizer": optim_state}
        own = load_sharded(path, state, self.info.rank if same_world else None)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)
        if own is None:
            log.warning(
                "the checkpoint was written by %d ranks, this run has %d: data restarts from fresh positions",
                meta["world_size"],
                self.info.world_size,
            )
            return None
        set_rng_state(own["rng"])
        self.generator.set_state(own["generator"].to("cpu"))
        return own["data"]

    def _meta(self) -> dict[str, Any]:
        """The run's plain values saved with every checkpoint (what `recap sample` needs besides the weights)."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "model_args": self.module.args.to_dict(),
            "config": self.cfg.to_dict(),
            "vae": dict(self.corpus.vae),
            "latent_shape": list(self.corpus.latent_shape),
            "text_encoder": self.text_encoder_id,
            "text_max_length": self.cfg.data.text_max_length,
        }

    def _checkpoint(self) -> None:
        if self.info.distributed:
            self._checkpoint_sharded()
            return
        # One process: one file, in the layout `recap sample` and older runs use (per-rank lists of one).
        state = {
            **self._meta(),
            "model": full_model_state(self.model),
            "ema": self.ema.state_dict(),
            "optimizer": optimizer_state(self.model, self.optimizer, self.fsdp),
            "data": {"ranks": [self.loader.state_dict()]},
            "rng": [rng_state()],
            "generator": [self.generator.get_state().cpu()],
        }
        save_checkpoint(checkpoint_path(self.run_dir, self.step), state)
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        log.info("checkpoint: %s", checkpoint_path(self.run_dir, self.step))

    def _checkpoint_sharded(self) -> None:
        # Every rank writes its own shards (FSDP: DTensors are never gathered) and its own data position and RNG.
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        own = {"data": self.loader.state_dict(), "rng": rng_state(), "generator": self.generator.get_state().cpu()}
        path = checkpoint_path(self.run_dir, self.step, sharded=True)
        meta = {**self._meta(), "world_size": self.info.world_size}
        state = {"model": model_state, "ema": self.ema.params, "optimizer": optim_state}
        save_sharded(path, state, own, meta, self.info.rank)
        if self.info.is_main:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
            log.info("checkpoint: %s", path)
        barrier(self.info)

    def _micro_step(self, batch: dict[str, Any], last: bool, micro: int = 0) -> float:
        cfg = self.cfg
        x0 = batch["latents"].to(self.info.device, non_blocking=True).float()
        text, mask = self.text(batch)
        # Frames given as conditioning: a pure function of where this micro-batch sits in the run (exact resume).
        given = draw_given_frames(
            cfg.train.conditioning, x0.shape[0], x0.shape[2], cfg.train.seed, self.step, self.info.rank, micro
        )
        # Gradients are reduced once per optimizer step, on the last micro-batch: DDP through no_sync, FSDP2 by
        # switching its reduce-scatter off (it would otherwise run after every micro-batch's backward).
        sync = contextlib.nullcontext()
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        elif not last and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with sync:
            with autocast:  # the forward only: PyTorch advises backward outside autocast
                loss = flow_matching_loss(
                    self.forward,
                    x0,
                    text,
                    mask,
                    self.generator,
                    cfg.objective.t_mean,
                    cfg.objective.t_std,
                    cfg.objective.caption_dropout,
                    given=given,
                    given_noise=cfg.train.conditioning.noise,
                )
            (loss / cfg.optim.grad_accum).backward()
        return float(loss.detach())

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns this step's metrics (loss averaged over ranks)."""
        cfg = self.cfg
        start = time.perf_counter()
        losses, samples, tokens = [], 0, 0
        for micro, batch in enumerate(batches):
            losses.append(self._micro_step(batch, micro == len(batches) - 1, micro))
            samples += len(batch["keys"])
            tokens += len(batch["keys"]) * tokens_per_sample(batch["latents"].shape, self.module.patch_size)
        grad_norm = None
        if cfg.optim.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        elapsed = time.perf_counter() - start
        world = self.info.world_size
        record: dict[str, Any] = {
            "step": self.step,
            "loss": mean_across_ranks(sum(losses) / len(losses), self.info),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": samples * world / elapsed,
            "tokens_per_s": tokens * world / elapsed,
            "step_s": elapsed,
        }
        if self.peak:
            ctx = int(batches[-1]["text"].shape[1]) if "text" in batches[-1] else 0
            flops = self.module.flops_per_sample(tokens // max(1, samples), ctx) * samples
            record["mfu"] = flops / elapsed / (self.peak * 1e12)
        return record

    def next_batches(self) -> tuple[list[dict[str, Any]], float]:
        """The micro-batches of one step and the seconds spent waiting for them."""
        start = time.perf_counter()
        batches = [next(self.loader) for _ in range(self.cfg.optim.grad_accum)]
        return batches, time.perf_counter() - start

    def run(self, stop_at: int | None) -> dict[str, Any]:
        cfg = self.cfg
        target = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        metrics = MetricsLog(self.run_dir, self.info.is_main, cfg.train.tensorboard)
        if self.info.is_main:
            rd.write_text(rd.join(self.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
        record: dict[str, Any] = {"loss": float("nan")}
        self.model.train()
        try:
            while self.step < target:
                batches, wait = self.next_batches()
                record = self.train_step(batches)
                # Throughput counts the wait for data too: a stalled loader shows up in samples/s.
                total = record["step_s"] + wait
                record["samples_per_s"] *= record["step_s"] / total
                record["tokens_per_s"] *= record["step_s"] / total
                record["step_s"], record["data_wait_frac"] = total, wait / total
                if cfg.train.log_batch_keys:
                    keys = [k for b in batches for k in b["keys"]]
                    record["batch_keys"] = all_gather_objects(keys, self.info)
                metrics.write(record)
                if self.step % cfg.train.log_every == 0 or self.step == target:
                    log.info(
                        "step %d loss %.4f lr %.2e %.1f samples/s %.0f tokens/s data wait %.0f%%",
                        self.step,
                        record["loss"],
                        record["lr"],
                        record["samples_per_s"],
                        record["tokens_per_s"],
                        100 * record["data_wait_frac"],
                    )
                if self.step % cfg.train.checkpoint_every == 0 or self.step == target:
                    self._checkpoint()
                    metrics.flush()
        finally:
            metrics.close()
            self.loader.close()
        return {"step": self.step, "loss": record["loss"], "run_dir": self.run_dir, "params": self.num_params}


# ---------------------------------------------------------------------------------------------
# Ray Train


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from trainer.config import config_from_dict

    config = config_from_dict(loop_config["config"], "ray train_loop_config")
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    summary = train(config, loop_config["data"], loop_config["output"], loop_config["stop_at"], device=device)
    ray.train.report({"step": summary["step"], "loss": summary["loss"]})


def run_ray(
    config: TrainConfig,
    data: str | list[str],
    output: str | Path,
    num_workers: int,
    use_gpu: bool = False,
    stop_at: int | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Run `train` on `num_workers` Ray Train workers (a TorchTrainer sets up the process group)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address)
    output = rd.normalize(output)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    # The driver reads metrics.jsonl too: one process more than the workers.
    check_shared_run_dir(output, min(nodes, num_workers), config.train.assume_shared_run_dir, num_workers + 1)
    rd.makedirs(output)
    data = [str(Path(d).absolute()) if Path(d).exists() else d for d in ([data] if isinstance(data, str) else data)]
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "config": config.to_dict(),
            "data": data,
            "output": str(output),
            "stop_at": stop_at,
            "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray", storage_path=rd.local_path(output) or output),
    )
    trainer.fit()  # raises TrainingFailedError when a worker fails
    # Ray Train v2 keeps reported metrics only with a reported checkpoint; ours are in the run directory.
    last = json.loads(rd.read_text(rd.join(output, "metrics.jsonl")).splitlines()[-1])
    return {"step": int(last["step"]), "loss": float(last["loss"]), "run_dir": output}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trainer.train` / `torchrun -m trainer.train`: the `recap train` arguments."""
    import argparse

    from trainer.cli import add_train_arguments, handle_train

    parser = argparse.ArgumentParser(prog="python -m trainer.train", description="train a DiT on recap shards")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.errors import StageInputError

    try:
        return handle_train(args)
    except (ConfigError, StageInputError) as exc:
        print(f"recap train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
