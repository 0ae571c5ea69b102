"""Frame-conditioned training and sampling on real TAEF2 latents: animate a still, extend a clip, interpolate."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from tests.trainer.conftest import CAPTIONS, CLIPS, read_clip
from trainer.checkpoint import load_checkpoint
from trainer.cli import add_commands
from trainer.conditioning import draw_given_frames, given_frames
from trainer.config import ConditioningConfig
from trainer.flow import euler_sample
from trainer.sample import load_denoiser, sample_video, write_mp4
from trainer.train import train


def test_policies_give_the_right_frames_and_never_all_of_them():
    assert given_frames("image", 4) == [True, False, False, False]
    assert given_frames("prefix", 4, 2) == [True, True, False, False]
    assert given_frames("ends", 4) == [True, False, False, True]
    assert given_frames("ends", 2) == [False, False]  # both frames given: nothing to learn, so text only
    assert given_frames("image", 1) == [False]


def test_the_draw_is_a_pure_function_of_the_place_in_the_run_with_the_configured_shares():
    cfg = ConditioningConfig(image=0.2, prefix=0.1, ends=0.05, prefix_min=2, prefix_max=3)
    a = draw_given_frames(cfg, 8, 6, seed=0, step=5, rank=1, micro=0)
    assert torch.equal(a, draw_given_frames(cfg, 8, 6, seed=0, step=5, rank=1, micro=0))
    assert not torch.equal(a, draw_given_frames(cfg, 8, 6, seed=0, step=5, rank=0, micro=0))
    rows = torch.cat([draw_given_frames(cfg, 50, 6, 0, step, 0, 0) for step in range(40)])  # 2000 samples
    image = (rows == torch.tensor([True] + [False] * 5)).all(1).float().mean()
    ends = (rows == torch.tensor([True] + [False] * 4 + [True])).all(1).float().mean()
    prefix = (rows[:, :2].all(1) & ~rows[:, -1]).float().mean()
    none = (~rows.any(1)).float().mean()
    assert abs(image - 0.2) < 0.03 and abs(prefix - 0.1) < 0.025 and abs(ends - 0.05) < 0.02, (image, prefix, ends)
    assert abs(none - 0.65) < 0.04 and not rows[:, 3:].all(1).any()  # prefixes are 2 or 3 frames long
    assert draw_given_frames(ConditioningConfig(), 8, 6, 0, 0, 0, 0) is None  # the default: text only, no draws


@pytest.fixture(scope="module")
def image_run(overfit_corpus, make_config, tmp_path_factory):
    """A slightly widened tiny model overfit on the 4 clips, three samples in four given their first latent frame
    (200 steps, ~12 s on one CPU thread; the rest train text-only, so both kinds of sampling are in distribution)."""
    run = tmp_path_factory.mktemp("image_run")
    cfg = make_config(
        model={"hidden_size": 128, "depth": 3},
        optim={"lr": 3e-3, "warmup_steps": 10, "schedule": "constant"},
        objective={"caption_dropout": 0.0},
        train={"steps": 200, "conditioning": {"image": 0.75}},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's one_torch_thread covers each test, not this module-scoped setup
    try:
        train(cfg, str(overfit_corpus), run)
    finally:
        torch.set_num_threads(threads)
    return run


def test_first_frame_conditioning_beats_text_only(image_run, real_latents, text_encoder_dir):
    from trainer.text import TextConditioner

    model = load_denoiser(load_checkpoint(image_run))
    clips = torch.from_numpy(np.stack(real_latents["landscape"])).float()  # (4, 32, 4, 8, 12)
    text, mask = TextConditioner(str(text_encoder_dir), "cpu", 256).encode(CAPTIONS[:4])
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    given = torch.zeros(4, clips.shape[2], dtype=torch.bool)
    given[:, 0] = True
    conditioned = euler_sample(model, noise, text, mask, 10, 1.0, given=given, given_latents=clips)
    text_only = euler_sample(model, noise, text, mask, 10, 1.0)
    assert torch.equal(conditioned[:, :, 0], clips[:, :, 0])  # the given frame comes back unchanged
    mse_given = (conditioned[:, :, 1:] - clips[:, :, 1:]).square().mean()
    mse_text = (text_only[:, :, 1:] - clips[:, :, 1:]).square().mean()
    # Measured 0.49 (first frame given) against 0.86 (text only); the latents' variance is 0.70.
    assert mse_given < 0.75 * mse_text, (mse_given, mse_text)


def _recap(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recap")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def _read_mp4(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _errors(taef2, out: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Mean absolute error of output frames against the input frames, and the VAE's own round-trip error on them."""
    x = torch.from_numpy(want).permute(0, 3, 1, 2).float() / 255
    recon = taef2.decode(taef2.encode(x).mean)
    got = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255
    return float((got - x).abs().mean()), float((recon - x).abs().mean())


def test_recap_sample_image_keeps_the_still_as_first_frame(image_run, videos_dir, taef2, tmp_path):
    import cv2

    still = read_clip(videos_dir / CLIPS[0][0], CLIPS[0][1], 64, 96)[0]
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    out = tmp_path / "i2v.mp4"
    argv = ["sample", "--checkpoint", str(image_run), "--prompt", CAPTIONS[0], "--output", str(out), "--steps", "4"]
    assert _recap(*argv, "--image", str(tmp_path / "still.png"), "--frame-guidance", "1.5") == 0
    frames = _read_mp4(out)
    assert frames.shape == (4, 64, 96, 3)  # the training clips' length; the 2:3 bucket of their area
    err, vae_err = _errors(taef2, frames[:1], still[None])
    assert err < vae_err + 0.01, (err, vae_err)  # the VAE's round trip, plus H.264 at crf 18
    later, _ = _errors(taef2, frames[1:], np.repeat(still[None], 3, axis=0))
    assert later > 3 * err  # later frames are generated, not copies of the still


def test_recap_sample_extends_a_clip_from_its_last_frames(image_run, videos_dir, taef2, tmp_path):
    clip = read_clip(videos_dir / CLIPS[2][0], CLIPS[2][1], 64, 96)
    write_mp4(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255, tmp_path / "clip.mp4", fps=8)
    source = _read_mp4(tmp_path / "clip.mp4")
    out = tmp_path / "longer.mp4"
    argv = ["sample", "--checkpoint", str(image_run), "--prompt", CAPTIONS[2], "--output", str(out), "--steps", "4"]
    assert _recap(*argv, "--video", str(tmp_path / "clip.mp4"), "--extend", "0.5") == 0
    frames = _read_mp4(out)
    # The clip's last 2 frames (half a training clip) as the prefix, then 0.5 s at 8 fps.
    assert frames.shape == (2 + 4, 64, 96, 3)
    err, vae_err = _errors(taef2, frames[:2], source[2:])
    assert err < vae_err + 0.01, (err, vae_err)


def test_interpolation_gives_the_first_and_last_frames(image_run, videos_dir, tmp_path):
    import cv2

    for name, index in (("a.png", 0), ("b.png", 3)):
        frame = read_clip(videos_dir / CLIPS[1][0], CLIPS[1][1], 64, 96)[index]
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    result = sample_video(
        image_run,
        CAPTIONS[1],
        tmp_path / "between.mp4",
        image=tmp_path / "a.png",
        end_image=tmp_path / "b.png",
        frames=5,
        steps=2,
    )
    assert result.given_frames == (0, 4) and (result.frames, result.height, result.width) == (5, 64, 96)
    with pytest.raises(ValueError, match="--end-image needs --image"):
        sample_video(image_run, "x", tmp_path / "x.mp4", end_image=tmp_path / "b.png")
    with pytest.raises(ValueError, match="--video and --extend"):
        sample_video(image_run, "x", tmp_path / "x.mp4", video=tmp_path / "between.mp4")


def test_a_checkpoint_from_before_frame_conditioning_still_samples(image_run, videos_dir, tmp_path, caplog):
    import cv2

    ckpt = load_checkpoint(image_run)
    del ckpt["config"]["train"]["conditioning"], ckpt["config"]["sample"]["frame_cfg_scale"]  # as older runs wrote
    torch.save(ckpt, tmp_path / "old.pt")
    still = read_clip(videos_dir / CLIPS[3][0], CLIPS[3][1], 64, 96)[0]
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    text_only = sample_video(tmp_path / "old.pt", CAPTIONS[3], tmp_path / "t2v.mp4", steps=2)
    assert (text_only.frames, text_only.given_frames) == (4, ())
    with caplog.at_level("WARNING", logger="recap.sample"):
        animated = sample_video(
            tmp_path / "old.pt", CAPTIONS[3], tmp_path / "i2v.mp4", image=tmp_path / "still.png", steps=2
        )
    assert animated.given_frames == (0,) and "trained without frame conditioning" in caplog.text
