"""Near-duplicate detection over a whole corpus with perceptual hashes, in bounded memory.

Each clip carries the 64-bit pHash (imagehash) of its sampled frames. Candidate pairs come from
locality-sensitive banding: clips that share a 16-bit band of any sampled frame's hash land in
the same group (a Ray Data groupby, so no machine holds the corpus); a candidate pair is a
duplicate when its frame hashes differ by at most `max_hamming` bits on average. Groups of
duplicates are joined (union-find over the duplicate edges, which are few) and one clip per
group is kept by a stated rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

BANDS = 4
BAND_BITS = 64 // BANDS


def phash64(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an image (grey or RGB uint8) as a signed int64."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(image), hash_size=8).hash.flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value  # fits Parquet int64


def hamming(a: int, b: int) -> int:
    return int(((a ^ b) & ((1 << 64) - 1)).bit_count())


def band_keys(hashes: Iterable[int]) -> set[str]:
    """`band:value` keys of every frame hash: a near-identical frame shares at least one."""
    keys = set()
    for h in hashes:
        u = h & ((1 << 64) - 1)
        for band in range(BANDS):
            keys.add(f"{band}:{(u >> (band * BAND_BITS)) & ((1 << BAND_BITS) - 1):04x}")
    return keys


def clip_distance(a: list[int], b: list[int]) -> float:
    """Mean Hamming distance between two clips' frame hashes, aligned by position.

    Clips with different frame counts are compared on evenly spaced positions of the longer list.
    """
    if not a or not b:
        return 64.0
    if len(a) != len(b):
        long, short = (a, b) if len(a) > len(b) else (b, a)
        idx = np.linspace(0, len(long) - 1, len(short)).round().astype(int)
        a, b = [long[i] for i in idx], short
    return float(np.mean([hamming(x, y) for x, y in zip(a, b, strict=True)]))


def duplicate_edges(group: list[dict[str, Any]], max_hamming: float) -> list[tuple[str, str, float]]:
    """Pairs of clips in one band group whose hashes are within `max_hamming` bits, directly or with one of
    them mirrored (when rows carry `phashes_mirrored`)."""
    edges = []
    for i in range(len(group)):
        for j in range(i + 1, len(group)):
            a, b = group[i], group[j]
            if a["clip_id"] == b["clip_id"] or (a.get("previous") and b.get("previous")):
                continue
            d = clip_distance(a["phashes"], b["phashes"])
            if b.get("phashes_mirrored"):  # b mirrored: a's frames against b's mirrored frames
                d = min(d, clip_distance(a["phashes"], b["phashes_mirrored"]))
            if d <= max_hamming:
                edges.append((a["clip_id"], b["clip_id"], d))
    return edges


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


def keep_rank(row: dict[str, Any]) -> tuple:
    """Higher is kept: a clip of an earlier corpus, then aesthetic, duration, sharpness; ties by id."""

    def num(key: str) -> float:
        value = row.get(key)
        return -1e18 if value is None or value != value else float(value)

    return (
        bool(row.get("previous")),
        num("score_aesthetic"),
        num("duration_s"),
        num("score_sharpness"),
        _neg_id(row["clip_id"]),
    )


def _neg_id(clip_id: str) -> tuple:
    # Smallest clip_id wins a full tie: negate character codes so that max() prefers it.
    return tuple(-ord(c) for c in clip_id)


def resolve_duplicates(edges: Iterable[tuple[str, str, float]], info: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{dropped clip_id: kept clip_id} for every duplicate group, keeping the best by `keep_rank`."""
    uf = UnionFind()
    for a, b, _d in edges:
        uf.union(a, b)
    dropped: dict[str, str] = {}
    for members in uf.groups().values():
        if len(members) < 2:
            continue
        keeper = max(members, key=lambda m: keep_rank({"clip_id": m, **info.get(m, {})}))
        for member in members:
            if member != keeper and not info.get(member, {}).get("previous"):
                dropped[member] = keeper
    return dropped
