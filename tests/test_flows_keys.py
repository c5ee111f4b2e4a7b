"""The segment-bucket flow's key count (flows/keys.py): rows' keys, offered batch by batch, counted exactly
against the job's listing: missing, duplicated and unlisted keys, nulls, empty inputs, keys whose 64-bit
hashes are equal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flows.keys import KeyCount, _hashes

MASK = (1 << 64) - 1
MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _unmix(value: int) -> int:
    """The inverse of SplitMix64's finalizer."""
    value ^= (value >> 31) ^ (value >> 62)
    value = value * pow(MULTIPLIERS[1], -1, 1 << 64) & MASK
    value ^= (value >> 27) ^ (value >> 54)
    value = value * pow(MULTIPLIERS[0], -1, 1 << 64) & MASK
    return value ^ (value >> 30) ^ (value >> 60)


def _mix(value: int) -> int:
    value ^= value >> 30
    value = value * MULTIPLIERS[0] & MASK
    value ^= value >> 27
    value = value * MULTIPLIERS[1] & MASK
    return value ^ (value >> 31)


def _colliding(key: bytes) -> bytes:
    """Another 16-byte key whose hash equals ``key``'s: its first word differs, its second one makes up for it
    in the weighted sum of mixed words."""
    first, second = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    weight = 0x9E3779B97F4A7C15
    other_first = first ^ 1
    wanted = (_mix(first) * weight + _mix(second) * weight * weight - _mix(other_first) * weight) & MASK
    other_second = _unmix(wanted * pow(weight * weight & MASK, -1, 1 << 64) & MASK)
    return other_first.to_bytes(8, "little") + other_second.to_bytes(8, "little")


def test_counts_missing_duplicated_and_unlisted_keys_over_batches() -> None:
    """Rows offered in batches (plain and chunked arrays, a slice): a listed key seen twice is one duplicate,
    a listed key never seen is missing and named, a key not listed is counted once per row and once among
    the distinct keys; a null key is a row that is neither listed nor a distinct key."""
    listed = [f"photos/2026/{i:09d}.jpg" for i in range(1000)]
    count = KeyCount(pa.chunked_array([listed[:600], listed[600:]]))
    count.add(pa.array(["x", *listed[:500]]).slice(1))
    count.add(pa.chunked_array([listed[400:700], ["elsewhere.jpg", None], listed[701:998]]))
    count.add(pa.array(["elsewhere.jpg", "elsewhere.jpg", "other.jpg"]))
    counts = count.counts()
    assert counts.rows == 500 + 300 + 2 + 297 + 3
    assert (counts.listed, counts.missing, counts.missing_sample) == (1000, 3, [listed[700], listed[998], listed[999]])
    assert counts.keys == 997 + 2  # the listed keys seen, elsewhere.jpg and other.jpg
    assert counts.unlisted == 5 and counts.duplicated == counts.rows - counts.keys == 100 + 2 + 1
    assert not counts.one_row_per_input


def test_one_row_per_listed_key_in_any_order_passes() -> None:
    listed = pa.array([f"k/{i}" * (i % 7 + 1) for i in range(5000)])  # keys of 3 to 42 bytes
    count = KeyCount(listed)
    order = np.random.default_rng(0).permutation(len(listed))
    for start in range(0, len(order), 777):
        count.add(listed.take(order[start : start + 777]))
    counts = count.counts()
    assert counts.one_row_per_input and (counts.rows, counts.keys, counts.missing) == (5000, 5000, 0)


def test_empty_listing_and_empty_batches() -> None:
    empty = KeyCount(pa.array([], pa.string()))
    empty.add(pa.array([], pa.string()))
    assert empty.counts().one_row_per_input and empty.counts().rows == 0
    empty.add(pa.array(["a", "a"]))
    assert (empty.counts().rows, empty.counts().keys, empty.counts().unlisted) == (2, 1, 2)
    none_done = KeyCount(pa.array(["a", "", "b"]))
    none_done.add(pa.array([], pa.string()))
    assert none_done.counts().missing == 3 and none_done.counts().missing_sample == ["a", "", "b"]


def test_keys_with_equal_hashes_are_told_apart() -> None:
    """Two different listed keys with the same 64-bit hash are each found by their own rows, and a row whose
    key only shares a listed key's hash is not listed."""
    key = b"photos/2026/0001"
    twin = _colliding(key)
    assert twin != key and _hashes(pa.array([key, twin], pa.binary())).tolist() == [_hashes(pa.array([key]))[0]] * 2
    count = KeyCount(pa.array([key, b"photos/2026/0002", twin], pa.binary()))
    count.add(pa.array([twin, key, twin], pa.binary()))
    counts = count.counts()
    assert (counts.rows, counts.keys, counts.missing, counts.duplicated, counts.unlisted) == (3, 2, 1, 1, 0)
    assert counts.missing_sample == [b"photos/2026/0002"]
    stranger = KeyCount(pa.array([key], pa.binary()))
    stranger.add(pa.array([twin], pa.binary()))
    assert (stranger.counts().missing, stranger.counts().unlisted) == (1, 1)
