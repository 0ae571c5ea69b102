"""The shard loader: one shape per batch, exact resume of its position, epochs split by node, manifest filters,
and refusing latents from another VAE."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import numpy as np
import pyarrow as pa
import pytest
import torch

from trainer.data import (
    DataError,
    ResumableLoader,
    VaeMismatchError,
    decode_batch,
    open_corpus,
    unpack_arrays,
    window_batches,
)


def _keys(loader, n):
    return [tuple(b["keys"]) for b in islice(loader, n)]


def test_batches_never_mix_shapes_and_both_shapes_train(mixed_corpus, make_config):
    from pipeline import manifest

    shapes = {
        r["key"]: tuple(r["latent_shape"]) for r in manifest.read_table(str(mixed_corpus), "samples").to_pylist()
    }
    assert len(set(shapes.values())) == 2
    cfg = make_config(data={"batch_size": 2, "text_encoder": "unused-when-embeddings-are-stored"}).data
    corpus = open_corpus(str(mixed_corpus), cfg)
    seen = set()
    for batch in islice(ResumableLoader(corpus, cfg), 16):
        batch_shapes = {shapes[k] for k in batch["keys"]}
        assert len(batch_shapes) == 1
        assert tuple(batch["latents"].shape[1:]) == batch_shapes.pop()
        seen.add(tuple(batch["latents"].shape[1:]))
    assert seen == set(shapes.values())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_window_in_the_same_order(overfit_corpus, make_config, num_workers):
    cfg = make_config(data={"batch_size": 2, "num_workers": num_workers, "window_shards": 3}).data
    corpus = open_corpus(str(overfit_corpus), cfg)
    straight = _keys(ResumableLoader(corpus, cfg), 9)
    first = ResumableLoader(corpus, cfg)
    head = _keys(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # plain values only
    first.close()
    tail = _keys(ResumableLoader(corpus, cfg, state=state), 4)
    assert head + tail == straight
    assert len(set(straight)) > 1  # the stream is shuffled, not one batch repeated


def test_epochs_split_shards_by_rank_and_see_every_sample_once(overfit_corpus, make_config):
    cfg = make_config(data={"batch_size": 2, "resampled": False, "window_shards": 1}).data
    corpus = open_corpus(str(overfit_corpus), cfg)
    assert len(corpus.urls) == 2
    per_rank = [
        [k for b in islice(ResumableLoader(corpus, cfg, rank=r, world_size=2), 3) for k in b["keys"]] for r in (0, 1)
    ]
    epoch0 = per_rank[0][:2] + per_rank[1][:2]
    assert sorted(epoch0) == sorted(corpus_keys(overfit_corpus))
    assert not set(per_rank[0][:2]) & set(per_rank[1][:2])


def corpus_keys(out):
    from pipeline import manifest

    return manifest.read_table(str(out), "samples", columns=["key"]).column("key").to_pylist()


def test_min_score_filter_applies_before_training(overfit_corpus, make_config, tmp_path):
    from pipeline import manifest

    out = tmp_path / "corpus"
    shutil.copytree(overfit_corpus, out)
    keys = sorted(corpus_keys(out))
    clips = pa.table({"clip_id": keys, "score_motion": [0.1, 0.9, 0.5, None]})
    manifest.write_table(str(out), "clips", clips, prefix="clips", schema=clips.schema)
    cfg = make_config(data={"batch_size": 1, "min_scores": {"score_motion": 0.5}}).data
    corpus = open_corpus(str(out), cfg)
    assert corpus.keys == {keys[1], keys[2]} and corpus.num_samples == 2
    seen = {k for b in islice(ResumableLoader(corpus, cfg), 12) for k in b["keys"]}
    assert seen == {keys[1], keys[2]}
    bad = make_config(data={"min_scores": {"score_sharpnes": 1.0}}).data
    with pytest.raises(DataError, match=r"data\.min_scores\.score_sharpnes: no such column.*score_motion"):
        open_corpus(str(out), bad)


def _raw_shard(path, key, latent, meta):
    import webdataset as wds

    from pipeline.shards.writer import sample_members

    with wds.TarWriter(str(path), encoder=False) as tar:
        tar.write(sample_members(key, latent, "a caption", meta))


def test_refuses_shards_from_two_vaes(real_latents, taef2, tmp_path, make_config):
    latent = real_latents["landscape"][0]
    info = {**taef2.info(), "latent_dtype": "float16"}
    _raw_shard(tmp_path / "shard-000000.tar", "aaaa-0000000-0000001", latent, info)
    _raw_shard(tmp_path / "shard-000001.tar", "bbbb-0000000-0000001", latent, {**info, "vae_sha256": "0" * 64})
    cfg = make_config(data={"text_encoder": "any"}).data
    with pytest.raises(VaeMismatchError, match="bbbb-0000000-0000001.*never mixes latents from different VAEs"):
        open_corpus(str(tmp_path), cfg)
    (tmp_path / "shard-000001.tar").unlink()
    assert open_corpus(str(tmp_path / "*.tar"), cfg).vae["vae_sha256"] == taef2.sha256


def test_refuses_a_corpus_whose_manifest_lists_two_vaes(real_latents, taef2, make_config, tmp_path):
    from pipeline.shards.corpus import write_corpus_shards

    def items():
        for i, vae in enumerate(["taesd:taef2", "diffusers:AutoencoderKL:other"]):
            yield {
                "key": f"{i:016x}-0000000-0000004",
                "latent": real_latents["landscape"][i],
                "caption": "c",
                "meta": {"vae": vae},
                "row": {"vae": vae},
            }

    write_corpus_shards(str(tmp_path), items())
    with pytest.raises(VaeMismatchError, match="mixes latents from 2 VAEs"):
        open_corpus(str(tmp_path), make_config(data={"text_encoder": "any"}).data)


def test_latents_come_back_as_stored(overfit_corpus, real_latents, make_config):
    cfg = make_config(data={"batch_size": 1}).data
    corpus = open_corpus(str(overfit_corpus), cfg)
    assert corpus.text_emb_dim == 32 and corpus.latent_channels == 32
    batch = next(iter(ResumableLoader(corpus, cfg)))
    index = int(batch["keys"][0].split("-")[0], 16)
    assert np.array_equal(batch["latents"][0].numpy(), real_latents["landscape"][index].astype(np.float32))
    assert batch["text"].shape[-1] == 32 and batch["text_mask"][0].any()


def test_workers_hand_over_the_same_batches_by_pipe_or_shared_memory(overfit_corpus, make_config):
    """A worker's batch crosses as one packed buffer (pipe when small, shared memory when large or pinned); what
    arrives equals what the in-process loader builds, tensor for tensor."""
    cfg = make_config(data={"batch_size": 2, "num_workers": 2, "window_shards": 3}).data
    corpus = open_corpus(str(overfit_corpus), cfg)
    by_pipe = ResumableLoader(corpus, cfg)
    by_shm = ResumableLoader(corpus, cfg)
    by_shm.spec.pipe_bytes = 0
    readers = [window_batches(by_pipe.spec, reader, 0) for reader in range(2)]  # what workers 0 and 1 read
    for i in range(4):
        want = decode_batch(by_pipe.spec, next(readers[i % 2]))  # built in this process: no hand-off
        want.update(unpack_arrays(want.pop("arrays")))
        for loader in (by_pipe, by_shm):
            got = next(loader)
            assert got["keys"] == want["keys"]
            for name in ("latents", "text", "text_mask"):
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])
    by_pipe.close(), by_shm.close()


def test_train_on_two_corpora(
    overfit_corpus, mixed_corpus, real_latents, taef2, taef2_dir, text_encoder_dir, make_config, tmp_path, capsys
):
    """`recap train --data A B`: both corpora's shards are read (one VAE across them); a corpus whose samples
    are laid out differently (no stored caption embeddings) is refused by name."""
    import yaml

    from pipeline.cli import main
    from tests.trainer.conftest import write_corpus

    second = write_corpus(
        tmp_path / "portrait", real_latents["portrait"][:2], taef2, taef2_dir, text_encoder=str(text_encoder_dir)
    )
    cfg = make_config(data={"batch_size": 2}).data
    corpus = open_corpus([str(overfit_corpus), str(second)], cfg)
    assert corpus.roots == [str(overfit_corpus), str(second)]
    assert len(corpus.urls) == 3 and corpus.num_samples == 6
    shapes = {tuple(b["latents"].shape[1:]) for b in islice(ResumableLoader(corpus, cfg), 12)}
    assert shapes == {tuple(real_latents["landscape"][0].shape), tuple(real_latents["portrait"][0].shape)}

    with pytest.raises(DataError, match=r"unlike .*text_emb none against .*text_emb"):
        open_corpus([str(overfit_corpus), str(mixed_corpus)], cfg)

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"batch_size": 2, "num_workers": 0, "window_shards": 2, "shuffle_buffer": 8},
                "train": {"steps": 2, "device": "cpu", "log_every": 1, "checkpoint_every": 1000},
            }
        )
    )
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(overfit_corpus), str(second), "--output", str(run)]
    assert main(argv) == 0
    assert "recap train: step 2" in capsys.readouterr().out
