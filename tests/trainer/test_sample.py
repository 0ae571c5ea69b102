"""`recap sample`: an mp4 of the expected frame count and size, decoded with the corpus's VAE and no other."""

from __future__ import annotations

import argparse

import pytest

from trainer.cli import add_commands
from trainer.data import VaeMismatchError
from trainer.sample import sample_video
from trainer.train import train


@pytest.fixture(scope="module")
def run_dir(overfit_corpus, make_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("sample_run")
    train(make_config(train={"steps": 3}), str(overfit_corpus), run)
    return run


def _recap(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recap")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_recap_sample_writes_a_decodable_mp4(run_dir, tmp_path):
    import av

    out = tmp_path / "clip.mp4"
    code = _recap("sample", "--checkpoint", str(run_dir), "--prompt", "a rabbit on the grass", "--output", str(out))
    assert code == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    # The training latents are (32, 4, 8, 12): TAEF2 (8x spatial, 1x temporal) decodes 4 frames of 64x96.
    assert len(frames) == 4 and frames[0].shape == (64, 96, 3)
    assert frames[0].std() > 0  # decoded content, not a blank frame


def test_sample_size_options_and_a_foreign_vae_is_refused(run_dir, tmp_path):
    from pipeline.vae.taesd import save_random_taesd

    result = sample_video(run_dir, "a city street", tmp_path / "wide.mp4", frames=2, height=32, width=128, steps=2)
    assert (result.frames, result.height, result.width) == (2, 32, 128)
    assert result.latent_shape == (32, 2, 4, 16)
    other = save_random_taesd(tmp_path / "other_vae", latent_channels=32)
    with pytest.raises(VaeMismatchError, match="decode with the corpus's VAE"):
        sample_video(run_dir, "a city street", tmp_path / "x.mp4", vae=str(other), steps=1)
