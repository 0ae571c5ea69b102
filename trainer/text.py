"""Caption conditioning for the denoiser: stored KEY.text_emb.npy, or a frozen transformers text encoder.

The encoder path goes through `captioner.text_encoder.CaptionEncoder`, the same code the encode stage uses to
write text_emb.npy, so embeddings made while training, while sampling and in the shards agree.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.data import pad_embeddings


class TextConditioner:
    """Turns a batch (or prompts) into (text (B, L, D), mask (B, L)) on the training device."""

    def __init__(
        self,
        encoder: str | None,
        device: str,
        max_length: int = 256,
        trust_remote_code: bool = False,
    ):
        self.encoder_id = encoder
        self.device = device
        self._encoder = None
        if encoder:
            from captioner.text_encoder import CaptionEncoder

            # fp32 on CPU, bf16 on GPU: the encoder is frozen and only runs forward.
            self._encoder = CaptionEncoder(
                encoder, device=device, max_length=max_length, trust_remote_code=trust_remote_code
            )

    @property
    def dim(self) -> int | None:
        return self._encoder.dim if self._encoder is not None else None

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._encoder is None:
            raise RuntimeError("no text encoder configured (data.text_encoder) to embed captions")
        text, mask = pad_embeddings(self._encoder.encode(list(captions)))
        return text.to(self.device), mask.to(self.device)

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "text" in batch:
            return batch["text"].to(self.device, non_blocking=True), batch["text_mask"].to(self.device)
        return self.encode(batch["captions"])
