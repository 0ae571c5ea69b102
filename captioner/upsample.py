"""Prompt upsampling: short user prompts rewritten as long captions in the style of the training captions.

A text LLM (transformers causal LM; `recap-tiny:text_lm` offline) is shown a few captions drawn from a
corpus manifest, then the short prompt; `style_report` measures how far the results sit from the
training captions (length and vocabulary), so generation-time prompts stay in the training distribution.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

SYSTEM = (
    "You rewrite short video ideas into one detailed paragraph in exactly the style of the example captions: "
    "describe the subjects and their appearance, the actions in order, the camera motion and framing, the "
    "setting, the lighting and the visual style, in the present tense. Write only the caption."
)

_WORD = re.compile(r"[a-z']+")


def corpus_captions(corpus: str, limit: int = 2000, seed: int = 0) -> list[str]:
    """Captions of passing clips in a corpus (its `clips` table), a seeded random sample of at most `limit`."""
    from pipeline import manifest

    if "caption" not in manifest.table_columns(corpus, "clips"):
        raise ValueError(f"{corpus} has no captions yet: run `recap caption` on it first")
    table = manifest.read_table(corpus, "clips", columns=["caption", "passed"])
    captions = [
        c
        for c, ok in zip(table.column("caption").to_pylist(), table.column("passed").to_pylist(), strict=True)
        if c and ok
    ]
    random.Random(seed).shuffle(captions)
    return captions[:limit]


def build_messages(prompt: str, examples: list[str]) -> list[dict[str, str]]:
    """Few-shot chat: each example caption answers a short prompt made from its first words."""
    messages = [{"role": "system", "content": SYSTEM}]
    for example in examples:
        words = example.split()
        messages.append({"role": "user", "content": " ".join(words[:6])})
        messages.append({"role": "assistant", "content": example})
    messages.append({"role": "user", "content": prompt})
    return messages


class Upsampler:
    """A causal LM loaded once; `upsample` rewrites a batch of prompts."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from captioner.backends.transformers import pick_device_dtype, resolve_model

        hf_logging.disable_progress_bar()
        self.model_id = model
        path = resolve_model(model)
        self.device, self.dtype = pick_device_dtype(device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()

    def upsample(
        self,
        prompts: list[str],
        examples: list[str],
        n_examples: int = 3,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        import torch

        rng = random.Random(seed)
        texts = []
        for prompt in prompts:
            shots = rng.sample(examples, min(n_examples, len(examples))) if examples else []
            texts.append(
                self.tokenizer.apply_chat_template(
                    build_messages(prompt, shots), tokenize=False, add_generation_prompt=True
                )
            )
        inputs = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs["temperature"] = temperature
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


@dataclass
class StyleReport:
    """How upsampled prompts compare with training captions."""

    prompt_words_mean: float
    caption_words_mean: float
    caption_words_std: float
    length_z: float  # (prompt mean - caption mean) / caption std
    vocab_js_divergence: float  # Jensen-Shannon divergence of word distributions, 0 (same) .. 1 bit (disjoint)
    vocab_coverage: float  # share of prompt words that occur in the training captions

    def lines(self) -> list[str]:
        return [
            f"length: upsampled {self.prompt_words_mean:.1f} words vs training {self.caption_words_mean:.1f} "
            f"± {self.caption_words_std:.1f} (z = {self.length_z:+.2f})",
            f"vocabulary: Jensen-Shannon divergence {self.vocab_js_divergence:.3f} bits; "
            f"{100 * self.vocab_coverage:.0f}% of upsampled words occur in training captions",
        ]


def _words(texts: list[str]) -> list[list[str]]:
    return [_WORD.findall(t.lower()) for t in texts]


def style_report(upsampled: list[str], captions: list[str]) -> StyleReport:
    up, cap = _words(upsampled), _words(captions)
    up_len = [len(w) for w in up] or [0]
    cap_len = [len(w) for w in cap] or [0]
    cap_mean = sum(cap_len) / len(cap_len)
    cap_std = math.sqrt(sum((n - cap_mean) ** 2 for n in cap_len) / len(cap_len)) or 1.0
    up_mean = sum(up_len) / len(up_len)
    p, q = Counter(w for ws in up for w in ws), Counter(w for ws in cap for w in ws)
    total_p, total_q = sum(p.values()) or 1, sum(q.values()) or 1
    js = 0.0
    for word in set(p) | set(q):
        a, b = p[word] / total_p, q[word] / total_q
        m = (a + b) / 2
        js += 0.5 * (a * math.log2(a / m) if a else 0.0) + 0.5 * (b * math.log2(b / m) if b else 0.0)
    coverage = sum(n for w, n in p.items() if w in q) / total_p
    return StyleReport(up_mean, cap_mean, cap_std, (up_mean - cap_mean) / cap_std, js, coverage)
