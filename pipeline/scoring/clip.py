"""CLIP scoring of clips from their sampled frames: an open_clip model loaded once, used for many clips.

Gives each clip a unit-norm mean image embedding, an optional aesthetic score and zero-shot NSFW/watermark odds.

Aesthetic head files map a frame's L2-normalised CLIP image embedding (dim d) to one score. They are loaded by
their real architecture, never guessed:

- a single linear layer: `weight` (1, d) and optionally `bias` (1,);
- LAION's "improved aesthetic predictor" (`sac+logos+ava1-l14-linearMSE.pth`): linears at `layers.{0,2,4,6,7}`
  with Dropouts between and no activation (a linear chain);
- its ReLU variant (`...-reluMSE.pth`): linears at `layers.{0,3,6,9,11}` with a ReLU after every one but the last;
- any other chain of `<prefix>N.weight/bias` linears only when `activation` says what sits between them
  (`relu` or `none`, config `filter.clip.aesthetic_head_activation`): its indices alone cannot tell.

Files are PyTorch state dicts (`torch.load(weights_only=True)`; a Lightning-style `{"state_dict": ...}` is
unwrapped) or `.npz` (`allow_pickle=False`) with the same keys. The last layer must have one output.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Zero-shot prompt pairs: index 0 is the benign class, index 1 the one scored.
NSFW_PROMPTS = ("a photo that is safe for work", "an explicit nsfw photo with nudity")
WATERMARK_PROMPTS = ("a clean photo without text", "a photo with a watermark or logo overlay")

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<kind>weight|bias)$")

HeadLayers = list[tuple[torch.Tensor, torch.Tensor]]

# Layer indices of the known multi-layer heads (nn.Sequential positions) -> what sits between the linears.
KNOWN_HEAD_LAYOUTS = {(0, 2, 4, 6, 7): "none", (0, 3, 6, 9, 11): "relu"}


class Head:
    """An aesthetic head: its linears and whether a ReLU follows each but the last."""

    def __init__(self, layers: HeadLayers, relu: bool):
        self.layers = layers
        self.relu = relu

    @property
    def in_features(self) -> int:
        return int(self.layers[0][0].shape[1])


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("ClipScorer needs open_clip: pip install open-clip-torch") from e
    return open_clip


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_head(path: str | Path, activation: str = "auto") -> Head:
    """Reads an aesthetic head file into its linears ((out, in) weight, (out,) bias, float32, checked for shape)
    and its activation: known layouts by their layer indices, others only with `activation` relu|none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            raw: dict[str, Any] = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"aesthetic head {path}: expected a non-empty state dict, got {type(raw).__name__}")
    tensors = {str(k): torch.as_tensor(v).detach().to(torch.float32) for k, v in raw.items()}

    if "weight" in tensors:
        pairs = [(tensors.pop("weight"), tensors.pop("bias", None))]
        indices = (0,)
        if tensors:
            raise ValueError(f"aesthetic head {path}: unexpected keys next to weight/bias: {sorted(tensors)}")
    else:
        by_index: dict[int, dict[str, torch.Tensor]] = {}
        prefixes = set()
        for key, value in tensors.items():
            m = _LAYER_KEY.match(key)
            if m is None:
                raise ValueError(
                    f"aesthetic head {path}: key {key!r} is neither weight/bias nor <prefix>N.weight/bias"
                )
            prefixes.add(m["prefix"])
            by_index.setdefault(int(m["index"]), {})[m["kind"]] = value
        if len(prefixes) != 1:
            raise ValueError(f"aesthetic head {path}: layer keys mix prefixes {sorted(prefixes)}")
        pairs = []
        for index in sorted(by_index):
            if "weight" not in by_index[index]:
                raise ValueError(f"aesthetic head {path}: layer {index} has a bias but no weight")
            pairs.append((by_index[index]["weight"], by_index[index].get("bias")))
        indices = tuple(sorted(by_index))

    layers: HeadLayers = []
    for i, (weight, bias) in enumerate(pairs):
        if weight.ndim == 1:  # a bare coefficient vector is a one-output linear
            weight = weight[None, :]
        if weight.ndim != 2:
            raise ValueError(f"aesthetic head {path}: layer {i} weight has shape {tuple(weight.shape)}, expected 2-D")
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.reshape(-1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"aesthetic head {path}: layer {i} bias has {bias.shape[0]} values for {weight.shape[0]} outputs"
            )
        if layers and layers[-1][0].shape[0] != weight.shape[1]:
            raise ValueError(
                f"aesthetic head {path}: layer {i} takes {weight.shape[1]} inputs "
                f"but the layer before gives {layers[-1][0].shape[0]}"
            )
        layers.append((weight, bias))
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"aesthetic head {path}: last layer gives {layers[-1][0].shape[0]} outputs, expected 1")
    known = KNOWN_HEAD_LAYOUTS.get(indices) if len(indices) > 1 else "none"
    if activation != "auto":
        return Head(layers, relu=activation == "relu")
    if known is None:
        raise ValueError(
            f"aesthetic head {path}: linears at indices {list(indices)} are not a layout recap knows (LAION's "
            f"linear chain {list((0, 2, 4, 6, 7))}, its ReLU variant {list((0, 3, 6, 9, 11))}, one linear), and "
            "the indices cannot tell whether activations sit between them: set "
            "filter.clip.aesthetic_head_activation to relu or none"
        )
    return Head(layers, relu=known == "relu")


def apply_head(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """Head scores (n,) of embeddings (n, d): the linears in order, with a ReLU between them for ReLU heads."""
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    for i, (weight, bias) in enumerate(head.layers):
        x = F.linear(x, weight, bias)
        if head.relu and i < len(head.layers) - 1:
            x = F.relu(x)
    return x[:, 0].numpy()


def openai_model_name(model: str, pretrained: str | None, available: list[str]) -> str:
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip builds plain GELU for `ViT-L-14` and only warns.
    With `pretrained="openai"`, the `-quickgelu` twin of the model (when open_clip has one) is the right build."""
    if pretrained == "openai" and not model.endswith("-quickgelu") and f"{model}-quickgelu" in available:
        return f"{model}-quickgelu"
    return model


def _positive_probability(embeddings: np.ndarray, prompts: np.ndarray, logit_scale: float) -> np.ndarray:
    """Per-image softmax probability of the second prompt, as in CLIP zero-shot classification."""
    logits = logit_scale * (embeddings.astype(np.float64) @ prompts.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    odds = np.exp(logits)
    return odds[:, 1] / odds.sum(axis=1)


def _check_frame(frame: Any) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        described = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"frames must be RGB uint8 arrays (H, W, 3), got {described}")
    return np.ascontiguousarray(frame)


class ClipScorer:
    """An open_clip model with its eval transform, optional aesthetic head and zero-shot safety prompts."""

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        device: str = "auto",
        aesthetic_head: str | None = None,
        batch_size: int = 32,
        safety_prompts: bool = True,
        model_config: str | None = None,
        head_activation: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        open_clip = _import_open_clip()
        self.model_name = model
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        # Read the head before the model so a bad head file fails without the expensive load.
        self._head = load_head(aesthetic_head, head_activation) if aesthetic_head else None

        if model_config is not None:
            config_path = Path(model_config)
            # add_model_config ignores a missing path, which would surface later as an unknown model.
            if not config_path.exists():
                raise FileNotFoundError(f"model_config not found: {config_path}")
            open_clip.add_model_config(config_path)
            if ":" not in model and model not in open_clip.list_models():
                raise ValueError(
                    f"model {model!r} is not among the configs registered from {config_path} "
                    "(a config file's name without .json is its model name)"
                )

        model = openai_model_name(model, pretrained, open_clip.list_models())
        self.model_name = model
        # fp32 weights everywhere; on CUDA, autocast gives the half-precision speed without fp16 weight drift.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=self.device, precision="fp32"
        )
        self.model.eval().requires_grad_(False)
        if self.device.type == "cuda":
            self._autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self._autocast_dtype = None

        self.embed_dim = self._embed_dim()
        if self._head is not None and self._head.in_features != self.embed_dim:
            raise ValueError(
                f"aesthetic head {aesthetic_head} takes {self._head.in_features}-dim input "
                f"but model {model} gives {self.embed_dim}-dim embeddings"
            )

        self.logit_scale = float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])
        self._prompts: dict[str, np.ndarray] = {}
        if safety_prompts:
            tokenizer = open_clip.get_tokenizer(model)
            self._prompts = {
                "score_nsfw": self._embed_text(tokenizer, NSFW_PROMPTS),
                "score_watermark": self._embed_text(tokenizer, WATERMARK_PROMPTS),
            }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _embed_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        # Towers without output_dim (e.g. some timm ones): measure it on one blank frame.
        return int(self.embed_images([np.zeros((8, 8, 3), np.uint8)]).shape[1])

    @torch.inference_mode()
    def _embed_text(self, tokenizer: Any, prompts: tuple[str, ...]) -> np.ndarray:
        tokens = tokenizer(list(prompts)).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings (n, embed_dim); long texts are cut at the context length."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokenizer = _import_open_clip().get_tokenizer(self.model_name)
        out = [
            self._embed_text(tokenizer, tuple(texts[i : i + self.batch_size]))
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)

    def caption_match(self, captions: list[str], clip_embeddings: list[np.ndarray]) -> np.ndarray:
        """Cosine similarity of each caption's text embedding with its clip's image embedding."""
        text = self.embed_texts(captions)
        image = np.stack([np.asarray(e, np.float32) for e in clip_embeddings]) if clip_embeddings else text
        return np.sum(text * image, axis=1)

    @torch.inference_mode()
    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 image embeddings (n, embed_dim) of RGB uint8 frames of any size."""
        from PIL import Image

        frames = [_check_frame(image) for image in images]
        out = []
        for start in range(0, len(frames), self.batch_size):
            # PIL conversion per batch keeps only one batch of decoded tensors alive.
            batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[start : start + self.batch_size]])
            with self._autocast():
                features = self.model.encode_image(batch.to(self.device, non_blocking=True))
            # Normalise in fp32: half-precision norms of large features lose digits.
            out.append(F.normalize(features.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, getattr(self, "embed_dim", 0)), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def score_clips(self, clips: list[list[np.ndarray]]) -> list[dict[str, Any]]:
        """Per clip: `clip_embedding`, plus `score_aesthetic` with a head and `score_nsfw`/`score_watermark`
        with safety prompts. A clip without frames gets a zero embedding and NaN scores."""
        # One pass over every frame of every clip so batches fill across short clips.
        frames = [frame for clip in clips for frame in clip]
        embeddings = self.embed_images(frames)
        aesthetic = apply_head(self._head, embeddings) if self._head is not None else None
        positives = {key: _positive_probability(embeddings, p, self.logit_scale) for key, p in self._prompts.items()}

        results = []
        start = 0
        for clip in clips:
            stop = start + len(clip)
            result: dict[str, Any] = {}
            if stop == start:
                result["clip_embedding"] = np.zeros(self.embed_dim, np.float32)
            else:
                mean = embeddings[start:stop].astype(np.float64).mean(axis=0)
                norm = np.linalg.norm(mean)
                # Opposite frames can cancel; a zero vector then says "no direction" like an empty clip.
                result["clip_embedding"] = (mean / norm if norm > 0 else mean).astype(np.float32)
            if aesthetic is not None:
                result["score_aesthetic"] = float(aesthetic[start:stop].mean()) if stop > start else math.nan
            for key, prob in positives.items():
                result[key] = float(prob[start:stop].mean()) if stop > start else math.nan
            results.append(result)
            start = stop
        return results
