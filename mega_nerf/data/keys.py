"""Sorted ray keys in about 2 + log2(universe / count) bits each: Elias-Fano coding (Elias 1974, Fano 1971).

A ray's key is its pixel's place in the dataset, `offset[image] + pixel` (data.chunks), so a chunk's keys are a
sorted set of integers below `universe`, the dataset's pixel count. Each key is split into its `low` lowest bits,
stored as they are, and the rest, stored in unary: key i sets bit `(key >> low) + i` of the upper bit array. With
low = floor(log2(universe / count)) this is within 2 bits of the information-theoretic minimum whatever the keys
(a dense cell of a small survey: 4 bits a key; 4 M keys among 30 G pixels of a city: 15). Order inside a chunk
does not matter: the stream permutes every piece it loads.

Bytes, little-endian:
    0..7    magic b"MNKEYS01"
    8..15   count (uint64)
    16..23  universe (uint64)
    24      low (uint8), then 7 zero bytes
    32..    the low bits, `low` per key, key after key, first bit lowest (numpy.packbits bitorder="little"),
            padded to a byte; then the upper bits, count + (universe >> low) + 1 of them, padded likewise
Both directions are vectorised numpy: no loop over keys.
"""
from __future__ import annotations

import struct

import numpy as np

MAGIC = b"MNKEYS01"
HEADER = struct.Struct("<8sQQB7x")


def low_bits(count: int, universe: int) -> int:
    """Bits stored as they are per key: floor(log2(universe / count)), at least 0."""
    return max(0, (universe // max(count, 1)).bit_length() - 1)


def encoded_size(count: int, universe: int) -> int:
    """Bytes `encode_keys` writes for `count` keys below `universe`."""
    low = low_bits(count, universe)
    return HEADER.size + (count * low + 7) // 8 + (count + (universe >> low) + 1 + 7) // 8


def encode_keys(keys: np.ndarray, universe: int) -> bytes:
    """Sorted non-negative integer keys (N,), each below `universe`, as bytes (module docstring)."""
    keys = np.asarray(keys, np.int64)
    n, low = len(keys), low_bits(len(keys), universe)
    assert n == 0 or (keys[0] >= 0 and keys[-1] < universe and (np.diff(keys) >= 0).all()), "keys must be sorted"
    bits = np.empty((n, low), np.uint8)
    for b in range(low):
        bits[:, b] = (keys >> b) & 1
    upper = np.zeros(n + (universe >> low) + 1, np.uint8)
    upper[(keys >> low) + np.arange(n)] = 1
    return (HEADER.pack(MAGIC, n, universe, low) + np.packbits(bits.reshape(-1), bitorder="little").tobytes()
            + np.packbits(upper, bitorder="little").tobytes())


def decode_keys(data: bytes | memoryview) -> np.ndarray:
    """The sorted keys (N,) int64 of `encode_keys`' bytes; ValueError when they are not such bytes."""
    if len(data) < HEADER.size:
        raise ValueError("shorter than the header")
    magic, n, universe, low = HEADER.unpack_from(data)
    lows = (n * low + 7) // 8
    uppers = n + (universe >> low) + 1
    if magic != MAGIC or len(data) != HEADER.size + lows + (uppers + 7) // 8:
        raise ValueError("not a key file, or cut short")
    body = np.frombuffer(data, np.uint8, offset=HEADER.size)
    bits = np.unpackbits(body[:lows], count=n * low, bitorder="little").reshape(n, low)
    high = np.flatnonzero(np.unpackbits(body[lows:], count=uppers, bitorder="little"))
    if len(high) != n:
        raise ValueError(f"{len(high)} keys in the upper bits, the header says {n}")
    keys = (high - np.arange(n)) << low
    for b in range(low):
        keys |= bits[:, b].astype(np.int64) << b
    return keys
