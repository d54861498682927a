"""Chunk deltas: a changed chunk sent as its XOR against the chunk the device already holds at the same place
in the same file, zstd-compressed. A LoRA merge moves few bits of each 4-bit weight, so the XOR is mostly
zeros and compresses several times smaller than the chunk (measured in scripts/bench_update.py). The device
rebuilds the chunk and checks its sha256 from the signed manifest, so a delta needs no signature of its own;
one that does not rebuild the chunk is dropped and the whole chunk fetched instead."""

from __future__ import annotations

import hashlib

import numpy as np
import zstandard

LEVEL = 19  # built once on the host, fetched by every device: spend the time compressing


def xor(a: bytes, b: bytes) -> bytes:
    return (np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).tobytes()


def make_delta(new: bytes, base: bytes) -> bytes:
    if len(new) != len(base):
        raise ValueError("a delta joins two chunks of one size")
    return zstandard.ZstdCompressor(level=LEVEL).compress(xor(new, base))


def apply_delta(delta: bytes, base: bytes, sha256: str) -> bytes | None:
    """The chunk `delta` rebuilds from `base`, or None when it does not hash to `sha256`."""
    try:
        diff = zstandard.ZstdDecompressor().decompress(delta, max_output_size=len(base))
    except zstandard.ZstdError:
        return None
    if len(diff) != len(base):
        return None
    chunk = xor(diff, base)
    return chunk if hashlib.sha256(chunk).hexdigest() == sha256 else None
