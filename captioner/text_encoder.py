"""Caption embeddings from a transformers text encoder (T5 / UMT5 / CLIP text / ...), stored as KEY.text_emb.npy
so a trainer needs no text encoder: one (L, D) array per caption, L = the caption's own token count."""

from __future__ import annotations

from typing import Any

import numpy as np


class CaptionEncoder:
    """Loads AutoTokenizer + AutoModelForTextEncoding once; `encode` embeds a batch of captions."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 256,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForTextEncoding, AutoTokenizer

        from captioner.backends.transformers import pick_device_dtype, resolve_model

        path = resolve_model(model)
        self.device, self.dtype = pick_device_dtype(device, dtype)
        self.model_id = model
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForTextEncoding.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """float32 (L_i, D) per caption: last hidden states of the caption's real tokens (padding dropped)."""
        if not captions:
            return []
        tokens = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        if tokens["input_ids"].shape[1] == 0:  # only empty captions, and a tokenizer that adds no end token
            return [np.zeros((0, self.dim), np.float32) for _ in captions]
        with self._torch.inference_mode():
            hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        states: Any = hidden.last_hidden_state.float().cpu().numpy()
        mask = tokens["attention_mask"].bool().cpu().numpy()
        return [states[i][mask[i]] for i in range(len(captions))]
