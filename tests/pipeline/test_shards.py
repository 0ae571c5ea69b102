"""Shards: bounded and atomic, readable by plain webdataset and Ray, and validated against the manifest."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards.corpus import write_corpus_shards
from pipeline.shards.validate import validate_corpus
from pipeline.shards.writer import (
    ShardWriter,
    bucket_of,
    end_size,
    sample_members,
    shard_name,
    tar_header,
    tar_pieces,
)

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


def test_fast_reader_gives_what_webdataset_gives(corpus):
    """The trainer's tar reader (pipeline/shards/tarstream.py) against webdataset's own, member for member."""
    import webdataset as wds

    from pipeline.shards.tarstream import shard_samples

    for url in sorted(str(p) for p in (corpus / "shards").glob("shard-*.tar")):
        ours = list(shard_samples(url))
        theirs = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))
        assert ours and ours == theirs


def test_fast_reader_reads_pax_and_gnu_long_names_and_refuses_damage(tmp_path):
    from pipeline.shards.tarstream import ShardReadError, shard_samples

    key = "k" * 120
    members = {f"{key}.latent.npy": b"\x01" * 700, f"{key}.txt": b"a caption", "dir/short.json": b"{}"}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            tar.addfile(tarfile.TarInfo("a-directory/"))  # not a file: skipped
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        got = list(shard_samples(str(path)))
        assert [s["__key__"] for s in got] == [key, "dir/short"]
        assert got[0]["latent.npy"] == members[f"{key}.latent.npy"] and got[1]["json"] == b"{}"

    good = (tmp_path / f"{tarfile.PAX_FORMAT}.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good[:3000])
    with pytest.raises(ShardReadError, match="truncated"):
        list(shard_samples(str(cut)))
    flipped = bytearray(good)
    flipped[5] ^= 0xFF  # a byte of the first header's name
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ShardReadError, match="checksum"):
        list(shard_samples(str(bad)))
    flipped = bytearray(good)
    flipped[1024 + 5] ^= 0xFF  # inside the pax record that names the first file (data: no checksum)
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ShardReadError, match="pax"):
        list(shard_samples(str(bad)))


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
    assert "(3 of 24 " in capsys.readouterr().out  # "(3 of 24 rows)", or "(3 of 24 matching rows; ...)"


def _rewrite_shard(corpus: Path, shard: Path, edit) -> None:
    """Rewrite `shard` with its members passed through `edit(list of (name, bytes))`, and make the shards table
    agree with the new file (bytes, sha256): damage that only the members themselves can show."""
    import pyarrow as pa

    from pipeline import manifest

    with tarfile.open(shard, "r:") as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    rows = manifest.read_table(str(corpus), "shards").to_pylist()
    for row in rows:
        if row["shard"] == shard.name:
            row["bytes"], row["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    schema = manifest.SCHEMAS["shards"]
    manifest.write_table(
        str(corpus), "shards", pa.Table.from_pylist(rows, schema=schema), prefix="", replace_table=True
    )


def test_validate_sees_a_repeated_key_and_a_changed_caption_behind_a_consistent_table(corpus, capsys):
    from pipeline.cli import main

    first = sorted((corpus / "shards").glob("shard-*.tar"))[0]
    key = None

    def repeat_first_sample(members):
        nonlocal key
        key = members[0][0].split(".", 1)[0]
        return members + [(n, d) for n, d in members if n.startswith(key + ".")]

    _rewrite_shard(corpus, first, repeat_first_sample)
    problems = validate_corpus(str(corpus))
    assert any(f"sample {key} appears 2 times" in p for p in problems), problems
    assert not any("sha256" in p or "bytes, manifest says" in p for p in problems)  # the table agrees

    def recaption(members):
        return [(n, b"a different caption" if n.endswith(".txt") else d) for n, d in dict(members).items()]

    _rewrite_shard(corpus, first, recaption)
    problems = validate_corpus(str(corpus))
    assert problems and all("differs from samples.caption" in p for p in problems), problems
    assert main(["manifest", "validate", str(corpus)]) == 1
    assert "'a different caption' differs from samples.caption" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["footer", "foreign"])
def test_an_unreadable_table_file_is_named_never_skipped(corpus, damage, capsys):
    from pipeline.cli import main

    part = sorted((corpus / "manifest" / "samples").rglob("*.parquet"))[0]
    if damage == "footer":
        data = bytearray(part.read_bytes())
        data[-12:-8] = b"\xff\xff\xff\x7f"  # footer length past the file's start
        part.write_bytes(bytes(data))
        bad = part
    else:
        bad = part.parent / "notes.txt"
        bad.write_text("not a table")
    assert main(["manifest", "validate", str(corpus)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    for argv in (["manifest", "show", str(corpus), "samples"], ["manifest", "stats", str(corpus)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("recap: error:") == 1 and str(bad) in err and "unreadable" in err


def _members(n: int = 6, key_len: int = 0) -> list[tuple[dict, str]]:
    """(tar members, bucket) of `n` samples; `key_len` pads keys to that length."""
    out = []
    for item in _samples(n):
        key = item["key"].ljust(key_len, "k") if key_len else item["key"]
        latent = item["latent"]
        out.append((sample_members(key, latent, item["caption"], item["meta"]), bucket_of(latent.shape)))
    return out


def _write(out_dir, members, **kwargs):
    writer = ShardWriter(str(out_dir), **kwargs)
    for sample, bucket in members:
        writer.write(sample, bucket)
    return writer.close()


def _reference_tar(samples: list[dict]) -> bytes:
    """The same samples through the standard library's tarfile, as plain ustar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("_")):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buf.getvalue()


def test_shards_are_deterministic_plain_ustar_with_their_sha256(tmp_path):
    members = _members(8)
    first = _write(tmp_path / "a", members, max_count=3)
    second = _write(tmp_path / "b", members, max_count=3)
    assert [(i.shard, i.num_samples, i.bytes, i.sha256) for i in first] == [
        (i.shard, i.num_samples, i.bytes, i.sha256) for i in second
    ]
    by_shard: dict[str, list[tarfile.TarInfo]] = {}
    for info in first:
        data = (tmp_path / "a" / info.shard).read_bytes()
        assert data == (tmp_path / "b" / info.shard).read_bytes()  # same samples, same bytes
        assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
        assert len(data) % 10240 == 0
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            infos = tar.getmembers()
            assert all(m.isreg() and m.mtime == 0 and m.mode == 0o444 and m.uid == m.gid == 0 for m in infos)
            assert all(not m.pax_headers for m in infos)  # plain ustar: no pax records
            by_shard[info.shard] = infos
    # Byte-identical to what tarfile writes for the same members (in sorted extension order).
    samples = [s for s, _ in members]
    for info in first:
        keys = {m.name.split(".", 1)[0] for m in by_shard[info.shard]}
        in_shard = [s for s in samples if s["__key__"] in keys]
        assert (tmp_path / "a" / info.shard).read_bytes() == _reference_tar(in_shard)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(i.shard for i in first)  # no temporaries


def test_shard_bytes_are_pinned(tmp_path):
    """A fixed sample gives the same shard on every machine and version: a change here changes every corpus."""
    sample = {
        "__key__": "golden-0000000-0000001",
        "txt": b"a caption",
        "json": b'{"fps": 24.0}',
        "latent.npy": bytes(range(256)) * 300,  # large enough to be written as its own buffer
    }
    [info] = _write(tmp_path, [(sample, "b")])
    assert (tmp_path / info.shard).read_bytes() == _reference_tar([sample])
    assert (info.bytes, info.sha256) == (81920, "4868b8c4604c37ac94a0e6a3e2bd18978949c165f347820a6246b8f909983282")


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("0123456789abcdef-0000000-0000010.latent.npy", 573_568),
        ("x.txt", 0),
        ("a" * 96 + ".txt", 512),  # exactly 100 bytes
        ("a" * 97 + ".json", 1),  # 102 bytes: pax path
        ("dir/" * 30 + "key.txt", 7),  # 127 bytes with '/': ustar prefix
        ("big.mp4", 8**11),  # too big for ustar's size field: pax size
    ],
)
def test_tar_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    try:
        expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    except ValueError:
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    assert tar_header(name, size) == expected


def test_long_member_names_round_trip(tmp_path):
    import webdataset as wds

    members = _members(4, key_len=140)  # KEY.latent.npy is 151 characters
    infos = _write(tmp_path, members)
    urls = [str(tmp_path / i.shard) for i in infos]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(got) == sorted(s["__key__"] for s, _ in members)
    for sample, _ in members:
        assert all(got[sample["__key__"]][k] == sample[k] for k in ("latent.npy", "txt", "json"))
    with tarfile.open(urls[0]) as tar:
        assert all(len(m.name) > 100 for m in tar.getmembers())


def test_size_and_count_bounds_are_exact(tmp_path):
    rng = np.random.default_rng(1)
    max_bytes, max_count = 60_000, 5
    members = []
    for i in range(60):
        shape = (4, 1, 8, int(rng.integers(1, 500)))
        if i == 17:
            shape = (4, 1, 8, 2000)  # one sample bigger than max_bytes alone
        members.append((sample_members(f"k{i:04d}", np.zeros(shape, np.float16), "c" * int(i), {}), f"b{i % 3}"))
    infos = _write(tmp_path, members, max_bytes=max_bytes, max_count=max_count)
    sizes = {s["__key__"]: sum(len(p) for p in tar_pieces(s)) for s, _ in members}
    order = {s["__key__"]: i for i, (s, _) in enumerate(members)}
    keys_of = {}
    for info in infos:
        with tarfile.open(tmp_path / info.shard) as tar:
            keys_of[info.shard] = sorted({m.name.split(".")[0] for m in tar.getmembers()}, key=order.get)
        assert len(keys_of[info.shard]) == info.num_samples <= max_count
        assert info.bytes == (tmp_path / info.shard).stat().st_size
        assert info.bytes <= max_bytes or info.num_samples == 1
    assert sum(i.num_samples for i in infos) == len(members)
    assert any(i.num_samples == 1 and i.bytes > max_bytes for i in infos)
    # Tight: a shard was closed only when the bucket's next sample would not fit (or the count was reached).
    for bucket in {i.bucket for i in infos}:
        shards = [i for i in infos if i.bucket == bucket]
        shards.sort(key=lambda i: order[keys_of[i.shard][0]])
        for shard, nxt in zip(shards, shards[1:], strict=False):
            body = shard.bytes - end_size(sum(sizes[k] for k in keys_of[shard.shard]))
            grown = body + sizes[keys_of[nxt.shard][0]]
            assert shard.num_samples == max_count or grown + end_size(grown) > max_bytes


def _check_store(fs, root: str, infos, members, tmp_path) -> None:
    """The shards in the store parse with tarfile and webdataset and match ShardInfo; nothing else is left."""
    import webdataset as wds

    left = sorted(p.rsplit("/", 1)[-1] for p in fs.find(root))
    assert left == sorted(i.shard for i in infos), left  # no .partial, no temporaries
    expected = {s["__key__"]: s for s, _ in members}
    seen = []
    for info in infos:
        data = fs.cat_file(f"{root}/{info.shard}")
        assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert len(tar.getmembers()) == 3 * info.num_samples
        local = tmp_path / "readback" / info.shard
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(data)
        for sample in wds.WebDataset(str(local), shardshuffle=False):
            assert sample["latent.npy"] == expected[sample["__key__"]]["latent.npy"]
            seen.append(sample["__key__"])
    assert sorted(seen) == sorted(expected)


def test_object_store_memory(tmp_path):
    import fsspec

    root = f"/recap-test-{uuid.uuid4().hex[:8]}/shards"
    fs = fsspec.filesystem("memory")
    members = _members(6)
    writer = ShardWriter(f"memory://{root}", max_count=2)
    for sample, bucket in members:
        writer.write(sample, bucket)
    infos = writer.close()
    try:
        assert len(infos) == 4 and not Path(writer.stage_dir).exists()
        _check_store(fs, root, infos, members, tmp_path)
        from pipeline.shards.tarstream import shard_samples  # the trainer's reader, straight from the store

        read = [s for info in infos for s in shard_samples(f"memory://{root}/{info.shard}")]
        assert sorted(s["__key__"] for s in read) == sorted(sample["__key__"] for sample, _ in members)
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


@pytest.fixture()
def s3_endpoint(monkeypatch):
    """A local S3 API (moto's server in a thread) that s3:// URIs reach through s3fs."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield fsspec.filesystem("s3")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_object_store_s3(s3_endpoint, tmp_path):
    fs = s3_endpoint
    fs.mkdir("recap-test")
    members = _members(6)
    writers = [ShardWriter("s3://recap-test/corpus/shards", max_count=2) for _ in (0, 1)]
    for i, (sample, bucket) in enumerate(members):
        writers[i % 2].write(sample, bucket)  # two parallel writers into one prefix: names come from content
    infos = writers[0].close() + writers[1].close()
    assert len({i.shard for i in infos}) == 4
    assert all(i.shard == shard_name(i.keys) for i in infos)
    fs.invalidate_cache()
    _check_store(fs, "recap-test/corpus/shards", infos, members, tmp_path)


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    import pipeline.shards.writer as writer_module

    members = _members(4)
    expected = _write(tmp_path / "a", members)
    real_writev = writer_module.os.writev

    def short_writev(fd, buffers):  # the kernel may write less than asked: at most 1000 bytes here
        first = bytes(memoryview(buffers[0])[:1000])
        return real_writev(fd, [first]) if first else real_writev(fd, buffers[:2])

    monkeypatch.setattr(writer_module.os, "writev", short_writev)
    got = _write(tmp_path / "b", members)
    assert [(i.shard, i.bytes, i.sha256) for i in got] == [(i.shard, i.bytes, i.sha256) for i in expected]
    for info in got:
        assert (tmp_path / "b" / info.shard).read_bytes() == (tmp_path / "a" / info.shard).read_bytes()


def test_abort_keeps_finished_shards_and_drops_temporaries(tmp_path):
    writer = ShardWriter(str(tmp_path), max_count=2)
    for sample, _ in _members(5):
        writer.write(sample, "one")
    writer.abort()
    keys = [sample["__key__"] for sample, _ in _members(5)]
    names = [shard_name(keys[0:2]), shard_name(keys[2:4])]
    assert [i.shard for i in writer.done] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_shard_names_come_from_the_sorted_keys():
    assert shard_name(["b", "a"]) == shard_name(["a", "b"]) != shard_name(["a", "c"])
    assert re.fullmatch(r"shard-[0-9a-f]{16}\.tar", shard_name(["a"]))
