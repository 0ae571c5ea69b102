"""Tests of caption quality control over crafted captions: each flag, its false positives, and the cleaning."""

from __future__ import annotations

import pytest

from captioner.quality import (
    FAILURE_FLAGS,
    CaptionFlag,
    QCConfig,
    check_caption,
    is_refusal,
    is_truncated,
    repetition_score,
    strip_boilerplate,
)

GOOD = (
    "A young woman with shoulder-length red hair, wearing a yellow raincoat and black rubber boots, walks along a "
    "wet cobblestone street lined with brick buildings. She stops in front of a bakery window, leans closer to look "
    "at the loaves of bread on display, then turns to her left and continues walking. A man in a dark coat passes "
    "behind her carrying an umbrella. The camera tracks her from the side at waist height in a medium shot, then "
    "slowly pans right to follow her as she moves away from the window. The scene is lit by soft, overcast "
    "daylight, with the glistening stones reflecting the grey sky and the warm light from the bakery window. The "
    "footage is live-action with muted, cool color grading, a shallow depth of field that blurs the background, and "
    "light film grain. On the left side of the frame a red bicycle leans against the wall, and on the right side of "
    "the frame a green door is open."
)


def test_flag_values_and_failure_set():
    assert [f.value for f in CaptionFlag] == [
        "empty",
        "refusal",
        "repetition",
        "too_short",
        "too_long",
        "truncated",
        "boilerplate_stripped",
    ]
    assert CaptionFlag.BOILERPLATE_STRIPPED not in FAILURE_FLAGS
    assert len(FAILURE_FLAGS) == 6


def test_a_normal_long_caption_gets_no_flags():
    result = check_caption(GOOD)
    assert result.flags == []
    assert result.failed is False and result.reason is None
    assert result.caption == GOOD
    assert repetition_score(GOOD) < 0.05


@pytest.mark.parametrize(
    "text", [None, "", "   \n ", '""', "...", "assistant", "<think>the frames show a", "Caption:"]
)
def test_empty(text):
    result = check_caption(text)
    assert result.caption in ("", '""', "...")
    assert result.reason == "empty"
    # nothing else is judged on nothing
    assert set(result.flags) <= {"empty", "boilerplate_stripped"}


def test_only_boilerplate_is_empty():
    result = check_caption("The video shows.")
    assert result.caption == "."
    assert result.flags == ["empty", "boilerplate_stripped"] and result.reason == "empty"


def test_too_short_and_its_boundary():
    assert check_caption("A dog runs across a grassy field.").flags == ["too_short"]  # 7 words
    assert check_caption("A brown dog runs across a grassy field.").flags == []  # 8 words: the minimum passes
    assert check_caption("A dog runs.", QCConfig(min_words=3)).flags == []


def test_too_long_and_its_boundary():
    # distinct tokens, so only the length is at stake
    words = " ".join(f"thing{i}" for i in range(300)) + "."
    n = len(words.split())
    assert n == 300
    assert check_caption(words).flags == []
    result = check_caption(words, QCConfig(max_words=299))
    assert result.flags == ["too_long"] and result.reason == "too_long"


def test_truncated():
    cut = "A dog runs across a snowy field while the camera pans left to follow it and"
    result = check_caption(cut)
    assert result.flags == ["truncated"] and result.reason == "truncated"
    assert is_truncated("A dog barks,")
    assert not is_truncated("A dog barks.")
    for ending in ["!", "?", "\u2026", '"', "'", "\u201d", ")"]:
        assert not is_truncated("The sign says stop" + ending), ending
    assert not is_truncated("")  # empty is its own flag


def test_repetition_scores():
    assert repetition_score("a cat " * 50) > 0.9
    assert repetition_score("ha" * 200) > 0.9  # one long "word": only the character measure sees it
    assert repetition_score("!" * 100) > 0.9
    assert repetition_score("猫" * 100) > 0.9  # no spaces at all
    assert repetition_score(GOOD) < 0.05
    assert repetition_score("A dog runs.") == 0.0  # shorter than one n-gram
    # 12 words give 9 word 4-grams of which 4 are distinct; the character measure (13 distinct of 20) is lower
    three = "A dog runs fast. A dog runs fast. A dog runs fast."
    assert repetition_score(three) == pytest.approx(5 / 9)
    assert repetition_score(three, n=12) == pytest.approx(7 / 20)  # one word 12-gram: the character measure wins


def test_repetition_flag():
    loop = "A man walks down the street. " + "He turns left and walks down the street. " * 12
    result = check_caption(loop)
    assert "repetition" in result.flags and result.reason == "repetition"
    # a loop cut at max tokens is also truncated, but repetition is the reason
    looped_cut = "A woman smiles and " + "waves at the camera and " * 30
    result = check_caption(looped_cut)
    assert result.flags[:1] == ["repetition"] and "truncated" in result.flags
    assert result.reason == "repetition"


def test_repetition_threshold_is_configurable():
    text = "A dog runs fast. A dog runs fast. A cat sleeps on a warm sofa by the window in the sun."
    score = repetition_score(text)
    assert 0 < score < 0.3
    assert "repetition" not in check_caption(text).flags
    assert "repetition" in check_caption(text, QCConfig(max_repeat_ngram_frac=score / 2)).flags


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that request.",
        "I\u2019m sorry, I cannot describe this video because no frames were attached to the message.",
        "I cannot view videos, but I can describe images if you upload them instead.",
        "I can't see any content in the provided frames, they appear to be blank.",
        "As an AI language model, I do not have the ability to watch video clips.",
        "I am unable to provide a description of this clip.",
        "Unfortunately, I cannot determine what is happening in these frames.",
        "Sure, but I cannot see any video here, please share it again.",
        "No video was provided, so there is nothing for me to describe here.",
        "Thanks for the frames. I'm afraid they are too dark to describe anything.",
        "This request is something I cannot help with, as it violates the policy.",
    ],
)
def test_refusals(text):
    assert is_refusal(text)
    result = check_caption(text)
    assert result.reason == "refusal"


@pytest.mark.parametrize(
    "text",
    [
        "A sign reading sorry we're closed hangs on the glass door of a small bakery at night.",
        '"I\'m sorry" is written in white chalk on a blackboard next to a smiling cartoon face.',
        "A man mouths an apology to a woman, who looks away and cannot hide her smile.",
        "A boy tries to lift a heavy box but cannot move it, so he calls his father over to help.",
        GOOD,
    ],
)
def test_not_refusals(text):
    assert not is_refusal(text)
    assert "refusal" not in check_caption(text).flags


def test_refusal_far_from_the_start_does_not_count():
    text = GOOD + " I'm sorry, I cannot say more."
    assert not is_refusal(text)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The video shows a man juggling three red balls.", "A man juggling three red balls."),
        ("This video depicts a quiet harbour at dawn.", "A quiet harbour at dawn."),
        ("In this video, a chef slices onions on a board.", "A chef slices onions on a board."),
        ("The clip features two kids on a swing.", "Two kids on a swing."),
        ("The footage captures waves breaking on rocks.", "Waves breaking on rocks."),
        ("In the video we see a train crossing a bridge.", "A train crossing a bridge."),
        ("This is a video of a cat chasing a laser dot.", "A cat chasing a laser dot."),
        ("The short video clip shows a horse galloping.", "A horse galloping."),
        ("the video shows us that a crowd gathers.", "A crowd gathers."),
        ("THE VIDEO SHOWS a red car.", "A red car."),
        ("Caption: A bird lands on a branch.", "A bird lands on a branch."),
        ("assistant\nA bird lands on a branch.", "A bird lands on a branch."),
        ("Sure! Here is a description:\nA bird lands on a branch.", "A bird lands on a branch."),
        ("Certainly. Here\u2019s a detailed description of the clip:\n\nA bird lands.", "A bird lands."),
        ('  "A bird lands on a branch."  ', "A bird lands on a branch."),
        ("\u201cA bird lands on a branch.\u201d", "A bird lands on a branch."),
        ("A bird lands on a branch.<|im_end|>", "A bird lands on a branch."),
        ("<think>Frames show a bird.</think>\nThe video shows a bird landing.", "A bird landing."),
        (
            'assistant\nSure! Here is the caption:\n"In this video, we see a dog dig a hole."',
            "A dog dig a hole.",
        ),
    ],
)
def test_strip_boilerplate(raw, clean):
    assert strip_boilerplate(raw) == (clean, True)


@pytest.mark.parametrize(
    "text",
    [
        "The video game screen shows a score of 100 and a red spaceship firing lasers.",
        "In the video game, a character jumps over three barrels on a brick platform.",
        "This video camera captures nothing; it lies broken on a wooden table.",
        "Here is a dog running across a snowy field while the camera pans left.",
        '"Stop" reads the red sign, and below it a smaller sign says "Go".',
        "A man points at the clip on his tie, then at the video screen behind him.",
        "In the first scene, a chef cooks pasta; in the second, he plates it.",  # order is content
        GOOD,
    ],
)
def test_strip_boilerplate_leaves_real_content(text):
    assert strip_boilerplate(text) == (text, False)


def test_whitespace_alone_is_not_a_strip():
    assert strip_boilerplate("  A bird lands.\n") == ("A bird lands.", False)
    assert check_caption("  " + GOOD + "\n").flags == []


def test_boilerplate_stripped_is_informational():
    result = check_caption("The video shows " + GOOD[0].lower() + GOOD[1:])
    assert result.caption == GOOD
    assert result.flags == ["boilerplate_stripped"]
    assert result.failed is False and result.reason is None


def test_failure_after_stripping_reports_the_failure():
    result = check_caption("The video shows a dog.")
    assert result.caption == "A dog."
    assert result.flags == ["too_short", "boilerplate_stripped"]
    assert result.failed and result.reason == "too_short"


def test_reason_follows_priority_order():
    result = check_caption("I'm sorry but I can't")  # refusal, too short and truncated at once
    assert result.flags == ["refusal", "too_short", "truncated"]
    assert result.reason == "refusal"


def test_flags_are_plain_strings():
    flags = check_caption("A dog.").flags
    assert flags == ["too_short"] and type(flags[0]) is str


@pytest.mark.parametrize(
    "kwargs", [{"ngram": 0}, {"min_words": 10, "max_words": 5}, {"max_repeat_ngram_frac": 0}, {"min_words": -1}]
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        QCConfig(**kwargs)
