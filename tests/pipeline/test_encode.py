"""Encoding with the real TAEF2 weights and the encode stage end to end into validated shards."""

from __future__ import annotations

import datetime
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import EncodeConfig, load_config
from pipeline.runner import run_pipeline
from pipeline.stages.encode import prepare_clip
from pipeline.vae.taesd import build_decoder, build_encoder, load_taesd

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def taef2(shared_dir):
    root = shared_dir / "data" / "models" / "taef2"
    return load_taesd(root / "taef2_encoder.pth", root / "taef2_decoder.pth")


@pytest.fixture(scope="module")
def prepared(videos_dir) -> np.ndarray:
    """Two real frames through the stage's own preparation (seek, stride, bucket 256x448, crop)."""
    # Frames 420 and 450: textured footage after the fade-in that ends near 409 (not black frames).
    row = {
        "uri": str(videos_dir / "testvideo.mp4"),
        "start_frame": 420,
        "end_frame": 540,
        "start_s": 420 * 1001 / 30000,
        "fps": 30000 / 1001,
    }
    cfg = EncodeConfig(target_area=256 * 448, num_frames=2, target_fps=1.0).model_dump(mode="json")
    out = prepare_clip(row, cfg, 1, 16)
    assert out["frame_indices"] == [420, 450] and out["frame_stride"] == 30
    return np.frombuffer(out["frames"], np.uint8).reshape(out["frames_shape"])


def _psnr(model, frames: np.ndarray) -> float:
    x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        latents = model.encode(x)
        assert latents.shape == (x.shape[0], model.latent_channels, x.shape[2] // 8, x.shape[3] // 8)
        y = model.decode(latents)
    return float(10 * torch.log10(1 / torch.mean((y - x) ** 2)))


def test_taef2_reconstructs_real_frames(taef2, prepared):
    assert prepared.shape == (2, 256, 448, 3)
    assert prepared.std() > 20  # real picture content
    assert taef2.latent_channels == 32
    assert _psnr(taef2, prepared) >= 28.0


def test_taef2_through_the_vae_interface(shared_dir, prepared):
    """load_vae + Vae.encode/decode (what the stage and the trainer's sampler use) keep the layout right."""
    from pipeline.vae.load import load_vae

    vae = load_vae(str(shared_dir / "data" / "models" / "taef2"))
    x = torch.from_numpy(prepared.copy()).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (32, 2, 32, 56) and posterior.logvar is None
    y = vae.decode(posterior.mean)
    assert y.shape == x.shape
    assert float(10 * torch.log10(1 / torch.mean((y - x) ** 2))) >= 28.0
    assert vae.info()["vae"] == "taesd:taef2" and vae.temporal_factor == 1


def test_random_weights_of_the_same_architecture_do_not(prepared, shared_dir):
    state = torch.load(shared_dir / "data" / "models" / "taef2" / "taef2_encoder.pth", weights_only=True)
    pools = {int(k.split(".")[0]) for k in state if ".pool." in k}
    torch.manual_seed(0)
    from pipeline.vae.taesd import TinyAutoencoder

    random_model = TinyAutoencoder(build_encoder(32, pools), build_decoder(32, {3, 4, 5}), 32).eval()
    assert _psnr(random_model, prepared) < 15.0


def test_encode_stage_writes_valid_shards(ray_session, videos_dir, tmp_path):
    from pipeline.shards.validate import validate_corpus

    cfg = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        ["ray.progress=off", f"encode.vae={videos_dir.parent / 'models' / 'taef2'}"],
    )
    out = tmp_path / "encoded"
    results = run_pipeline(
        cfg, str(out), inputs=[str(videos_dir / "issue-134-rotate.mp4")], stages=["ingest", "split", "encode"]
    )
    assert results[-1].counts["samples"] == 3  # one per scene: cuts at 90 and 210, all >= min_clip_s
    assert validate_corpus(str(out)) == []
    run = json.loads((out / "manifest" / "run.json").read_text())
    assert run["stages"]["encode"]["vae"] == "taesd:taef2" and len(run["stages"]["encode"]["vae_sha256"]) == 64
    # Each stage's start and end, ISO 8601 in UTC; these stages ran one after another.
    times = [
        datetime.datetime.fromisoformat(run["stages"][stage][key])
        for stage in ("ingest", "split", "encode")
        for key in ("started_at", "finished_at")
    ]
    assert all(t.utcoffset() == datetime.timedelta(0) for t in times) and times == sorted(times)
    [shard] = sorted((out / "shards").glob("shard-*.tar"))
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({name.split(".")[0] for name in members})
    for key in keys:
        latent = np.load(io.BytesIO(members[f"{key}.latent.npy"]), allow_pickle=False)
        meta = json.loads(members[f"{key}.json"])
        assert latent.dtype == np.float16 and latent.shape[0] == 32 and latent.shape[1] == len(meta["frame_indices"])
        assert meta["frame_indices"][0] == meta["start_frame"] and meta["clip_id"] == key
        assert latent.shape[2:] == (meta["resize"]["height"] // 8, meta["resize"]["width"] // 8)
    _check_manifest_sample_cli(out, keys[0], tmp_path)


def _check_manifest_sample_cli(out: Path, key: str, tmp_path: Path) -> None:
    """`recap manifest sample KEY --write` decodes the latents with the corpus's VAE to a video and a grid."""
    import av
    import cv2

    from pipeline.cli import main

    video, grid = tmp_path / "sample.mp4", tmp_path / "sample.png"
    assert main(["manifest", "sample", str(out), key, "--write", str(video)]) == 0
    meta = json.loads(_member(out, key, "json"))
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(meta["frame_indices"])
    assert frames[0].shape == (meta["resize"]["height"], meta["resize"]["width"], 3)
    assert frames[0].std() > 10  # TAEF2 decodes a picture, not a flat field
    assert main(["manifest", "sample", str(out), key, "--write", str(grid)]) == 0
    rows = -(-len(meta["frame_indices"]) // 4)  # 4 frames a row, 2 px gaps
    assert cv2.imread(str(grid)).shape[0] == rows * (meta["resize"]["height"] + 2) - 2
    assert main(["manifest", "sample", str(out), "0000000000000000-0000000-0000001"]) == 1
    assert main(["manifest", "show", str(out), "samples", "--where", f"key == '{key}'", "--columns", "key,shard"]) == 0
    assert main(["manifest", "show", str(out), "samples", "--where", "no_such_column > 1"]) == 2


def _member(out: Path, key: str, ext: str) -> bytes:
    for shard in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name == f"{key}.{ext}":
                    return tar.extractfile(m).read()
    raise KeyError(key)


def test_manifest_stats_funnel(ray_session, videos_dir, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.manifest import corpus_stats

    cfg = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        ["ray.progress=off", f"encode.vae={videos_dir.parent / 'models' / 'taef2'}"],
    )
    out = tmp_path / "stats"
    run_pipeline(
        cfg, str(out), inputs=[str(videos_dir / "issue-236-split-copy.mkv")], stages=["ingest", "split", "encode"]
    )
    stats = corpus_stats(str(out))
    # 48 frames, a cut at 19: two scenes of 0.79 s and 1.21 s; smoke min_clip_s is 1.0.
    assert stats["funnel"] == {"videos": 1, "videos_ok": 1, "clips": 2, "passed": 1, "samples": 1}
    assert stats["rejects"] == {"split/too_short": 1}
    assert stats["hours"]["videos"] == pytest.approx(2.0 / 3600, rel=0.05)
    assert main(["manifest", "stats", str(out)]) == 0
    assert "videos 1 -> videos_ok 1 -> clips 2 -> passed 1 -> samples 1" in capsys.readouterr().out


def test_video_vae_with_posterior_text_embeddings_and_bf16(ray_session, videos_dir, tmp_path):
    """A diffusers video VAE in the stage: frame counts on its 1+4k grid, logvar and text_emb members, bf16 bits."""
    import webdataset as wds

    from pipeline.shards.latents import latent_from_storage
    from pipeline.shards.validate import validate_corpus

    cfg = load_config(
        PROJECT_ROOT / "configs" / "smoke.yaml",
        [
            "ray.progress=off",
            "encode.vae=recap-tiny:wan",
            "encode.num_frames=11",  # the grid gives 9
            "encode.target_fps=12",
            "encode.store_logvar=true",
            "encode.latent_dtype=bfloat16",
            "encode.text_encoder=recap-tiny:text_encoder",
        ],
    )
    out = tmp_path / "wan"
    results = run_pipeline(
        cfg, str(out), inputs=[str(videos_dir / "issue-134-rotate.mp4")], stages=["ingest", "split", "encode"]
    )
    assert results[-1].counts["samples"] == 3
    assert validate_corpus(str(out)) == []
    run = json.loads((out / "manifest" / "run.json").read_text())["stages"]["encode"]
    assert run["vae_temporal_factor"] == 4 and run["logvar_stored"] and run["latent_dtype"] == "bfloat16"
    assert run["vae_spec"].endswith("vae_wan")
    shards = [str(p) for p in sorted((out / "shards").glob("shard-*.tar"))]
    seen = 0
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        logvar = np.load(io.BytesIO(sample["logvar.npy"]), allow_pickle=False)
        emb = np.load(io.BytesIO(sample["text_emb.npy"]), allow_pickle=False)
        assert len(meta["frame_indices"]) == 9 and latent.shape == logvar.shape == (4, 3, *latent.shape[2:])
        assert latent.dtype == np.uint16 and meta["latent_dtype"] == "bfloat16"
        values = latent_from_storage(latent, meta["latent_dtype"])
        assert np.isfinite(values).all() and 0.05 < float(np.abs(values).mean()) < 50
        assert emb.dtype == np.float16 and emb.ndim == 2 and emb.shape[1] == meta["text_emb_dim"] == 32
        assert meta["vae"].startswith("diffusers:AutoencoderKLWan") and meta["vae_scaling_factor"] == 1.0
        seen += 1
    assert seen == 3
    import pyarrow.dataset as pads

    samples = pads.dataset(out / "manifest" / "samples").to_table().to_pylist()
    assert all(r["latent_dtype"] == "bfloat16" and r["has_text_emb"] and r["logvar_stored"] for r in samples)


@pytest.mark.parametrize(
    ("name", "start", "end"),
    [("testvideo.mp4", 400, 520), ("big_buck_bunny_0_30.webm", 380, 548), ("issue-134-rotate.mp4", 90, 200)],
)
def test_decord_and_pyav_read_the_same_frames(videos_dir, name, start, end):
    """video.backend decord (get_batch) and PyAV (seek + decode) give the same upright frames (rotation included)."""
    import av

    from pipeline.stages.encode import read_frames_at

    uri = str(videos_dir / name)
    with av.open(uri) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == start:
                start_s = float(frame.pts * frame.time_base)
                break
    positions = list(range(start, end, (end - start) // 6))
    pyav = read_frames_at(uri, start, start_s, positions, "pyav")
    decord = read_frames_at(uri, start, start_s, positions, "decord")
    assert sorted(decord) == sorted(pyav) == positions
    for p in positions:
        assert decord[p].shape == pyav[p].shape
        mse = np.mean((decord[p].astype(np.float64) - pyav[p].astype(np.float64)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-10)) > 40, (name, p)
    if name == "issue-134-rotate.mp4":
        assert pyav[positions[0]].shape[0] > pyav[positions[0]].shape[1]  # stored landscape, shown portrait


def test_decord_falls_back_to_pyav_where_it_cannot_read(tmp_path, videos_dir):
    from pipeline.video.decode import read_frames_decord

    not_video = tmp_path / "notes.mp4"
    not_video.write_bytes(b"not a video at all" * 100)
    assert read_frames_decord(str(not_video), [0]) is None
    assert read_frames_decord("s3://bucket/clip.mp4", [0]) is None  # remote: PyAV's fsspec reader
    assert read_frames_decord(str(videos_dir / "h265_video.mp4"), [0, 10_000]) is None  # past decord's frames


def test_decord_reader_kept_open_reads_the_same_frames(tmp_path, videos_dir):
    """The child keeps the last file's decord reader open: clips read forward, backward, and a file replaced in place
    under the same name give exactly the frames a fresh reader gives."""
    import shutil

    from pipeline.video import decode

    uri = str(videos_dir / "bottle-detection.mp4")
    clips = [list(range(start, start + 60, 12)) for start in (0, 119, 238, 357)]
    fresh = []
    for positions in clips:
        decode._DECORD_READER.clear()
        fresh.append(decode.read_frames_decord(uri, positions))
    decode._DECORD_READER.clear()
    for order in (range(4), reversed(range(4))):
        for i in order:
            got = decode.read_frames_decord(uri, clips[i])
            assert sorted(got) == clips[i] and all(np.array_equal(got[p], fresh[i][p]) for p in clips[i]), i
    path = tmp_path / "clip.mp4"
    shutil.copy(videos_dir / "delayed_start.mp4", path)
    assert decode.read_frames_decord(str(path), [0, 5])[0].shape == (320, 480, 3)
    shutil.copy(uri, path)
    assert np.array_equal(decode.read_frames_decord(str(path), [0, 5])[0], fresh[0][0])


def test_vae_actor_threads_follow_its_cpus():
    """A VAE actor on CPU runs encode.threads torch threads, else its num_cpus rounded up (Ray would round down)."""
    from pipeline.config import RecapConfig
    from pipeline.stages.encode import EncodeModelStage, cpu_threads

    assert cpu_threads(EncodeConfig(resources={"num_cpus": 1.5})) == 2
    assert cpu_threads(EncodeConfig(resources={"num_cpus": 0.5})) == 1
    assert cpu_threads(EncodeConfig(threads=3, resources={"num_cpus": 1})) == 3
    before = torch.get_num_threads()
    try:  # in an actor the stage owns its process; here it must not leave this one changed
        encode = {"vae": "recap-tiny:taesd", "device": "cpu", "resources": {"num_cpus": 4.5}}
        EncodeModelStage(RecapConfig.model_validate({"encode": encode}))
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def test_prep_actors_read_the_vae_geometry_without_torch(shared_dir):
    """The prep actors only decode: reading the VAE's frame grid and spatial factor must not import torch (seconds of
    start-up per actor, on the path to the first encoded clip)."""
    import os
    import subprocess
    import sys

    vae = str(shared_dir / "data" / "models" / "taef2")
    code = (
        "import sys\n"
        "from pipeline.config import RecapConfig\n"
        "from pipeline.stages.encode import EncodePrepStage\n"
        f"stage = EncodePrepStage(RecapConfig.model_validate({{'encode': {{'vae': {vae!r}, 'multiple': 16}}}}))\n"
        "assert (stage.temporal_factor, stage.multiple) == (1, 16), (stage.temporal_factor, stage.multiple)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
