"""Rows' keys counted against a run's listing, exactly and batch by batch (``KeyCount``): the listed keys are
held once with a 64-bit entry each (hash and position, sorted), a seen flag and an index of hash prefixes,
at most 13 bytes per key beside the keys themselves, and no batch is kept. A key is found by its hash, then
its string compared with the listed one, so a hash shared by two keys costs one more comparison and never
a wrong count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MISSING_SAMPLE = 5  # missing keys named by the counts
_HASH_ROWS = 1 << 14  # keys hashed at a time (the hash's temporaries: about 100 bytes per word of key)
_SLICE = 1 << 20  # entries built at a time
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_WORD_WEIGHTS = np.cumprod(np.full(1 << 8, _MULTIPLIER, dtype=np.uint64), dtype=np.uint64)  # one per word
_PARTIAL_WORD = np.array([(1 << 8 * size) - 1 for size in range(8)], dtype=np.uint64)  # masks of 0-7 bytes


@dataclass(frozen=True)
class OutputCounts:
    """The statistics' rows against the job's listing: ``rows`` (stats rows), ``keys`` (distinct keys),
    ``listed`` (listing rows), ``missing`` (listed keys without a row), ``duplicated`` (rows beyond the
    first of their key), ``unlisted`` (rows whose key is not listed), and up to ``MISSING_SAMPLE`` missing
    keys."""

    rows: int
    keys: int
    listed: int
    missing: int
    duplicated: int
    unlisted: int
    missing_sample: list[str]

    @property
    def one_row_per_input(self) -> bool:
        return self.rows == self.keys == self.listed and not (self.missing or self.duplicated or self.unlisted)


class KeyCount:
    """Counts the keys of rows offered batch by batch (``add``) against the ``listed`` keys (``counts``).

    Each listed key is one 64-bit entry, its hash's top bits above its position among the listed keys,
    sorted; the entries of each hash prefix start at ``first[prefix]`` (about one per prefix)."""

    def __init__(self, listed: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(listed, pa.ChunkedArray):
            if listed.nbytes >= 1 << 31:  # string offsets are 32-bit
                listed = listed.cast(pa.large_string())
            listed = listed.chunk(0) if listed.num_chunks == 1 else listed.combine_chunks()  # (which copies)
        self.listed = listed
        self.position_bits = np.uint64(max(1, (len(listed) - 1).bit_length()))
        self.entries = _hashes(listed)  # built in place, a slice at a time: no temporary of every key
        self.entries >>= self.position_bits
        self.entries <<= self.position_bits
        for start in range(0, len(listed), _SLICE):
            self.entries[start : start + _SLICE] |= np.arange(start, min(start + _SLICE, len(listed)), dtype=np.uint64)
        self.entries.sort()
        prefix_bits = min(max(1, len(listed).bit_length() - 1), 64 - int(self.position_bits))  # n/2 to n prefixes
        self.prefix_shift = np.uint64(64 - prefix_bits)
        self.first = np.empty((1 << prefix_bits) + 1, dtype=np.uint32 if len(listed) < 1 << 32 else np.int64)
        for start in range(0, len(self.first), _SLICE):
            prefixes = np.arange(start, min(start + _SLICE, len(self.first)), dtype=np.uint64) << self.prefix_shift
            self.first[start : start + len(prefixes)] = np.searchsorted(self.entries, prefixes)
        self.first[-1] = len(listed)  # the last prefix wrapped around to 0
        self.seen = np.zeros(len(listed), dtype=bool)
        self.rows = 0
        self.unlisted: list[pa.Array] = []  # none in a complete run

    def add(self, keys: pa.Array | pa.ChunkedArray) -> None:
        """Count one batch of rows' ``keys``."""
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        found = self.find(keys)
        self.seen[found[found >= 0]] = True
        self.rows += len(keys)
        if (found < 0).any():
            self.unlisted.append(keys.filter(pa.array(found < 0)))

    def find(self, keys: pa.Array) -> np.ndarray:
        """Each key's position among the listed keys, -1 where it is not listed (or null)."""
        hashes = _hashes(keys)
        top, prefix = hashes >> self.position_bits, hashes >> self.prefix_shift
        at, end = self.first[prefix].astype(np.int64), self.first[prefix + np.uint64(1)]
        found = np.full(len(keys), -1, dtype=np.int64)
        rows = np.arange(len(keys))
        while rows.size:  # once, and again only for keys whose hash's top bits are shared
            rows = self._same_top(rows, at, end, top)
            candidates = (self.entries[at[rows]] & ((np.uint64(1) << self.position_bits) - 1)).astype(np.int64)
            same = pc.equal(self.listed.take(candidates), keys.take(rows)).fill_null(False)
            same = same.to_numpy(zero_copy_only=False)
            found[rows[same]] = candidates[same]
            rows = rows[~same]
            at[rows] += 1
        return found

    def _same_top(self, rows: np.ndarray, at: np.ndarray, end: np.ndarray, top: np.ndarray) -> np.ndarray:
        """Move each row's entry index ``at`` on to its first entry whose top bits are not below the row's
        ``top`` (within ``end``); the rows whose entry there has the same top bits."""
        moving = rows
        while moving.size:
            moving = moving[at[moving] < end[moving]]
            moving = moving[self.entries[at[moving]] >> self.position_bits < top[moving]]
            at[moving] += 1
        rows = rows[at[rows] < end[rows]]
        return rows[self.entries[at[rows]] >> self.position_bits == top[rows]]

    def counts(self) -> OutputCounts:
        """The counts of the rows offered so far."""
        unlisted = pa.chunked_array(self.unlisted, self.listed.type)
        distinct = int(np.count_nonzero(self.seen)) + pc.count_distinct(unlisted).as_py()
        missing = np.flatnonzero(~self.seen)
        return OutputCounts(
            rows=self.rows,
            keys=distinct,
            listed=len(self.listed),
            missing=len(missing),
            duplicated=self.rows - distinct,
            unlisted=len(unlisted),
            missing_sample=self.listed.take(missing[:MISSING_SAMPLE]).to_pylist(),
        )


def _hashes(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of ``keys`` (uint64; nulls hash as empty strings), ``_HASH_ROWS`` at a time."""
    hashes = np.empty(len(keys), dtype=np.uint64)
    for start in range(0, len(keys), _HASH_ROWS):
        hashes[start : start + _HASH_ROWS] = _word_hashes(keys.slice(start, _HASH_ROWS))
    return hashes


def _word_hashes(keys: pa.Array) -> np.ndarray:
    """Each key's bytes read as little-endian 64-bit words (the last one zero-padded), each word mixed and
    weighted by its place, summed, and mixed with the key's length."""
    _, offsets_buffer, data_buffer = keys.buffers()
    offset_type = np.int64 if pa.types.is_large_string(keys.type) or pa.types.is_large_binary(keys.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, offset_type)[keys.offset : keys.offset + len(keys) + 1].astype(np.int64)
    data = np.zeros(offsets[-1] - offsets[0] + 8, dtype=np.uint8)
    if data_buffer is not None:
        data[:-8] = np.frombuffer(data_buffer, np.uint8)[offsets[0] : offsets[-1]]
    words_at = np.ndarray((len(data) - 7,), np.dtype("<u8"), data, strides=(1,))  # the word at each byte
    lengths = np.diff(offsets)
    words = (lengths + 7) >> 3
    first = np.cumsum(words) - words  # each key's first word among all the keys' words
    index = np.arange(int(words.sum()))
    place = index - np.repeat(first, words)  # each word's place in its key
    at = index * 8
    at += np.repeat(offsets[:-1] - offsets[0] - 8 * first, words)  # each word's first byte
    word = words_at[at]
    partial = lengths % 8 > 0
    word[(first + words - 1)[partial]] &= _PARTIAL_WORD[lengths[partial] % 8]
    with np.errstate(over="ignore"):
        weighted = _mix(word) * _WORD_WEIGHTS.take(place, mode="wrap")
        sums = np.add.reduceat(weighted, np.minimum(first, max(len(weighted) - 1, 0))) if len(weighted) else first
        return _mix(np.where(words > 0, sums, 0).astype(np.uint64) ^ lengths.astype(np.uint64))


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, element-wise and in place (uint64, wrapping)."""
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values
