"""Versioned caption prompt templates: the built-in ones, loading one from a YAML/JSON file, and filling it per clip.
Every caption records its prompt's `version_id`, so a corpus captioned with different wording can be told apart."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMPT_KEYS = ("name", "version", "system", "user")
# Names and versions end up inside `version_id` (name@version+hash): keeping them to these characters keeps it
# unambiguous to split back apart and safe in file names and parquet partition values.
_IDENT = re.compile(r"[A-Za-z0-9._-]+")
PLACEHOLDERS = ("duration_s", "fps", "camera_motion")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CaptionPrompt:
    """One caption prompt: a system message and a user instruction, identified by name and version.

    `prompt_hash` covers all four fields, so editing the text without bumping `version` still changes
    `version_id`; two templates with the same `version_id` asked the model exactly the same thing.
    """

    name: str
    version: str
    system: str
    user: str

    def __post_init__(self) -> None:
        for key in PROMPT_KEYS:
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"prompt {key!r} must be a string, got {type(getattr(self, key)).__name__}")
        for key in ("name", "version"):
            if not _IDENT.fullmatch(getattr(self, key)):
                raise ValueError(
                    f"prompt {key} {getattr(self, key)!r} must be non-empty letters, digits, '.', '_', '-'"
                )
        if not self.user.strip():
            raise ValueError(f"prompt {self.name!r} has an empty user text")

    @property
    def prompt_hash(self) -> str:
        """First 12 hex digits of sha256 over the canonical JSON (sorted keys, no spaces, UTF-8) of the four fields."""
        canonical = json.dumps(
            {key: getattr(self, key) for key in PROMPT_KEYS}, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    @property
    def version_id(self) -> str:
        """`{name}@{version}+{prompt_hash}`, e.g. `dense-v1@1+0123456789ab`: what a caption row records."""
        return f"{self.name}@{self.version}+{self.prompt_hash}"


_DENSE_SYSTEM = (
    "You are an expert video annotator. You write precise, objective, richly detailed descriptions of video clips "
    "that are used as captions to train a text-to-video generation model."
)

_DENSE_USER = """Describe this video clip in a single paragraph of plain prose.

Cover, where applicable:
- the main subjects: what or who they are and how they look (clothing, colors, shapes, materials, size, distinctive \
features);
- their actions and movements, in the order in which they happen, and how subjects interact;
- the camera: its motion (static, pan, tilt, zoom, tracking, handheld) and the framing (close-up, medium or wide \
shot, camera angle), and any change of shot;
- the setting and background;
- the lighting: light sources, direction, time of day, contrast and mood;
- the visual style: live-action footage, animation, 3D render, screen recording or similar, and the color grading, \
depth of field or film grain.

Rules:
- Write in the present tense.
- Describe only what is visible. Do not speculate about identities, intentions, sounds, off-screen events or \
anything that cannot be seen; transcribe on-screen text only when it is legible.
- Start directly with the content. Do not open with phrases such as "The video shows", "This clip depicts" or \
"In this video".
- Write one paragraph: no lists, headings, line breaks, preamble or closing remarks.
- Aim for 80 to 200 words."""

_SHORT_SYSTEM = "You are an expert video annotator. You write precise, objective one-sentence captions of video clips."

_SHORT_USER = """Describe this video clip in one sentence of at most 30 words: the main subject, what it does, and \
the setting. Write in the present tense and describe only what is visible. Start directly with the subject; do not \
begin with phrases such as "The video shows" or "In this clip"."""

# Built-ins take no {placeholders}: metadata hints (notably our optical-flow camera class) are sometimes wrong and
# the model tends to echo them; a file template can opt in.
BUILTIN_PROMPTS: dict[str, CaptionPrompt] = {
    p.name: p
    for p in (
        CaptionPrompt(name="dense-v1", version="1", system=_DENSE_SYSTEM, user=_DENSE_USER),
        CaptionPrompt(name="short-v1", version="1", system=_SHORT_SYSTEM, user=_SHORT_USER),
    )
}


def load_prompt(spec: str | os.PathLike[str]) -> CaptionPrompt:
    """A built-in prompt by name, else a YAML (`.yaml`/`.yml`/other) or JSON (`.json`) file with exactly the keys
    name, version, system and user, all strings. Raises ValueError naming the offending key and the file."""
    if isinstance(spec, str) and spec in BUILTIN_PROMPTS:
        return BUILTIN_PROMPTS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"prompt {str(spec)!r} is neither a built-in ({', '.join(sorted(BUILTIN_PROMPTS))}) nor an existing file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"prompt file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"prompt file {path} must hold a mapping with keys {', '.join(PROMPT_KEYS)}")
    unknown = sorted(str(key) for key in data if key not in PROMPT_KEYS)
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))} in prompt file {path}")
    for key in PROMPT_KEYS:
        if key not in data:
            raise ValueError(f"missing key {key!r} in prompt file {path}")
        if not isinstance(data[key], str):
            # YAML reads `version: 1.10` as the float 1.1: refuse rather than silently change the version.
            raise ValueError(
                f"key {key!r} in prompt file {path} must be a string (quote it), got {type(data[key]).__name__}"
            )
    try:
        return CaptionPrompt(**data)
    except ValueError as exc:
        raise ValueError(f"prompt file {path}: {exc}") from exc


def _format_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNKNOWN
    # numbers.Real also covers numpy scalars, which is what parquet rows hold
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            return UNKNOWN
        digits = 1 if key == "duration_s" else 2
        return f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    if key == "camera_motion":
        return str(value).replace("_", " ")  # "pan_left" reads as "pan left" in a sentence
    return str(value)


def render_user_text(prompt: CaptionPrompt, clip: dict[str, Any]) -> str:
    """The prompt's user text with `{duration_s}`, `{fps}` and `{camera_motion}` filled from a clip row.

    Missing, null or NaN values become "unknown"; numbers are rounded (duration to 0.1 s, fps to 0.01). Only those
    three exact placeholders are replaced: any other braces (JSON examples, `{other}`) stay as written, which
    `str.format` would reject.
    """
    return _PLACEHOLDER.sub(lambda m: _format_value(m.group(1), clip.get(m.group(1))), prompt.user)


def asked_words(text: str) -> int | None:
    """The longest caption length (in words) a prompt asks for ("80 to 200 words", "at most 30 words"), if any."""
    import re

    found = [int(n) for n in re.findall(r"(\d+)\s*words", text)]
    return max(found) if found else None


def token_budget(prompt: CaptionPrompt, max_words: int) -> int:
    """max_new_tokens that fits the longest caption a prompt asks for (else `max_words`): 1.6 tokens a word (English
    in BPE vocabularies runs 1.3-1.5) plus 64 for punctuation and the end token."""
    import math

    words = asked_words(f"{prompt.system}\n{prompt.user}") or max_words
    return math.ceil(min(words, max_words) * 1.6) + 64
