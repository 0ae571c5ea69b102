"""Quality control of generated captions: strips boilerplate and chat artifacts, then flags empty, short, long,
repetitive, refused and truncated text. Pure text functions, no model."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class CaptionFlag(enum.StrEnum):
    """What `check_caption` found. Declared in priority order: a failed caption's `reason` is its first flag."""

    EMPTY = "empty"  # nothing with a letter or digit left after cleaning
    REFUSAL = "refusal"  # the model declined or apologised instead of describing (see is_refusal)
    REPETITION = "repetition"  # repetition_score above QCConfig.max_repeat_ngram_frac: a generation loop
    TOO_SHORT = "too_short"  # fewer than QCConfig.min_words whitespace-separated words
    TOO_LONG = "too_long"  # more than QCConfig.max_words words
    TRUNCATED = "truncated"  # does not end with . ! ? … or a closing quote/bracket: cut off, e.g. at max tokens
    BOILERPLATE_STRIPPED = "boilerplate_stripped"  # informational: strip_boilerplate removed something


FAILURE_FLAGS = frozenset(CaptionFlag) - {CaptionFlag.BOILERPLATE_STRIPPED}


@dataclass(frozen=True)
class QCConfig:
    min_words: int = 8
    max_words: int = 300
    max_repeat_ngram_frac: float = 0.3
    ngram: int = 4

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError(f"need 0 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        if not 0 < self.max_repeat_ngram_frac <= 1:
            raise ValueError(f"max_repeat_ngram_frac must be in (0, 1], got {self.max_repeat_ngram_frac}")


@dataclass
class QCResult:
    caption: str  # cleaned by strip_boilerplate; what should be stored as the caption
    flags: list[str] = field(default_factory=list)  # CaptionFlag values, in CaptionFlag order
    failed: bool = False  # any flag other than boilerplate_stripped
    reason: str | None = None  # the first failing flag: the reject reason


# --- boilerplate ------------------------------------------------------------------------------------------------

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
# Reasoning models (e.g. Qwen3-VL "thinking") put their reasoning first; an unclosed block means the answer never came.
_THINK = re.compile(r"^\s*<think>.*?(?:</think>|\Z)", re.S | re.I)
# Special tokens left in when a backend decodes without skip_special_tokens.
_TOKEN = r"(?:<\|[^|>]{1,40}\|>|</?s>|<eos>|<(?:start|end)_of_turn>)"
_SPECIAL_TOKEN = re.compile(rf"^\s*{_TOKEN}\s*|\s*{_TOKEN}\s*$", re.I)
_ROLE_LINE = re.compile(r"^\s*\**(?:assistant|model|gpt|answer|response)\**\s*:?\s*\**\s*(?:\n|$)", re.I)
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?\**\s*(?:assistant|caption|description|video description|detailed description|answer|response"
    r"|summary)\s*\**\s*:\s*\**\s*",
    re.I,
)
_INTERJECTION = re.compile(r"^\s*(?:sure|certainly|of course|absolutely|okay|ok)\s*[!,.]+\s*", re.I)
# "Here is a detailed description of the video:" — only when it announces a description/caption and ends the
# preamble with a colon or a line break, so a caption that starts "Here is a dog ..." is left alone.
_HERE_IS = re.compile(
    r"^\s*here(?:['\u2019]s|\s+is|\s+are)\b[^\n:]{0,80}?\b(?:description|caption|summary|paragraph)s?\b"
    r"[^\n:]{0,60}(?::|\n)\s*",
    re.I,
)
_ADJ = r"(?:(?:short|brief|given|provided|following|above|whole|entire|full|video)\s+)*"
_NOUN = r"(?:video|clip|footage|film|recording|scene|sequence|animation)"
_VERB = (
    r"(?:shows|depicts|features|captures|displays|presents|portrays|showcases|illustrates|highlights|is\s+showing"
    r"|is\s+depicting)"
)
_SEE = r"(?:we|you|one|viewers)\s+(?:can\s+)?(?:see|observe|watch)"
_OPENERS = [
    # "The (short video) clip shows (us) (that)": the noun must be followed directly by a verb, so "The video game
    # screen shows ..." is not touched.
    re.compile(rf"^\s*(?:the|this)\s+{_ADJ}{_NOUN}\s+{_VERB}(?:\s+us)?\s*:?\s*(?:that\s+)?", re.I),
    # "In this video, (we see)" / "In the video we see": needs the comma or the "we see" so "In the video game, ..."
    # and "In the footage room ..." are not touched.
    re.compile(rf"^\s*in\s+(?:the|this)\s+{_ADJ}{_NOUN}(?:\s*,\s*(?:{_SEE}\s+)?|\s+{_SEE}\s*:?\s*(?:that\s+)?)", re.I),
    # "This is a (short) video of / showing"
    re.compile(rf"^\s*this\s+is\s+an?\s+{_ADJ}{_NOUN}\s+(?:of|showing|depicting|that\s+shows|featuring)\s+", re.I),
]


def _strip_wrapping_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTE_PAIRS and text[-1] == _QUOTE_PAIRS[text[0]]:
        inner = text[1:-1]
        # '"Stop" reads the sign, then "Go"' starts and ends with quotes but is not wrapped in them
        if text[0] in inner or text[-1] in inner:
            break
        text = inner.strip()
    return text


def strip_boilerplate(text: str) -> tuple[str, bool]:
    """Removes chat artifacts and content-free openings; returns (clean text, whether anything was removed).

    Removed: a leading <think>…</think> block, leftover special tokens, a role line ("assistant"), a label
    ("Caption:"), a preamble ("Sure! Here is a description:"), quotes wrapping the whole caption, and openings such as
    "The video shows", "The short video clip features us", "In this video, we see", "This is a video of". The
    first letter is re-capitalised after a removal. Surrounding whitespace alone does not count as a removal.
    """
    original = text.strip()
    text = original
    # each pass peels one layer; real outputs stack a few ("assistant\nSure! Here's the caption:\n\"The video ...")
    for _ in range(10):
        before = text
        text = _THINK.sub("", text, count=1)
        text = _SPECIAL_TOKEN.sub("", text)
        text = _ROLE_LINE.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1)
        text = _INTERJECTION.sub("", text, count=1)
        text = _HERE_IS.sub("", text, count=1)
        text = _strip_wrapping_quotes(text.strip())
        for opener in _OPENERS:
            text = opener.sub("", text, count=1)
        text = text.strip()
        if text == before:
            break
    stripped = text != original
    if stripped and text:
        text = text[0].upper() + text[1:]
    return text, stripped


# --- repetition ---------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[\w']+")
CHAR_NGRAM = 20  # ~4 English words; long enough that ordinary prose rarely repeats one by chance


def _repeated_fraction(items: list) -> float:
    if not items:
        return 0.0
    return 1.0 - len(set(items)) / len(items)


def repetition_score(text: str, n: int = 4) -> float:
    """How much of the text repeats itself, in [0, 1): 0 for ordinary prose, near 1 for a generation loop.

    The larger of two measures:
    - word level: the fraction of word n-grams (lower-cased) that already occurred earlier in the text;
    - character level: the same over character CHAR_NGRAM-grams of the text with whitespace removed, which catches
      loops inside one "word" ("hahaha…", "!!!!…", scripts without spaces) that the word measure sees as one token.
    Text shorter than one n-gram scores 0.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    word_grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    chars = re.sub(r"\s+", "", text.lower())
    char_grams = [chars[i : i + CHAR_NGRAM] for i in range(len(chars) - CHAR_NGRAM + 1)]
    return max(_repeated_fraction(word_grams), _repeated_fraction(char_grams))


# --- refusal ------------------------------------------------------------------------------------------------------

_REFUSAL = re.compile(
    r"(?:(?:sure|okay|ok|certainly|well|hmm|oh|so|but|however)\s*[,!.]?\s+)*(?:"
    r"(?:sorry|apologies|unfortunately)\s*[,!.]"
    r"|i\s*(?:'m|am)\s+(?:sorry|afraid|unable|not\s+able)"
    r"|i\s+(?:cannot|can\s*not|can't|could\s+not|couldn't|won't|will\s+not|do\s+not|don't)\s+"
    r"|i\s+apologi[sz]e"
    r"|as\s+an?\s+(?:ai|a\.i\.|artificial\s+intelligence|language\s+model|text-based)"
    r"|(?:there\s+is\s+)?no\s+video\s+(?:was|has\s+been|is)\s+(?:provided|attached|shared|uploaded)"
    r")",
    re.I,
)
_REFUSAL_ANYWHERE = re.compile(r"\b(?:cannot|can\s*not|can't|unable\s+to)\s+(?:help|assist)\s+with\b", re.I)
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)")
REFUSAL_WINDOW = 200  # characters from the start within which a refusal counts; captions never open like that


def is_refusal(text: str) -> bool:
    """Whether the model declined instead of describing.

    Looks for first-person refusals ("I'm sorry", "I cannot", "I can't", "I am unable to", "As an AI", "Sorry, …",
    "Unfortunately, …", "No video was provided") at the start of a sentence within the first REFUSAL_WINDOW
    characters, and "cannot help/assist with" anywhere in that window. Sentence-start anchoring keeps scene text
    such as a sign reading "sorry we're closed" or a quoted "I'm sorry" from counting.
    """
    head = text.strip().replace("\u2019", "'")[:REFUSAL_WINDOW]
    if _REFUSAL_ANYWHERE.search(head):
        return True
    return any(_REFUSAL.match(head, m.end()) for m in _SENTENCE_START.finditer(head))


# --- the check ----------------------------------------------------------------------------------------------------

_TERMINAL = tuple(".!?…\"'\u201d\u2019)")


def is_truncated(text: str) -> bool:
    """Whether the text stops mid-sentence: its last character is not . ! ? …, a closing quote or bracket."""
    text = text.rstrip()
    return bool(text) and not text.endswith(_TERMINAL)


def check_caption(text: str | None, cfg: QCConfig | None = None) -> QCResult:
    """Cleans a generated caption with strip_boilerplate and flags it; see CaptionFlag for each flag's meaning.

    An empty caption gets only `empty` (and possibly `boilerplate_stripped`); other failure flags are independent,
    so a looping caption cut off at max tokens is both `repetition` and `truncated`, with reason `repetition`.
    """
    cfg = cfg or QCConfig()
    caption, stripped = strip_boilerplate(text or "")
    found: set[CaptionFlag] = set()
    if stripped:
        found.add(CaptionFlag.BOILERPLATE_STRIPPED)
    if not re.search(r"\w", caption):
        found.add(CaptionFlag.EMPTY)
    else:
        words = len(caption.split())
        if is_refusal(caption):
            found.add(CaptionFlag.REFUSAL)
        if repetition_score(caption, cfg.ngram) > cfg.max_repeat_ngram_frac:
            found.add(CaptionFlag.REPETITION)
        if words < cfg.min_words:
            found.add(CaptionFlag.TOO_SHORT)
        if words > cfg.max_words:
            found.add(CaptionFlag.TOO_LONG)
        if is_truncated(caption):
            found.add(CaptionFlag.TRUNCATED)
    flags = [flag for flag in CaptionFlag if flag in found]
    failures = [flag for flag in flags if flag in FAILURE_FLAGS]
    return QCResult(
        caption=caption,
        flags=[flag.value for flag in flags],
        failed=bool(failures),
        reason=failures[0].value if failures else None,
    )
