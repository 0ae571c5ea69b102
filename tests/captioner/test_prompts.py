"""Tests of the caption prompt templates: hashes, the built-ins, file templates and placeholder filling."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from captioner.prompts import BUILTIN_PROMPTS, CaptionPrompt, load_prompt, render_user_text

PROMPT = CaptionPrompt(name="custom", version="2", system="You caption videos.", user="Describe the clip.")


def test_hash_is_stable_and_matches_the_documented_recipe():
    same = CaptionPrompt(name="custom", version="2", system="You caption videos.", user="Describe the clip.")
    assert PROMPT.prompt_hash == same.prompt_hash
    # pinned: a change to the canonical JSON (key order, separators, encoding) would silently re-version every corpus
    assert PROMPT.prompt_hash == "e5d7362b981b"
    canonical = '{"name":"custom","system":"You caption videos.","user":"Describe the clip.","version":"2"}'
    assert PROMPT.prompt_hash == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert PROMPT.version_id == f"custom@2+{PROMPT.prompt_hash}"


@pytest.mark.parametrize("field", ["name", "version", "system", "user"])
def test_one_changed_character_in_any_field_changes_the_hash(field):
    changed = dataclasses.replace(PROMPT, **{field: getattr(PROMPT, field) + "x"})
    assert changed.prompt_hash != PROMPT.prompt_hash
    assert changed.version_id != PROMPT.version_id


def test_fields_do_not_bleed_into_each_other():
    # moving text between system and user must not collide, which plain concatenation would allow
    a = CaptionPrompt(name="p", version="1", system="ab", user="c")
    b = CaptionPrompt(name="p", version="1", system="a", user="bc")
    assert a.prompt_hash != b.prompt_hash


@pytest.mark.parametrize(
    "kwargs",
    [{"name": ""}, {"name": "has space"}, {"version": "1+2"}, {"name": "a@b"}, {"user": "   "}, {"system": None}],
)
def test_invalid_prompts_are_refused(kwargs):
    with pytest.raises(ValueError):
        dataclasses.replace(PROMPT, **kwargs)


def test_builtins():
    assert {"dense-v1", "short-v1"} <= set(BUILTIN_PROMPTS)
    for name, prompt in BUILTIN_PROMPTS.items():
        assert prompt.name == name
        assert load_prompt(name) is prompt
    dense = BUILTIN_PROMPTS["dense-v1"].user.lower()
    for topic in (
        "subjects",
        "actions",
        "order",
        "camera",
        "framing",
        "setting",
        "lighting",
        "style",
        "present tense",
    ):
        assert topic in dense, topic
    assert "one paragraph" in dense or "single paragraph" in dense
    assert "the video shows" in dense  # named as a forbidden opening
    assert "one sentence" in BUILTIN_PROMPTS["short-v1"].user.lower()
    assert BUILTIN_PROMPTS["dense-v1"].prompt_hash != BUILTIN_PROMPTS["short-v1"].prompt_hash


def test_builtins_render_unchanged():
    # built-ins take no placeholders, so metadata never leaks into them
    for prompt in BUILTIN_PROMPTS.values():
        assert render_user_text(prompt, {"duration_s": 3.0, "fps": 24.0, "camera_motion": "static"}) == prompt.user


def test_yaml_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        'name: mine\nversion: "1.10"\nsystem: Be precise.\nuser: |\n  Describe the clip.\n  It lasts {duration_s} s.\n'
    )
    prompt = load_prompt(str(path))
    assert prompt == CaptionPrompt(
        name="mine", version="1.10", system="Be precise.", user="Describe the clip.\nIt lasts {duration_s} s.\n"
    )
    assert load_prompt(path) == prompt  # a Path works too


def test_json_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "mine", "version": "3", "system": "", "user": "Describe it."}))
    prompt = load_prompt(str(path))
    assert (prompt.name, prompt.version, prompt.system, prompt.user) == ("mine", "3", "", "Describe it.")
    # a file with the same content as another source gets the same identity
    assert prompt.version_id == CaptionPrompt("mine", "3", "", "Describe it.").version_id


def test_missing_key_is_named_with_the_file(tmp_path):
    path = tmp_path / "missing.yaml"
    path.write_text("name: mine\nversion: '1'\nsystem: s\n")
    with pytest.raises(ValueError, match=r"missing key 'user'.*missing\.yaml"):
        load_prompt(str(path))


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"name": "m", "version": "1", "system": "s", "user": "u", "temperature": 0.2}))
    with pytest.raises(ValueError, match=r"unknown key 'temperature'.*extra\.json"):
        load_prompt(str(path))


def test_non_string_value_is_refused(tmp_path):
    # unquoted YAML 1.10 is the float 1.1: accepting it would record the wrong version
    path = tmp_path / "num.yaml"
    path.write_text("name: m\nversion: 1.10\nsystem: s\nuser: u\n")
    with pytest.raises(ValueError, match=r"'version'.*num\.yaml.*float"):
        load_prompt(str(path))


@pytest.mark.parametrize("content", ["- a list\n- not a mapping\n", "", "name: [unclosed\n"])
def test_malformed_files_are_refused_with_the_file_name(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.yaml"):
        load_prompt(str(path))


def test_unknown_spec_lists_the_builtins(tmp_path):
    with pytest.raises(ValueError, match=r"dense-v1.*short-v1"):
        load_prompt("dense-v9")
    with pytest.raises(ValueError, match="neither a built-in"):
        load_prompt(str(tmp_path / "absent.yaml"))


def test_render_fills_placeholders():
    prompt = dataclasses.replace(PROMPT, user="Clip of {duration_s} s at {fps} fps; camera: {camera_motion}.")
    clip = {"duration_s": 4.2666, "fps": 29.97002997, "camera_motion": "pan_left", "clip_id": "x"}
    assert render_user_text(prompt, clip) == "Clip of 4.3 s at 29.97 fps; camera: pan left."
    assert render_user_text(prompt, {"duration_s": 5.0, "fps": 24, "camera_motion": "static"}) == (
        "Clip of 5 s at 24 fps; camera: static."
    )


def test_render_missing_values_become_unknown():
    import numpy as np

    prompt = dataclasses.replace(PROMPT, user="{duration_s}|{fps}|{camera_motion}")
    assert render_user_text(prompt, {}) == "unknown|unknown|unknown"
    assert render_user_text(prompt, {"duration_s": float("nan"), "fps": None, "camera_motion": ""}) == (
        "unknown|unknown|unknown"
    )
    # parquet rows hold numpy scalars
    assert render_user_text(prompt, {"duration_s": np.float32(2.0), "fps": np.float64("nan")}) == ("2|unknown|unknown")


def test_render_leaves_other_braces_alone():
    prompt = dataclasses.replace(
        PROMPT, user='Answer as {"caption": "..."}; ignore {other}, {0} and { and }} but use {fps}.'
    )
    assert render_user_text(prompt, {"fps": 25.0}) == (
        'Answer as {"caption": "..."}; ignore {other}, {0} and { and }} but use 25.'
    )


def test_the_token_budget_fits_the_longest_caption_the_prompt_asks_for():
    from captioner.prompts import load_prompt, token_budget
    from pipeline.config import CaptionConfig

    assert token_budget(load_prompt("dense-v1"), max_words=300) == 384  # "80 to 200 words": 200 * 1.6 + 64
    assert token_budget(load_prompt("short-v1"), max_words=300) == 112  # "at most 30 words"
    assert token_budget(load_prompt("dense-v1"), max_words=100) == 224  # never past what QC would accept
    assert CaptionConfig().max_new_tokens is None  # the default follows the prompt, not a fixed 256
