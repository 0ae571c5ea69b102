"""Shards: bounded and atomic, readable by plain webdataset and Ray, and validated against the manifest."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards.validate import validate_corpus
from pipeline.shards.writer import ShardWriter, sample_members, write_corpus_shards

SHAPES = [(32, 3, 8, 12), (32, 3, 12, 8)]  # two aspect-ratio buckets


def _samples(n: int = 24):
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = SHAPES[i % 2]
        key = f"{i:016x}-0000000-{i + 10:07d}"
        yield {
            "key": key,
            "latent": rng.standard_normal(shape).astype(np.float16),
            "caption": f"clip number {i} with a dog",
            "meta": {"clip_id": key, "fps": 24.0},
            "row": {"vae": "taef2", "num_frames": 9, "frame_stride": 1, "height": 64, "width": 96},
        }


@pytest.fixture()
def corpus(tmp_path) -> Path:
    write_corpus_shards(str(tmp_path), _samples(), max_bytes=40_000, max_count=100)
    return tmp_path


def test_shards_are_bounded_bucketed_and_valid(corpus):
    import pyarrow.dataset as pads

    shards = pads.dataset(str(corpus / "manifest" / "shards")).to_table().to_pylist()
    samples = pads.dataset(str(corpus / "manifest" / "samples")).to_table().to_pylist()
    assert len(samples) == 24 and len(shards) >= 4
    by_bucket: dict[str, list] = {}
    for s in shards:
        by_bucket.setdefault(s["bucket"], []).append(s)
    assert set(by_bucket) == {"32x3x8x12", "32x3x12x8"}
    for bucket_shards in by_bucket.values():
        for s in sorted(bucket_shards, key=lambda s: s["shard"])[:-1]:
            assert s["bytes"] <= 40_000  # the bound holds for all but each bucket's last shard
    assert sorted(p.name for p in (corpus / "shards").iterdir()) == sorted(s["shard"] for s in shards)
    assert validate_corpus(str(corpus)) == []


def test_read_back_with_plain_webdataset_and_ray(corpus, ray_session):
    import ray.data
    import webdataset as wds

    urls = sorted(str(p) for p in (corpus / "shards").glob("shard-*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        seen[sample["__key__"]] = (latent.shape, sample["txt"].decode())
    assert len(seen) == 24 and all(shape in SHAPES for shape, _ in seen.values())
    rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(seen)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "sha256"),
        ("truncate", "bytes, manifest says"),
        ("delete", "missing"),
        ("extra", "not in the manifest"),
        ("duplicate", "appears in 2 shards"),
    ],
)
def test_validate_names_each_kind_of_damage(corpus, damage, message):
    shard_dir = corpus / "shards"
    first = sorted(shard_dir.glob("shard-*.tar"))[0]
    if damage == "flip":
        data = bytearray(first.read_bytes())
        data[700] ^= 0xFF
        first.write_bytes(bytes(data))
    elif damage == "truncate":
        first.write_bytes(first.read_bytes()[:3000])
    elif damage == "delete":
        first.unlink()
    elif damage == "extra":
        shutil.copy(first, shard_dir / "shard-999999.tar")
    elif damage == "duplicate":
        # A second shard (listed in the manifest) that repeats a key of the first.
        second = sorted(shard_dir.glob("shard-*.tar"))[1]
        writer = ShardWriter(str(corpus / "tmp"), max_count=10)
        key = next(iter(_samples(1)))
        writer.write(sample_members(key["key"], key["latent"], "dup", {}), "b")
        [info] = writer.close()
        shutil.copy(corpus / "tmp" / info.shard, second)
    problems = validate_corpus(str(corpus))
    assert problems and any(message in p for p in problems), problems
    assert any(first.name in p or "shard-999999" in p or "key" in p for p in problems)


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="no dot"):
        sample_members("a.b", np.zeros((1, 1, 1, 1), np.float16), "x", {})


def test_manifest_validate_cli_exit_codes(corpus, capsys):
    from pipeline.cli import main

    assert main(["manifest", "validate", str(corpus)]) == 0
    assert "every shard matches" in capsys.readouterr().out
    sorted((corpus / "shards").glob("shard-*.tar"))[0].unlink()
    assert main(["manifest", "validate", str(corpus)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["manifest", "show", str(corpus), "samples", "--columns", "key,shard", "--limit", "3"]) == 0
    assert "(3 of 24 rows)" in capsys.readouterr().out
