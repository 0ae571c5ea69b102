"""Builds tiny randomly initialised vision-language (and text) models offline, for tests and the offline smoke config.
Never used for real captions: random weights and a tiny locally trained tokenizer only produce word salad."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

# Bump when what a builder writes changes: ensure_tiny_model() rebuilds caches with another version.
FORMAT_VERSION = 1
MARKER_NAME = "recap_tiny_model.json"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VISION_TOKENS = SPECIAL_TOKENS[3:]

# Qwen-style chat template. Content is a string or a list of parts of type "text", "video" or "image".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A small descriptive corpus: the BPE merges learnt from it make generated tokens look like words.
_CORPUS = """\
A person walks slowly along a quiet city street at night while cars pass by in the rain.
The camera pans across a green valley with tall mountains and a river under a bright blue sky.
A woman in a red coat opens the door of a small wooden house and steps into the warm kitchen.
Two children play with a brown dog on the grass in a sunny park near a large old tree.
A man rides a bicycle down a narrow road between fields of yellow flowers in the morning light.
The video shows a close view of hands cutting fresh vegetables on a white table in a kitchen.
A crowd of people stands in a wide square and watches a band play music on a stage at night.
Waves roll onto a sandy beach as the sun sets behind dark clouds over the calm ocean.
A black car drives fast on a highway through a forest, and the camera follows it from above.
An old man sits on a bench in the park and reads a newspaper while birds fly around him.
A young girl smiles at the camera, then turns and runs toward her friends across the field.
Snow falls on a quiet village with small houses, and smoke rises slowly from a stone chimney.
The scene cuts to an office where several people sit at desks and look at their computer screens.
A chef in a white hat stirs a large pot of soup, and steam rises into the bright kitchen light.
A train moves through the countryside, passing green hills, farms, and a long blue lake.
The camera zooms in on a cat sleeping on a soft chair next to a window with white curtains.
A group of friends laughs around a table in a busy restaurant with warm yellow lights.
A drone shot shows a tall bridge over a wide river with boats moving slowly under it.
A woman paints a picture of flowers on a canvas in a bright room full of plants and books.
The sky turns orange as a plane takes off from the airport and climbs above the clouds.
A man in a blue shirt speaks to the camera while standing in front of a white wall.
Leaves move in the wind on a sunny afternoon, and light shines through the branches of the trees.
A small boat sails across the lake at sunrise, leaving a long line of waves behind it.
People walk in and out of a shop on a busy street, carrying bags and talking to each other.
The video ends with a wide view of the city skyline at dusk as the lights come on.
"""

_TOKENIZER_VOCAB_SIZE = 768
_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _build_tokenizer(chat_template: str):
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic), wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's normaliser and pre-tokeniser, so AutoTokenizer's Qwen2Tokenizer (which rebuilds them) tokenises alike.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=VISION_TOKENS,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _suppressed_token_ids(tokenizer) -> list[int]:
    """Ids a random model must never emit: special tokens and every token that is not " " + a corpus word.

    Suppressing them (through generation_config.suppress_tokens) makes each generated token a whole English word,
    so the decoded output is never empty, whitespace or special tokens only, whatever the random weights prefer.
    """
    words = set(re.findall(r"[A-Za-z]+", _CORPUS))
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    suppressed = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id in special or not (text.startswith(" ") and text[1:] in words):
            suppressed.append(token_id)
    return suppressed


def _configure_generation(model, tokenizer, max_new_tokens: int = 32) -> None:
    gen = model.generation_config
    gen.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gen.bos_token_id = None
    gen.do_sample = False
    gen.max_new_tokens = max_new_tokens
    gen.suppress_tokens = _suppressed_token_ids(tokenizer)
    gen.no_repeat_ngram_size = 1  # no word twice: varied word salad rather than one word repeated


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_params(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _seeded_model(model_cls, config, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    return model


def _write_qwen2_5_vl(out: Path, seed: int) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(CHAT_TEMPLATE)
    # head_dim = 64 / 4 = 16, so mrope_section (t, h, w) must sum to 8.
    text_config = {**_text_params(tokenizer), "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **_token_ids(tokenizer))
    model = _seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    _configure_generation(model, tokenizer)

    # patch 14 x merge 2 = 28 px per merged token side; max 28*28*6 pixels keeps a frame at <= 6 tokens.
    size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 6}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(
        size=size,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        cap_pixels_per_frame=True,
        do_sample_frames=False,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _write_qwen3_vl(out: Path, seed: int) -> None:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(CHAT_TEMPLATE)
    text_config = {
        **_text_params(tokenizer),
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **_token_ids(tokenizer))
    model = _seeded_model(Qwen3VLForConditionalGeneration, config, seed)
    _configure_generation(model, tokenizer)

    # patch 16 x merge 2 = 32 px per merged token side.
    # cap_pixels_per_frame splits longest_edge evenly over the frames: 8 frames get 32*32*6 pixels each.
    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 48}
    image_processor = Qwen2VLImageProcessor(
        size=size,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        size=size,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        cap_pixels_per_frame=True,
        do_sample_frames=False,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _write_text_lm(out: Path, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer(CHAT_TEMPLATE)
    config = Qwen2Config(**_text_params(tokenizer), tie_word_embeddings=True)
    model = _seeded_model(Qwen2ForCausalLM, config, seed)
    _configure_generation(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_text_encoder(out: Path, seed: int) -> None:
    """A tiny T5 encoder (AutoModelForTextEncoding / AutoTokenizer): caption embeddings for text_emb.npy."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _build_tokenizer(CHAT_TEMPLATE)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = _seeded_model(T5EncoderModel, config, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_WRITERS: dict[str, Callable[[Path, int], None]] = {
    "qwen2_5_vl": _write_qwen2_5_vl,
    "qwen3_vl": _write_qwen3_vl,
    "text_lm": _write_text_lm,
    "text_encoder": _write_text_encoder,
}
FAMILIES = tuple(_WRITERS)


def register_family(family: str, writer: Callable[[Path, int], None]) -> None:
    """Add a tiny-model family built elsewhere (e.g. pipeline.vae.tiny's VAEs) to the same cache machinery."""
    _WRITERS[family] = writer


def _write_marker(out: Path, family: str, seed: int) -> None:
    import transformers

    marker = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "seed": seed,
        "transformers": transformers.__version__,
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_current(model_dir: Path, family: str) -> bool:
    marker = _read_marker(model_dir)
    return bool(marker) and marker.get("format_version") == FORMAT_VERSION and marker.get("family") == family


def _build_in_temp(out_dir: Path, family: str, seed: int) -> Path:
    """Build `family` into a fresh temporary sibling of `out_dir` (marker written last); return that dir."""
    if family not in _WRITERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(_WRITERS)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the model dir should be readable like any other cache entry
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in logs
    try:
        _WRITERS[family](tmp, seed)
        _write_marker(tmp, family, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tmp


def _move_aside(path: Path) -> Path | None:
    """Rename `path` to a unique hidden sibling (to delete later); None if it no longer exists."""
    trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return None
    return trash


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a non-empty directory that is not a tiny model (a wrong path must not lose data)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise FileExistsError(
            f"{out_dir} exists, is not empty and holds no tiny model ({MARKER_NAME}); not replacing it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")


def _build(out_dir: str | Path, family: str, seed: int) -> Path:
    """Build into a temp sibling, then rename into place, replacing an earlier tiny model (or empty dir) there."""
    out_dir = Path(out_dir).expanduser().absolute()
    _check_replaceable(out_dir)
    tmp = _build_in_temp(out_dir, family, seed)
    try:
        for _ in range(5):
            try:
                os.rename(tmp, out_dir)
                return out_dir
            except OSError:
                if not out_dir.exists():
                    raise
                _check_replaceable(out_dir)
                trash = _move_aside(out_dir)
                if trash is not None:
                    shutil.rmtree(trash, ignore_errors=True)
        raise RuntimeError(f"could not move the tiny model into {out_dir}: it keeps reappearing")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL (model + processor with chat template) saved in `out_dir`; returns it.

    Loads back with AutoProcessor / AutoModelForImageTextToText. Same seed, same weights and outputs.
    """
    return _build(out_dir, "qwen2_5_vl", seed)


def build_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen3-VL (model + processor with chat template) saved in `out_dir`; returns it."""
    return _build(out_dir, "qwen3_vl", seed)


def build_tiny_text_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2 causal LM with tokenizer and chat template (AutoModelForCausalLM / AutoTokenizer)."""
    return _build(out_dir, "text_lm", seed)


def default_cache_dir() -> Path:
    """`$RECAP_CACHE/tiny-models`, else `~/.cache/recap/tiny-models`."""
    root = os.environ.get("RECAP_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "recap"
    return base / "tiny-models"


def ensure_tiny_model(cache_dir: str | Path | None = None, family: str = "qwen2_5_vl") -> Path:
    """The directory of the tiny `family` model (seed 0) in the cache, built on first use and cached.

    Rebuilt when its marker is missing or of another FORMAT_VERSION. Safe when processes race: each builds in its
    own temp dir and renames it into place; one that finds a current model already there discards its own.
    """
    if family not in _WRITERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(_WRITERS)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache.absolute() / family
    if _is_current(target, family):
        return target
    tmp = _build_in_temp(target, family, 0)
    try:
        for _ in range(5):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if not target.exists():
                    raise
                if _is_current(target, family):
                    return target  # another process won the race
                trash = _move_aside(target)  # stale version (or a crashed partial copy): replace it
                if trash is not None:
                    shutil.rmtree(trash, ignore_errors=True)
        raise RuntimeError(f"could not move the tiny model into {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
