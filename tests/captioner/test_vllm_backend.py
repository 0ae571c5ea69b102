"""The vLLM backend up to the engine call: prompts, video inputs, sampling and engine settings.

The engine itself needs vLLM and a GPU; that test runs only where both exist and says so otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from captioner.backends.base import CaptionRequest, Sampling
from captioner.backends.vllm import build_vllm_inputs, engine_kwargs, runtime_env, sampling_kwargs
from pipeline.config import CaptionConfig


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from captioner.tiny import build_tiny_qwen2_5_vl

    path = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_vlm") / "qwen")
    return AutoProcessor.from_pretrained(path)


def _request(n: int = 4) -> CaptionRequest:
    frames = [np.full((32, 48, 3), i * 40, np.uint8) for i in range(n)]
    return CaptionRequest("clip-a", frames, fps=2.0, user_text="Describe the clip.", system="Be precise.")


def test_inputs_carry_the_chat_prompt_and_the_frames(processor):
    [inputs] = build_vllm_inputs(processor, [_request()])
    prompt = inputs["prompt"]
    assert prompt.count("<|vision_start|><|video_pad|><|vision_end|>") == 1
    assert "Describe the clip." in prompt and "Be precise." in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    [(video, metadata)] = inputs["multi_modal_data"]["video"]
    assert video.shape == (4, 32, 48, 3) and video.dtype == np.uint8 and video[3, 0, 0, 0] == 120
    assert metadata["fps"] == 2.0 and metadata["frames_indices"] == [0, 1, 2, 3] and metadata["duration"] == 2.0
    assert inputs["mm_processor_kwargs"] == {"do_sample_frames": False}


def test_sampling_and_engine_settings():
    assert sampling_kwargs(Sampling(max_new_tokens=99)) == {
        "max_tokens": 99,
        "temperature": 0.0,
        "repetition_penalty": 1.05,
        "seed": 0,
    }
    assert sampling_kwargs(Sampling(temperature=0.7, top_p=0.9, seed=1))["top_p"] == 0.9
    cfg = CaptionConfig(
        backend="vllm",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        dtype="bfloat16",
        vllm={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_model_len": 16384},
    )
    kwargs = engine_kwargs(cfg, "/models/qwen")
    assert kwargs == {
        "model": "/models/qwen",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "trust_remote_code": False,
        "limit_mm_per_prompt": {"video": 1, "image": 0},
        "seed": 0,
        "max_model_len": 16384,
        "dtype": "bfloat16",
    }
    assert runtime_env(cfg) == {"uv": {"packages": ["vllm==0.33.0"]}, "config": {"setup_timeout_seconds": 1800}}
    pip = runtime_env(CaptionConfig(vllm={"installer": "pip", "setup_timeout_seconds": 2400}))
    assert pip == {"pip": {"packages": ["vllm==0.33.0"], "pip_check": True}, "config": {"setup_timeout_seconds": 2400}}
    image = runtime_env(CaptionConfig(vllm={"image_uri": "registry/recap-vllm:1"}))
    assert image == {"image_uri": "registry/recap-vllm:1", "config": {"setup_timeout_seconds": 1800}}
    from ray.runtime_env import RuntimeEnv

    for env in (runtime_env(cfg), pip, image):
        RuntimeEnv(**env)  # Ray's own validation accepts each form


def test_the_vllm_extra_fits_recaps_own_pins():
    """vLLM 0.33.0 needs transformers>=5.16.1,<5.20 and torch==2.13.0: recap's ranges must admit them."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert all(deps["transformers"].specifier.contains(v) for v in ("5.16.1", "5.19.0"))
    assert deps["torch"].specifier.contains("2.13.0")
    assert project["optional-dependencies"]["vllm"] == ["vllm==0.33.0"]
    assert "num2words" in deps  # SmolVLM2's processor needs it and transformers does not declare it


def test_frames_of_different_sizes_are_refused(processor):
    bad = _request()
    bad.frames[1] = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="clip-a"):
        build_vllm_inputs(processor, [bad])


def test_engine_generates_on_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM engine test needs a CUDA GPU (none here); inputs are checked above")
    pytest.importorskip("vllm", reason="vLLM not installed in this environment (it runs in its own runtime_env)")
    from captioner.backends.vllm import VLLMBackend

    backend = VLLMBackend(
        CaptionConfig(backend="vllm", model="recap-tiny:qwen2_5_vl", vllm={"gpu_memory_utilization": 0.2})
    )
    [caption] = backend.caption([_request()], Sampling(max_new_tokens=8))
    assert caption.strip()
