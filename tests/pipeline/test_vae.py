"""Tiny random diffusers VAEs (image and video) saved and loaded back through from_pretrained, behind recap's
Vae interface: latent shapes, frame grids, normalisation and the stored posterior."""

from __future__ import annotations

import pytest
import torch

from pipeline.vae.load import VaeError, load_vae, vae_geometry
from pipeline.vae.tiny import ensure_tiny_vae


@pytest.fixture(scope="module")
def kl():
    return load_vae("recap-tiny:autoencoder_kl")


@pytest.fixture(scope="module")
def wan():
    return load_vae("recap-tiny:wan")


def _frames(t: int, h: int = 32, w: int = 48, b: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (t, 3, h, w) if b is None else (b, t, 3, h, w)
    return torch.rand(shape, generator=g)


def test_image_vae_latents_and_normalisation(kl):
    import diffusers

    assert kl.kind == "diffusers" and kl.temporal_factor == 1 and kl.spatial_factor == 8
    assert (kl.scaling_factor, kl.shift_factor) == (0.5, 0.1)
    x = _frames(3)
    posterior = kl.encode(x)
    assert posterior.mean.shape == (4, 3, 4, 6) and posterior.logvar.shape == (4, 3, 4, 6)
    # The same weights read by diffusers directly: z = (mu - shift) * scaling, frames in [-1, 1].
    raw = diffusers.AutoencoderKL.from_pretrained(str(ensure_tiny_vae("autoencoder_kl"))).eval()
    with torch.no_grad():
        dist = raw.encode(x * 2 - 1).latent_dist
    expected = ((dist.mean - 0.1) * 0.5).transpose(0, 1)  # (T, C, h, w) -> (C, T, h, w)
    torch.testing.assert_close(posterior.mean, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(posterior.logvar, (dist.logvar + 2 * torch.log(torch.tensor(0.5))).transpose(0, 1))
    with torch.no_grad():
        decoded_raw = (raw.decode(dist.mean).sample + 1) / 2
    torch.testing.assert_close(kl.decode(posterior.mean), decoded_raw.clamp(0, 1), atol=1e-4, rtol=1e-3)


def test_image_vae_batches_frames_without_changing_results(kl):
    x = _frames(5, b=2)
    whole = kl.encode(x).mean
    kl.frames_per_batch, saved = 2, kl.frames_per_batch
    try:
        chunked = kl.encode(x).mean
    finally:
        kl.frames_per_batch = saved
    assert whole.shape == (2, 4, 5, 4, 6)
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-4)


def test_video_vae_frame_grid_and_statistics(wan):
    import diffusers

    assert wan.temporal_factor == 4 and wan.spatial_factor == 8 and wan.is_video
    posterior = wan.encode(_frames(9))
    assert posterior.mean.shape == (4, 3, 4, 6)  # 1 + 8/4 latent frames
    assert wan.decode(posterior.mean).shape == (9, 3, 32, 48)
    raw = diffusers.AutoencoderKLWan.from_pretrained(str(ensure_tiny_vae("wan"))).eval()
    with torch.no_grad():
        mu = raw.encode((_frames(9) * 2 - 1).transpose(0, 1)[None]).latent_dist.mean[0]
        # Checked here: off the 1+4k grid, diffusers drops frames without a word (7 frames decode to 5).
        short = raw.encode(torch.zeros(1, 3, 7, 32, 48)).latent_dist.mean
        assert raw.decode(short).sample.shape[2] == 5
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1, 1)
    std = torch.tensor([1.5, 0.8, 1.2, 1.0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(posterior.mean, (mu - mean) / std, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="frame grid 1 \\+ k\\*4"):
        wan.encode(_frames(7))


def test_geometry_without_weights_and_bad_specs(tmp_path):
    class Cfg:
        vae_fallback = None
        vae_subfolder = None

    for spec, expected in (("recap-tiny:wan", (4, 8)), ("recap-tiny:autoencoder_kl", (1, 8))):
        Cfg.vae = spec
        assert vae_geometry(Cfg) == expected
    with pytest.raises(VaeError, match="does not exist"):
        load_vae(str(tmp_path / "missing"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(VaeError, match="UNet2DConditionModel.*supported diffusers VAEs: AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))
    # A whole pipeline directory: its vae/ subfolder is found.
    pipe = tmp_path / "pipe"
    (pipe / "vae").mkdir(parents=True)
    for f in ensure_tiny_vae("autoencoder_kl").iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != "recap_tiny_model.json":
            (pipe / "vae" / f.name).write_bytes(f.read_bytes())
    assert load_vae(str(pipe)).vae_id.endswith("/vae")


def test_weights_hash_ignores_file_format_but_not_weights(kl, tmp_path):
    from pipeline.vae.load import weights_sha256

    same = load_vae("recap-tiny:autoencoder_kl")
    assert same.sha256 == kl.sha256
    with torch.no_grad():
        next(same.model.parameters()).add_(1e-3)
    assert weights_sha256(same.model) != kl.sha256


def test_weights_hash_is_the_same_in_any_load_dtype(kl):
    """A bf16-encoded corpus (CUDA's default) decodes with an fp32 load on CPU: one id for one set of weights."""
    from pipeline.vae.load import weights_sha256

    assert load_vae("recap-tiny:autoencoder_kl", dtype="bfloat16").sha256 == kl.sha256
    scale = torch.nn.Module()
    scale.timestep_scale_multiplier = torch.nn.Parameter(torch.tensor(1000.0))  # LTX >= 0.9.1 has a 0-d one
    assert len(weights_sha256(scale)) == 64


def test_timestep_conditioned_ltx_vae_encodes_and_decodes():
    """LTX-Video >= 0.9.1: a 0-d decoder parameter (hashable now) and a decoder that needs a timestep."""
    ltx = load_vae("recap-tiny:ltx")
    assert ltx.timestep_conditioning and len(ltx.sha256) == 64
    assert (ltx.temporal_factor, ltx.spatial_factor) == (4, 4)
    latents = ltx.encode(_frames(9, 32, 32)).mean
    assert tuple(latents.shape) == (8, 3, 8, 8)
    frames = ltx.decode(latents)
    assert tuple(frames.shape) == (9, 3, 32, 32) and torch.isfinite(frames).all()
    torch.testing.assert_close(ltx.decode(latents), frames)  # the decode noise is seeded: same frames again


def test_memory_options_reach_the_vae_and_wan_stays_fp32():
    wan = load_vae("recap-tiny:wan", tiling=True, slicing=True)
    assert wan.tiling and wan.model.use_tiling and wan.dtype == torch.float32
    assert load_vae("recap-tiny:wan", dtype="bfloat16").dtype == torch.bfloat16  # asked for: given


def test_encode_out_of_memory_is_retried_in_halves_then_rejected_alone():
    """A batch that runs out of memory is encoded in halves; one clip that does not fit alone is rejected with
    what to change. Memory is faked by a limit on clips per encode call (no GPU here); the VAE itself is real."""
    import numpy as np

    from pipeline.config import RecapConfig
    from pipeline.stages.encode import EncodeModelStage, OutOfMemory

    threads = torch.get_num_threads()
    stage = EncodeModelStage(RecapConfig.model_validate({"encode": {"vae": "recap-tiny:taesd", "device": "cpu"}}))
    torch.set_num_threads(threads)  # the stage sets its actor's threads: leave this process as it was
    real = stage.vae.encode
    limit = {"clips": 2}

    def encode_within_memory(x):
        if x.shape[0] > limit["clips"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    stage.vae.encode = encode_within_memory
    frames = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 48, 3), dtype=np.uint8)
    latents, _ = stage.encode_oom_safe(frames)
    stage.vae.encode = real
    expected, _ = stage.encode_clips(frames)
    assert len(latents) == 5 and all(np.array_equal(a, b) for a, b in zip(latents, expected, strict=True))
    limit["clips"] = 0
    stage.vae.encode = encode_within_memory
    with pytest.raises(OutOfMemory, match="even alone: set encode.vae_tiling"):
        stage.encode_oom_safe(frames[:2])


def test_corpora_recorded_with_the_old_identity_still_match(kl):
    """Before the identity became dtype-independent, an fp32 load recorded the fp32 bytes: still recognised."""
    from pipeline.vae.load import legacy_weights_sha256

    old = legacy_weights_sha256(kl.model)
    assert old != kl.sha256 and kl.matches(old) and kl.matches(kl.sha256)
    assert not kl.matches("0" * 64)
