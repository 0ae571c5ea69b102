"""Tiny random models (captioner/tiny.py): build offline, load through the Auto classes, caption a video, cache."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from captioner import tiny  # noqa: E402

PROMPT = "Describe this video."


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(8, 96, 128, 3), dtype=np.uint8)


def _metadata(frames: np.ndarray, fps: float = 4.0) -> dict:
    # Frames already sampled: fps is the rate of *these* frames; Qwen3-VL needs frames_indices for timestamps.
    return {"fps": fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}


def _caption(model_dir, videos: list[np.ndarray], prompts: list[str] | None = None) -> list[str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    prompts = prompts or [PROMPT] * len(videos)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]
    inputs = processor(
        text=texts,
        videos=videos,
        video_metadata=[_metadata(v) for v in videos],
        do_sample_frames=False,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    merge = processor.video_processor.merge_size
    expected = sum(int(grid.prod()) // merge**2 for grid in inputs["video_grid_thw"])
    assert int((inputs["input_ids"] == video_id).sum()) == expected
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def qwen2_5_dir(work_dir):
    return tiny.build_tiny_qwen2_5_vl(work_dir / "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def qwen3_dir(work_dir):
    return tiny.build_tiny_qwen3_vl(work_dir / "qwen3_vl", seed=0)


def test_build_writes_a_complete_model_dir(qwen2_5_dir):
    names = {p.name for p in qwen2_5_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", tiny.MARKER_NAME} <= names
    assert not [p for p in qwen2_5_dir.parent.iterdir() if ".tmp-" in p.name]
    config = json.loads((qwen2_5_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_loads_back_and_captions_a_video(family, qwen2_5_dir, qwen3_dir, frames):
    from transformers import AutoProcessor

    model_dir = {"qwen2_5_vl": qwen2_5_dir, "qwen3_vl": qwen3_dir}[family]
    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    [caption] = _caption(model_dir, [frames])
    assert isinstance(caption, str) and caption.strip()
    # Every generated token is a whole word from the built-in corpus (suppress_tokens in generation_config).
    assert all(word.isalpha() for word in caption.split())


def test_batched_left_padded_generation_matches_single(qwen2_5_dir, frames):
    other = np.random.default_rng(1).integers(0, 256, size=(6, 120, 160, 3), dtype=np.uint8)
    prompts = [PROMPT, "Describe this video in detail, with the people, the place and the camera motion."]
    batched = _caption(qwen2_5_dir, [frames, other], prompts)
    singles = [_caption(qwen2_5_dir, [frames], prompts[:1])[0], _caption(qwen2_5_dir, [other], prompts[1:])[0]]
    assert batched == singles


def test_same_seed_same_model_and_caption(work_dir, qwen2_5_dir, frames):
    from safetensors.torch import load_file

    again = tiny.build_tiny_qwen2_5_vl(work_dir / "qwen2_5_vl_again", seed=0)
    a, b = load_file(qwen2_5_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (qwen2_5_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert _caption(qwen2_5_dir, [frames]) == _caption(again, [frames])

    other_seed = tiny.build_tiny_qwen2_5_vl(work_dir / "qwen2_5_vl_seed1", seed=1)
    c = load_file(other_seed / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_replaces_an_earlier_model_but_not_a_foreign_dir(work_dir):
    out = work_dir / "replace_me"
    out.mkdir()  # empty: fine
    tiny.build_tiny_text_lm(out)
    (out / "stale.txt").write_text("old")
    tiny.build_tiny_text_lm(out, seed=1)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert json.loads((out / tiny.MARKER_NAME).read_text())["seed"] == 1

    foreign = work_dir / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_text_lm(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in work_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_text_lm_loads_and_generates(work_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny.build_tiny_text_lm(work_dir / "text_lm")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chats = [
        [{"role": "system", "content": "Expand the prompt."}, {"role": "user", "content": "a cat on a chair"}],
        [{"role": "user", "content": "a busy street at night with many cars and people"}],
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    assert texts[1] == (
        "<|im_start|>user\na busy street at night with many cars and people<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    outputs = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(outputs) == 2 and all(o.strip() for o in outputs)


def test_ensure_tiny_model_builds_once_and_reuses(work_dir, monkeypatch):
    cache = work_dir / "cache"
    first = tiny.ensure_tiny_model(cache)  # default family: qwen2_5_vl
    assert first == cache.absolute() / "qwen2_5_vl"
    marker = first / tiny.MARKER_NAME
    stamp = (marker.stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns)
    assert json.loads(marker.read_text())["format_version"] == tiny.FORMAT_VERSION

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    with monkeypatch.context() as m:
        m.setattr(tiny, "_build_in_temp", no_build)
        assert tiny.ensure_tiny_model(cache) == first
    assert (marker.stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns) == stamp

    # The default cache dir follows $RECAP_CACHE.
    monkeypatch.setenv("RECAP_CACHE", str(cache.parent))
    assert tiny.default_cache_dir() == cache.parent / "tiny-models"


def test_ensure_tiny_model_rebuilds_on_format_change(work_dir):
    cache = work_dir / "cache_version"
    model_dir = tiny.ensure_tiny_model(cache, family="text_lm")
    marker = model_dir / tiny.MARKER_NAME
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "format_version": -1}))
    assert tiny.ensure_tiny_model(cache, family="text_lm") == model_dir
    assert json.loads(marker.read_text())["format_version"] == tiny.FORMAT_VERSION
    assert sorted(p.name for p in cache.iterdir()) == ["text_lm"]  # no temp or old copies left behind


def test_ensure_tiny_model_race_keeps_the_winner(work_dir, monkeypatch):
    """Another process installs the model while we build ours: we keep theirs and discard ours."""
    cache = work_dir / "cache_race"
    real_writer = tiny._WRITERS["text_lm"]
    winner_marker = cache.absolute() / "text_lm" / tiny.MARKER_NAME
    calls, stamps = [], []

    def racing_writer(out, seed):
        calls.append(out)
        if len(calls) == 1:
            tiny.ensure_tiny_model(cache, family="text_lm")  # the "other process" wins
            stamps.append(winner_marker.stat().st_mtime_ns)
        real_writer(out, seed)

    monkeypatch.setitem(tiny._WRITERS, "text_lm", racing_writer)
    model_dir = tiny.ensure_tiny_model(cache, family="text_lm")
    assert len(calls) == 2 and model_dir == winner_marker.parent
    assert winner_marker.stat().st_mtime_ns == stamps[0]
    assert sorted(p.name for p in cache.iterdir()) == ["text_lm"]


def test_a_failed_build_leaves_nothing(work_dir, monkeypatch):
    cache = work_dir / "cache_crash"

    def crashing_writer(out, seed):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setitem(tiny._WRITERS, "text_lm", crashing_writer)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.ensure_tiny_model(cache, family="text_lm")
    assert list(cache.iterdir()) == []
    with pytest.raises(ValueError, match="unknown tiny model family"):
        tiny.ensure_tiny_model(cache, family="nope")


def test_a_clip_the_model_cannot_take_is_rejected_alone(qwen3_dir, frames):
    """Qwen3-VL raises on a 1-frame clip (t:1 must be larger than temporal_factor:2): that clip becomes a
    caption_model_error reject, its batch-mates get captions and the stage goes on."""
    import cv2
    import pyarrow as pa

    from pipeline.config import RecapConfig
    from pipeline.stages.caption import CaptionModelStage

    def jpegs(n):
        return [cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]))[1].tobytes() for f in frames[:n]]

    config = RecapConfig.model_validate(
        {"caption": {"model": str(qwen3_dir), "device": "cpu", "max_new_tokens": 8, "qc": {"retry": False}}}
    )
    stage = CaptionModelStage(config)
    rows = [
        {"clip_id": cid, "frames_jpeg": jpegs(n), "sample_fps": 4.0, "user_text": None}
        for cid, n in (("a", 4), ("one-frame", 1), ("b", 4))
    ]
    out = {r["clip_id"]: r for r in stage(pa.Table.from_pylist(rows)).to_pylist()}
    assert out["one-frame"]["caption_flags"] == ["model_error"] and out["one-frame"]["caption_failed"]
    assert "temporal" in out["one-frame"]["caption_raw"]
    for cid in ("a", "b"):
        assert out[cid]["caption_raw"] and "model_error" not in out[cid]["caption_flags"]


def test_device_map_and_attention_kernel_reach_the_loader(qwen2_5_dir, frames):
    from captioner.backends.base import CaptionRequest, Sampling
    from captioner.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(qwen2_5_dir), device="cpu", device_map="cpu", attn_implementation="eager")
    assert backend.model.config._attn_implementation == "eager" and backend.device == "cpu"
    [text] = backend.caption([CaptionRequest("c", list(frames[:4]), 4.0, None)], Sampling(max_new_tokens=4))
    assert isinstance(text, str)
