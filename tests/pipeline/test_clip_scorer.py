"""ClipScorer on a tiny randomly initialised open_clip model, loaded back from a checkpoint file like real weights.

No network: the architecture is registered from a JSON config in tmp_path and sockets are refused in this module.
"""

from __future__ import annotations

import math
import os
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported, so set before open_clip

import numpy as np
import open_clip  # noqa: E402
import pytest
import torch

from pipeline.scoring.clip import NSFW_PROMPTS, WATERMARK_PROMPTS, ClipScorer  # noqa: E402

MODEL = "recap-tiny-clip"  # pipeline.scoring.tiny_clip.MODEL_NAME
EMBED_DIM = 32
LOGIT_SCALE = 20.0  # set by the conftest fixture: not open_clip's init value, so random init cannot pass for it


@pytest.fixture(scope="module", autouse=True)
def no_network():
    def refuse(*args, **kwargs):
        raise OSError("network access in test_clip_scorer")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def tiny(tiny_clip) -> dict:
    """The tiny architecture's JSON config, a checkpoint of it, and the state dict that went into the checkpoint."""
    open_clip.add_model_config(tiny_clip["config"])
    return tiny_clip


def make_scorer(tiny: dict, **kwargs) -> ClipScorer:
    kwargs.setdefault("device", "cpu")
    return ClipScorer(model=MODEL, pretrained=tiny["checkpoint"], model_config=tiny["config"], **kwargs)


@pytest.fixture(scope="module")
def heads(tiny: dict) -> dict:
    """Head files over the tiny model's embeddings: linear (.pt and the same weights as .npz) and a 2-layer MLP."""
    g = torch.Generator().manual_seed(7)
    root = tiny["root"]
    linear = {"weight": torch.randn(1, EMBED_DIM, generator=g), "bias": torch.randn(1, generator=g)}
    torch.save(linear, root / "linear.pt")
    np.savez(root / "linear.npz", weight=linear["weight"].numpy(), bias=linear["bias"].numpy())
    # Index 1 is where the ReLU sat in nn.Sequential(Linear, ReLU, Linear): keys are 0 and 2.
    mlp = {
        "layers.0.weight": torch.randn(8, EMBED_DIM, generator=g),
        "layers.0.bias": torch.randn(8, generator=g),
        "layers.2.weight": torch.randn(1, 8, generator=g),
        "layers.2.bias": torch.randn(1, generator=g),
    }
    torch.save(mlp, root / "mlp.pt")
    wrong = {"weight": torch.randn(1, 16, generator=g), "bias": torch.zeros(1)}
    torch.save(wrong, root / "wrong_dim.pt")
    return {
        "linear": linear,
        "mlp": mlp,
        "linear_pt": str(root / "linear.pt"),
        "linear_npz": str(root / "linear.npz"),
        "mlp_pt": str(root / "mlp.pt"),
        "wrong_dim_pt": str(root / "wrong_dim.pt"),
    }


@pytest.fixture(scope="module")
def scorer(tiny: dict, heads: dict) -> ClipScorer:
    return make_scorer(tiny, aesthetic_head=heads["linear_pt"], batch_size=4)


def frames(seed: int, n: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def gradients(n: int) -> list[np.ndarray]:
    """Smooth colour ramps, nothing like uniform noise."""
    out = []
    for i in range(n):
        ramp = np.linspace(0, 255, 80, dtype=np.float32)
        img = np.zeros((60, 80, 3), np.float32)
        img[..., 0] = ramp[None, :]
        img[..., 1] = 40.0 * i
        img[..., 2] = 255 - ramp[None, :]
        out.append(img.astype(np.uint8))
    return out


def test_checkpoint_weights_are_loaded(scorer: ClipScorer, tiny: dict) -> None:
    loaded = scorer.model.state_dict()
    assert set(loaded) == set(tiny["state"])
    for key, value in tiny["state"].items():
        assert torch.equal(loaded[key].cpu(), value), key
    assert scorer.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-5)
    assert scorer.embed_dim == EMBED_DIM
    assert not scorer.model.training


def test_embeddings_unit_norm_deterministic_and_batch_independent(scorer: ClipScorer, tiny: dict) -> None:
    images = frames(1, 5) + frames(2, 2, size=(100, 30)) + frames(3, 2, size=(7, 500))  # 9 frames, batches of 4
    first = scorer.embed_images(images)
    second = scorer.embed_images(images)
    assert first.dtype == np.float32 and first.shape == (9, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, second)
    one_batch = make_scorer(tiny, batch_size=64, safety_prompts=False).embed_images(images)
    np.testing.assert_allclose(one_batch, first, atol=1e-5)
    # By hand through the model's own eval transform: the scorer must not resize or normalise its own way.
    from PIL import Image

    with torch.no_grad():
        batch = torch.stack([scorer.preprocess(Image.fromarray(im)) for im in images])
        expected = torch.nn.functional.normalize(scorer.model.encode_image(batch), dim=-1).numpy()
    np.testing.assert_allclose(first, expected, atol=1e-5)
    assert scorer.embed_images([]).shape == (0, EMBED_DIM)


def test_identical_clips_match_and_different_clips_differ(scorer: ClipScorer) -> None:
    noise, ramps = frames(10, 3), gradients(3)
    a, a_again, b = scorer.score_clips([noise, [f.copy() for f in noise], ramps])
    for key in ("score_aesthetic", "score_nsfw", "score_watermark"):
        assert a[key] == a_again[key]
    np.testing.assert_array_equal(a["clip_embedding"], a_again["clip_embedding"])
    assert a["clip_embedding"].dtype == np.float32 and a["clip_embedding"].shape == (EMBED_DIM,)
    assert float(a["clip_embedding"] @ b["clip_embedding"]) < 0.999
    assert a["score_aesthetic"] != b["score_aesthetic"]
    # The clip embedding is the re-normalised mean of its frames' embeddings.
    mean = scorer.embed_images(ramps).mean(axis=0)
    np.testing.assert_allclose(b["clip_embedding"], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b["clip_embedding"]), 1.0, atol=1e-6)


def _head_by_hand(weights: dict[str, torch.Tensor], embeddings: np.ndarray) -> float:
    x = torch.from_numpy(embeddings)
    if "weight" in weights:
        return float((x @ weights["weight"].T + weights["bias"]).mean())
    hidden = torch.relu(x @ weights["layers.0.weight"].T + weights["layers.0.bias"])
    return float((hidden @ weights["layers.2.weight"].T + weights["layers.2.bias"]).mean())


def test_aesthetic_linear_head_is_mean_of_frame_scores(scorer: ClipScorer, heads: dict) -> None:
    clip = frames(20, 4) + gradients(2)
    (result,) = scorer.score_clips([clip])
    expected = _head_by_hand(heads["linear"], scorer.embed_images(clip))
    assert result["score_aesthetic"] == pytest.approx(expected, abs=1e-5)


def test_aesthetic_mlp_head_applies_relu_per_frame_then_averages(tiny: dict, heads: dict) -> None:
    with pytest.raises(ValueError, match="aesthetic_head_activation to relu or none"):  # 0, 2: ReLU or Dropout?
        make_scorer(tiny, aesthetic_head=heads["mlp_pt"], safety_prompts=False)
    mlp_scorer = make_scorer(tiny, aesthetic_head=heads["mlp_pt"], safety_prompts=False, head_activation="relu")
    clip = frames(21, 3) + gradients(3)
    (result,) = mlp_scorer.score_clips([clip])
    embeddings = mlp_scorer.embed_images(clip)
    expected = _head_by_hand(heads["mlp"], embeddings)
    assert result["score_aesthetic"] == pytest.approx(expected, abs=1e-5)
    # Without the ReLU the number differs, so the test above pins the activation.
    w0, b0, w2, b2 = (
        heads["mlp"][k] for k in ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    )
    no_relu = float(((torch.from_numpy(embeddings) @ w0.T + b0) @ w2.T + b2).mean())
    assert abs(no_relu - expected) > 1e-3
    assert "score_nsfw" not in result and "score_watermark" not in result


def _laion_layout(path, relu: bool, seed: int) -> tuple[dict, list]:
    """A head in the LAION aesthetic predictor's layout (768->1024->128->64->16->1 scaled down to the tiny width)."""
    g = torch.Generator().manual_seed(seed)
    widths = [EMBED_DIM, 24, 12, 8, 4, 1]
    indices = (0, 3, 6, 9, 11) if relu else (0, 2, 4, 6, 7)
    state, linears = {}, []
    for i, (n_in, n_out) in zip(indices, zip(widths[:-1], widths[1:], strict=True), strict=True):
        w, b = torch.randn(n_out, n_in, generator=g) * 0.5, torch.randn(n_out, generator=g) * 0.5
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = w, b
        linears.append(torch.nn.Linear(n_in, n_out))
        linears[-1].weight.data, linears[-1].bias.data = w, b
    torch.save(state, path)
    return state, linears


@pytest.mark.parametrize("relu", [False, True])
def test_laion_head_layouts_score_as_their_real_forward_pass(tiny: dict, tmp_path, relu: bool) -> None:
    """sac+logos+ava1-l14-linearMSE (Linear/Dropout chain, no activation) and its ReLU variant, run as the
    original nn.Sequential runs them (eval: Dropout is the identity)."""
    path = tmp_path / "head.pt"
    _state, linears = _laion_layout(path, relu, seed=3)
    modules: list[torch.nn.Module] = []
    for i, linear in enumerate(linears):
        modules.append(linear)
        if i < len(linears) - 1:
            modules += [torch.nn.ReLU(), torch.nn.Dropout(0.2)] if relu else [torch.nn.Dropout(0.2)]
    reference = torch.nn.Sequential(*modules).eval()
    laion = make_scorer(tiny, aesthetic_head=str(path), safety_prompts=False)
    clip = frames(5, 3)
    (result,) = laion.score_clips([clip])
    with torch.no_grad():
        expected = float(reference(torch.from_numpy(laion.embed_images(clip))).mean())
    assert result["score_aesthetic"] == pytest.approx(expected, abs=1e-5)


def test_openai_weights_get_the_quickgelu_build() -> None:
    from pipeline.scoring.clip import openai_model_name

    available = open_clip.list_models()
    assert openai_model_name("ViT-L-14", "openai", available) == "ViT-L-14-quickgelu"
    assert openai_model_name("ViT-L-14", "laion2b_s32b_b82k", available) == "ViT-L-14"
    assert openai_model_name("ViT-L-14-quickgelu", "openai", available) == "ViT-L-14-quickgelu"


def test_npz_head_equals_state_dict_head(scorer: ClipScorer, tiny: dict, heads: dict) -> None:
    npz_scorer = make_scorer(tiny, aesthetic_head=heads["linear_npz"], safety_prompts=False)
    clips = [frames(30, 3), gradients(2)]
    for from_pt, from_npz in zip(scorer.score_clips(clips), npz_scorer.score_clips(clips), strict=True):
        assert from_npz["score_aesthetic"] == pytest.approx(from_pt["score_aesthetic"], abs=1e-6)


def test_head_with_wrong_input_dim_names_both_dims(tiny: dict, heads: dict) -> None:
    with pytest.raises(ValueError) as excinfo:
        make_scorer(tiny, aesthetic_head=heads["wrong_dim_pt"])
    assert "16" in str(excinfo.value) and "32" in str(excinfo.value)


@pytest.mark.parametrize(
    "state, match",
    [
        ({"weight": torch.zeros(2, EMBED_DIM), "bias": torch.zeros(2)}, "outputs, expected 1"),
        (
            {"l.0.weight": torch.zeros(8, EMBED_DIM), "l.0.bias": torch.zeros(8), "l.2.weight": torch.zeros(1, 4)},
            "takes 4 inputs",
        ),
        ({"encoder.weight.extra": torch.zeros(1, EMBED_DIM)}, "neither weight/bias"),
    ],
)
def test_malformed_head_files_are_rejected(tiny: dict, tmp_path, state: dict, match: str) -> None:
    path = tmp_path / "head.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        make_scorer(tiny, aesthetic_head=str(path))


def test_zero_shot_probabilities_match_softmax_over_prompts(scorer: ClipScorer) -> None:
    clip = frames(40, 3)
    (result,) = scorer.score_clips([clip])
    tokenizer = open_clip.get_tokenizer(MODEL)
    embeddings = torch.from_numpy(scorer.embed_images(clip))
    for key, prompts in (("score_nsfw", NSFW_PROMPTS), ("score_watermark", WATERMARK_PROMPTS)):
        with torch.no_grad():
            text = torch.nn.functional.normalize(scorer.model.encode_text(tokenizer(list(prompts))), dim=-1)
        probs = (LOGIT_SCALE * embeddings @ text.T).softmax(dim=-1)[:, 1]
        assert 0.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(float(probs.mean()), abs=1e-5)


def test_empty_clip_gets_nan_scores_and_zero_embedding(scorer: ClipScorer) -> None:
    clip = frames(50, 2)
    alone = scorer.score_clips([clip])[0]
    empty, with_neighbour, empty_again = scorer.score_clips([[], clip, []])
    for result in (empty, empty_again):
        assert all(math.isnan(result[k]) for k in ("score_aesthetic", "score_nsfw", "score_watermark"))
        np.testing.assert_array_equal(result["clip_embedding"], np.zeros(EMBED_DIM, np.float32))
    np.testing.assert_allclose(with_neighbour["clip_embedding"], alone["clip_embedding"], atol=1e-6)
    assert with_neighbour["score_aesthetic"] == pytest.approx(alone["score_aesthetic"], abs=1e-6)
    assert scorer.score_clips([]) == []


def test_frames_must_be_rgb_uint8(scorer: ClipScorer) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        scorer.embed_images([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="RGB uint8"):
        scorer.embed_images([np.zeros((32, 32, 3), np.float32)])


def test_missing_config_file_is_reported(tiny: dict, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model_config"):
        ClipScorer(model=MODEL, pretrained=tiny["checkpoint"], model_config=str(tmp_path / "absent.json"))


def test_missing_open_clip_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match="pip install open-clip-torch"):
        ClipScorer(model=MODEL)
