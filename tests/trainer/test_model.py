"""The DiT: patches, positions, adaLN-Zero start, caption masking, preset sizes."""

from __future__ import annotations

import pytest
import torch

from trainer.model import PRESETS, apply_rotary, build_model, count_params, pad_to_patch, patchify, rope_3d, unpatchify


def test_patchify_unpatchify_round_trip_and_token_layout():
    x = torch.randn(2, 3, 4, 6, 8)
    tokens, grid = patchify(x, (2, 3, 2))
    assert grid == (2, 2, 4) and tokens.shape == (2, 16, 3 * 2 * 3 * 2)
    # token (t=1, h=0, w=2) holds x[:, :, 2:4, 0:3, 4:6]
    index = 1 * (2 * 4) + 0 * 4 + 2
    assert torch.equal(tokens[:, index].reshape(2, 3, 2, 3, 2), x[:, :, 2:4, 0:3, 4:6])
    assert torch.equal(unpatchify(tokens, grid, (2, 3, 2), 3), x)


def test_any_latent_size_comes_back_in_its_own_shape():
    model = build_model("tiny", in_channels=4, text_dim=8, patch_size=(2, 2, 2))
    for shape in [(1, 4, 3, 5, 7), (2, 4, 1, 8, 6)]:
        x = torch.randn(shape)
        assert pad_to_patch(x, (2, 2, 2)).shape[-3:] == tuple(-(-d // 2) * 2 for d in shape[-3:])
        out = model(x, torch.rand(shape[0]), torch.randn(shape[0], 3, 8), torch.ones(shape[0], 3, dtype=torch.bool))
        assert out.shape == x.shape


def test_adaln_zero_model_starts_as_zero_velocity():
    model = build_model("tiny", in_channels=4, text_dim=8)
    out = model(torch.randn(2, 4, 2, 4, 4), torch.rand(2), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0


def test_rotary_attention_scores_depend_on_offsets_only():
    cos, sin = rope_3d((8, 4, 4), head_dim=24)
    q, k = torch.randn(24), torch.randn(24)

    def score(a: int, b: int) -> float:  # tokens at t=a and t=b (h = w = 0)
        qa = apply_rotary(q.view(1, 1, 1, 24), cos[a * 16], sin[a * 16])
        kb = apply_rotary(k.view(1, 1, 1, 24), cos[b * 16], sin[b * 16])
        return float((qa * kb).sum())

    assert score(1, 3) == pytest.approx(score(4, 6), rel=1e-5)
    assert score(1, 3) != pytest.approx(score(1, 4), rel=1e-3)


def test_masked_caption_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = build_model("tiny", in_channels=4, text_dim=8)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.5)  # leave the all-zero start
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.rand(1)
    text = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    changed_padding = text.clone()
    changed_padding[:, 2:] = torch.randn(1, 2, 8)
    changed_caption = text.clone()
    changed_caption[:, 0] = torch.randn(8)
    with torch.no_grad():
        base = model(x, t, text, mask)
        assert torch.allclose(model(x, t, changed_padding, mask), base, atol=1e-6)
        assert not torch.allclose(model(x, t, changed_caption, mask), base, atol=1e-4)
        dropped = model(x, t, text, torch.zeros_like(mask))  # no caption token at all: the register alone
        assert torch.isfinite(dropped).all()


def test_presets_span_tiny_to_about_a_billion_parameters():
    with torch.device("meta"):
        sizes = {name: count_params(build_model(name, in_channels=32, text_dim=4096)) for name in PRESETS}
    assert sizes["tiny"] < 1_000_000
    assert 0.9e9 < sizes["1B"] < 1.2e9
    assert sizes["S"] < sizes["B"] < sizes["L"] < sizes["XL"] < sizes["1B"]
    with pytest.raises(ValueError, match="choose one of tiny, S, B, L, XL, 1B"):
        build_model("huge", in_channels=4, text_dim=8)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model("tiny", in_channels=4, text_dim=8)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # leave the all-zero start
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2)
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    target = torch.randn_like(x)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        (model(x, t, text, mask) - target).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert sum(int(g.abs().sum() > 0) for g in grads[0]) > len(grads[0]) // 2


@pytest.mark.parametrize("preset", ["tiny", "S"])
def test_flop_count_matches_torchs_flop_counter(preset):
    """flops_per_sample counts per-token, per-caption-token and per-sample work apart (MFU is not overstated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(preset, in_channels=32, text_dim=48)
    x, t = torch.randn(2, 32, 3, 8, 12), torch.rand(2)
    text, mask = torch.randn(2, 7, 48), torch.ones(2, 7, dtype=torch.bool)
    tokens = 3 * 4 * 6  # patch (1, 2, 2)
    # The math kernel runs attention as matmuls the counter sees (it has no formula for the CPU flash kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        model(x, t, text, mask)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as training:
        model(x, t, text, mask).float().pow(2).mean().backward()
    counted = model.flops_per_sample(tokens, 7) * 2
    assert forward.get_total_flops() == pytest.approx(counted / 3, rel=0.02)
    assert training.get_total_flops() == pytest.approx(counted, rel=0.02)


def test_gpu_peaks_match_whole_names():
    from trainer.distributed import peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_for_name("NVIDIA H100 PCIe") == 756.5
    assert peak_for_name("NVIDIA H100 NVL") == 835.5
    assert peak_for_name("NVIDIA H200") == 989.4
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA L40") == 181.05 and peak_for_name("NVIDIA L40S") == 362.05
    assert peak_for_name("NVIDIA L4") == 121.0
    assert peak_for_name("NVIDIA A10G") is None and peak_for_name("NVIDIA GeForce RTX 4090") is None


def test_per_frame_timesteps_equal_to_t_match_the_per_sample_path_and_given_frames_change_it():
    torch.manual_seed(0)
    model = build_model("tiny", 4, 8, patch_size=(2, 2, 2))
    for p in model.parameters():  # adaLN-Zero starts at zero velocity: perturb so timesteps matter
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 5, 6, 6), torch.rand(2)
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    same = model(x, t, text, mask, frame_t=t[:, None].expand(2, 5))
    assert torch.allclose(model(x, t, text, mask), same, atol=1e-5)
    frame_t = t[:, None].expand(2, 5).clone()
    frame_t[:, 0] = 0.0  # frame 0 shares its patch (pt=2) with noisy frame 1: that token stays noisy
    assert torch.allclose(model(x, t, text, mask, frame_t=frame_t), same, atol=1e-5)
    frame_t[:, 1] = 0.0
    assert not torch.allclose(model(x, t, text, mask, frame_t=frame_t), same, atol=1e-3)
