"""Captioning with a Hugging Face video-language model: AutoModelForImageTextToText + AutoProcessor.

Any video-capable image-text-to-text model with a chat template (Qwen2.5-VL / Qwen3-VL, LLaVA-OneVision,
SmolVLM2, ...) by hub id or local path; batched, left-padded generation; bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

from typing import Any

from captioner.backends.base import CaptionRequest, Sampling, build_messages, frames_array, video_metadata

TINY_PREFIX = "recap-tiny:"


def resolve_model(model: str) -> str:
    """A hub id or local path; `recap-tiny:FAMILY` is a tiny random model built on first use (smoke runs)."""
    if model.startswith(TINY_PREFIX):
        from captioner.tiny import ensure_tiny_model

        return str(ensure_tiny_model(family=model[len(TINY_PREFIX) :]))
    return model


def pick_device_dtype(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        chosen = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        chosen = getattr(torch, dtype)
    return device, chosen


class TransformersBackend:
    """Loads the model and processor once; `caption` runs one batched generate per call."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        batch_size: int = 8,
        device_map: str | None = None,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # recap reports progress per stage; per-actor weight bars are noise
        self.model_id = model
        path = resolve_model(model)
        self.device, self.dtype = pick_device_dtype(device, dtype)
        self.batch_size = batch_size
        # trust_remote_code only when the user opted in: it runs code from the model repository.
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation  # e.g. flash_attention_2, sdpa
        if device_map:
            # Weights go straight to their devices (accelerate): a model larger than one GPU is split across the
            # actor's GPUs; inputs go to the device of the first layers.
            self.model = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, **kwargs)
            self.device = str(self.model.device)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(self.device)
        self.model.eval()

    def _inputs(self, requests: list[CaptionRequest]) -> Any:
        texts = [
            self.processor.apply_chat_template(build_messages(r), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        videos = [frames_array(r) for r in requests]
        metadata = [video_metadata(r) for r in requests]
        inputs = self.processor(
            text=texts,
            videos=videos,
            video_metadata=metadata,
            do_sample_frames=False,  # frames arrive already sampled from the clip
            padding=True,
            padding_side="left",  # decoder-only generation continues from the right edge
            return_tensors="pt",
        )
        return inputs.to(self.device)

    def caption(self, requests: list[CaptionRequest], sampling: Sampling) -> list[str]:
        import torch

        captions: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            inputs = self._inputs(chunk)
            if "pixel_values_videos" in inputs and inputs["pixel_values_videos"].is_floating_point():
                inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
            kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_new_tokens,
                "repetition_penalty": sampling.repetition_penalty,
            }
            if sampling.temperature > 0:
                torch.manual_seed(sampling.seed)
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                kwargs.update(do_sample=False)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            captions += [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return captions
