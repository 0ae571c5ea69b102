"""Typed configuration of a training run, loaded from one YAML file (configs/train-tiny.yaml).

Defaults live here; a wrong key or value fails at load time with a message naming the key, the value given and
what is allowed. The resolved config is saved in every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import ConfigError, load_yaml_config, validate_config


class TrainConfigError(ConfigError):
    """A training config file or value is wrong; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    preset: str = Field("tiny", description="size preset: tiny, S, B, L, XL, 1B (trainer.model.PRESETS)")
    hidden_size: int | None = Field(None, ge=8, description="override the preset's width")
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)
    patch_size: tuple[int, int, int] | None = Field(None, description="(pt, ph, pw) in latent cells")
    qk_norm: bool = True

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from trainer.model import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset; allowed: {', '.join(PRESETS)}")
        return value

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError("every patch side must be >= 1")
        return value

    def overrides(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size,
            "qk_norm": self.qk_norm,
        }


class DataConfig(_Section):
    batch_size: int = Field(8, ge=1, description="samples per micro-batch on each rank; one latent shape per batch")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    resampled: bool = Field(True, description="draw shards with replacement (infinite stream); false: epochs")
    window_shards: int = Field(
        4, ge=1, description="shards read per window; shuffling, bucketing and resume positions are per window"
    )
    shuffle_buffer: int = Field(1000, ge=1, description="samples in the shuffle buffer (within a window)")
    seed: int = 0
    min_scores: dict[str, float] = Field(
        default_factory=dict, description="manifest filter, e.g. {score_aesthetic: 4.5}: keep samples at or above"
    )
    max_scores: dict[str, float] = Field(default_factory=dict, description="manifest filter: keep at or below")
    text_encoder: str | None = Field(
        None, description="transformers text encoder for captions without KEY.text_emb.npy (hub id or path)"
    )
    text_max_length: int = Field(256, ge=1)
    trust_remote_code: bool = False


class ObjectiveConfig(_Section):
    t_mean: float = Field(0.0, description="logit-normal timestep sampling: mean of the normal")
    t_std: float = Field(1.0, gt=0, description="logit-normal timestep sampling: std of the normal")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training without the caption (CFG)")


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio at train.steps")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null: no clipping")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class ConditioningConfig(_Section):
    """Frame-conditioned training: the share of samples that get some latent frames given clean (no loss on them).

    The rest of the samples train text-only, which is also the frame-free prediction frame guidance needs.
    """

    image: float = Field(0.0, ge=0, le=1, description="share given their first latent frame (image-to-video)")
    prefix: float = Field(0.0, ge=0, le=1, description="share given a prefix of latent frames (extension)")
    ends: float = Field(0.0, ge=0, le=1, description="share given their first and last latent frames (interpolation)")
    prefix_min: int = Field(1, ge=1, description="shortest prefix, in latent frames")
    prefix_max: int | None = Field(
        None, ge=1, description="longest prefix, in latent frames; null (and any longer value): all frames but one"
    )
    noise: float = Field(
        0.0, ge=0, lt=1, description="noise level t of the given frames (0: clean); the model is told it per frame"
    )

    @model_validator(mode="after")
    def _shares_and_range(self) -> ConditioningConfig:
        total = self.image + self.prefix + self.ends
        if total > 1 + 1e-9:
            raise ValueError(f"image + prefix + ends = {total:g}: the shares must sum to at most 1")
        if self.prefix_max is not None and self.prefix_max < self.prefix_min:
            raise ValueError(f"prefix_max {self.prefix_max} is below prefix_min {self.prefix_min}")
        return self

    @property
    def enabled(self) -> bool:
        return self.image + self.prefix + self.ends > 0


class LoopConfig(_Section):
    steps: int = Field(1000, ge=1, description="optimizer steps of the run (also the LR schedule's length)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    compile: bool = Field(False, description="torch.compile the model")
    activation_checkpointing: bool = False
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="with several processes: auto = FSDP on GPU for presets of >= fsdp_min_params, else DDP"
    )
    fsdp_min_params: int = Field(300_000_000, ge=0)
    conditioning: ConditioningConfig = Field(
        default_factory=ConditioningConfig, description="frame-conditioned training (all shares 0: text only)"
    )
    log_every: int = Field(10, ge=1, description="console line every N steps (metrics.jsonl gets every step)")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    tensorboard: bool = Field(False, description="also write TensorBoard scalars under RUN_DIR/tensorboard")
    log_batch_keys: bool = Field(False, description="write each step's sample keys to metrics.jsonl (debugging)")
    peak_tflops: float | None = Field(
        None, gt=0, description="per-GPU peak bf16 TFLOP/s for MFU; null: looked up from the GPU name"
    )
    assume_shared_run_dir: bool = Field(
        False,
        description="multi-node runs refuse a run directory on a local filesystem (each node would keep its own "
        "RUN/); true: it is shared in a way the mount table does not show",
    )


class SampleConfig(_Section):
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(5.0, ge=0, description="text guidance scale; 1: no text guidance")
    frame_cfg_scale: float = Field(
        1.0, ge=0, description="guidance scale of given frames (image, video prefix); 1: no frame guidance"
    )
    shift: float = Field(1.0, gt=0, description="timestep shift; > 1 spends more steps at high noise")
    fps: float = Field(8.0, gt=0)
    seed: int = 0


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> TrainConfig:
    return validate_config(TrainConfig, data, source, TrainConfigError)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML training config (or the defaults) with `key.sub=value` overrides applied."""
    return load_yaml_config(TrainConfig, path, overrides, TrainConfigError)
