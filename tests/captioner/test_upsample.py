"""Prompt upsampling with a tiny random text LLM offline, and the style report against training captions."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioner.upsample import Upsampler, build_messages, corpus_captions, style_report


@pytest.fixture(scope="module")
def upsampler(tmp_path_factory):
    from captioner.tiny import build_tiny_text_lm

    path = build_tiny_text_lm(tmp_path_factory.mktemp("tiny_lm") / "lm")
    return Upsampler(str(path), device="cpu")


def test_upsampling_generates_and_batches_like_single_prompts(upsampler):
    examples = ["A red car drives along a coast road at sunset while the camera tracks it from the side."]
    both = upsampler.upsample(["a corgi surfing", "rain on a window at night"], examples, max_new_tokens=12)
    alone = [
        upsampler.upsample([p], examples, max_new_tokens=12)[0]
        for p in ("a corgi surfing", "rain on a window at night")
    ]
    assert all(t.strip() for t in both) and both == alone


def test_few_shot_messages_carry_examples_then_the_prompt():
    messages = build_messages("a corgi surfing", ["One long caption here about a dog.", "Another caption."])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert (
        messages[2]["content"] == "One long caption here about a dog." and messages[-1]["content"] == "a corgi surfing"
    )


def test_style_report_measures_length_and_vocabulary():
    captions = ["a dog runs on the beach in bright sun", "a dog jumps in the waves on the beach"]
    same = style_report(captions, captions)
    assert same.vocab_js_divergence == pytest.approx(0.0) and same.vocab_coverage == 1.0 and same.length_z == 0.0
    other = style_report(["quantum flux capacitor"], captions)
    assert other.vocab_js_divergence == pytest.approx(1.0) and other.vocab_coverage == 0.0
    assert other.length_z < -5  # 3 words against 9 ± 0
    assert "Jensen-Shannon" in " ".join(same.lines())


def test_corpus_captions_come_from_passing_clips(tmp_path):
    clips = tmp_path / "manifest" / "clips"
    clips.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {"clip_id": ["a", "b", "c"], "caption": ["kept one", None, "rejected one"], "passed": [True, True, False]}
        ),
        clips / "part-00000.parquet",
    )
    assert corpus_captions(str(tmp_path)) == ["kept one"]
    (tmp_path / "bare" / "manifest" / "clips").mkdir(parents=True)
    pq.write_table(
        pa.table({"clip_id": ["a"], "passed": [True]}), tmp_path / "bare" / "manifest" / "clips" / "p.parquet"
    )
    with pytest.raises(ValueError, match="recap caption"):
        corpus_captions(str(tmp_path / "bare"))
