"""Captioning with vLLM's offline engine on GPU nodes: one engine per Ray actor (a data-parallel replica).

vLLM pins its own torch and transformers, so its actors run in their own Ray runtime_env (pip set or
container image, from `caption.vllm`); the prompt text comes from the model's own chat template.
"""

from __future__ import annotations

from typing import Any

from captioner.backends.base import CaptionRequest, Sampling, build_messages, frames_array, video_metadata
from pipeline.config import CaptionConfig


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for these settings."""
    kwargs: dict[str, Any] = {
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "repetition_penalty": sampling.repetition_penalty,
        "seed": sampling.seed,
    }
    if sampling.temperature > 0:
        kwargs["top_p"] = sampling.top_p
    return kwargs


def engine_kwargs(cfg: CaptionConfig, model_path: str) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(...)` for one replica."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
        "trust_remote_code": cfg.trust_remote_code,
        "limit_mm_per_prompt": {"video": 1, "image": 0},
        "seed": 0,
    }
    if cfg.vllm.max_model_len:
        kwargs["max_model_len"] = cfg.vllm.max_model_len
    if cfg.dtype != "auto":
        kwargs["dtype"] = cfg.dtype
    return kwargs


def build_vllm_inputs(processor: Any, requests: list[CaptionRequest]) -> list[dict[str, Any]]:
    """The prompts vLLM's `LLM.generate` takes: chat-templated text plus the clip's frames as video data."""
    inputs = []
    for request in requests:
        prompt = processor.apply_chat_template(build_messages(request), tokenize=False, add_generation_prompt=True)
        video = frames_array(request)  # (T, H, W, 3) uint8
        metadata = {**video_metadata(request), "video_backend": "recap"}
        inputs.append(
            {
                "prompt": prompt,
                "multi_modal_data": {"video": [(video, metadata)]},
                # Frames are already sampled from the clip; the processor must not resample them.
                "mm_processor_kwargs": {"do_sample_frames": False},
            }
        )
    return inputs


def runtime_env(cfg: CaptionConfig) -> dict[str, Any]:
    """The caption actors' own environment: vLLM cannot share recap's torch/transformers pins."""
    v = cfg.vllm
    config = {"setup_timeout_seconds": v.setup_timeout_seconds}
    if v.image_uri:
        return {"image_uri": v.image_uri, "config": config}
    if v.installer == "uv":
        return {"uv": {"packages": list(v.packages)}, "config": config}
    return {"pip": {"packages": list(v.packages), "pip_check": True}, "config": config}


class VLLMBackend:
    """One vLLM engine; `caption` sends a whole batch to it at once (vLLM schedules it continuously)."""

    def __init__(self, cfg: CaptionConfig):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "caption.backend=vllm needs vLLM in the caption actors' environment: "
                "pip install 'recap[vllm]' on GPU nodes, or set caption.vllm.packages / caption.vllm.image_uri"
            ) from exc
        from transformers import AutoProcessor

        from captioner.backends.transformers import resolve_model

        self.model_id = cfg.model or ""
        path = resolve_model(self.model_id)
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        self._vllm = vllm
        self.engine = vllm.LLM(**engine_kwargs(cfg, path))

    def caption(self, requests: list[CaptionRequest], sampling: Sampling) -> list[str]:
        params = self._vllm.SamplingParams(**sampling_kwargs(sampling))
        outputs = self.engine.generate(build_vllm_inputs(self.processor, requests), params, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]
