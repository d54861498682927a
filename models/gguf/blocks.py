"""Quantized matrices in the one form onnxruntime's MatMulNBits runs, and GGUF's block types decoded into it.

    w[n, k] = scales[n, b] * (q[n, b, j] - zero) + offsets[n, b]      b = k // block, j = k % block

`zero` is MatMulNBits' default zero point: 8 for 4-bit q, 128 for 8-bit. Without offsets the matrix is one
MatMulNBits node; with them, the graph adds `blocksum(A) @ offsets^T` (A summed over each block along K).

Every GGUF type below maps its integers and scales into this form exactly, so an imported weight is the
GGUF's own weight, not a second rounding of it (docs/measured-facts.md, "Quantization"):

| GGUF | per block | here |
|---|---|---|
| Q4_0 | w = d (q - 8), 32 | 4-bit, block 32 |
| Q4_1 | w = d q + m, 32 | 4-bit, block 32, offset m + 8d |
| Q4_K | w = d sc q - dmin m, 8 x 32 in a 256 super-block, 6-bit sc and m | 4-bit, block 32, offset 8 d sc - dmin m |
| Q5_0 | w = d (q - 16), 32 | 8-bit (q + 112), block 32 |
| Q5_1 | w = d q + m, 32 | 8-bit (q + 112), block 32, offset m + 16d |
| Q5_K | w = d sc q - dmin m, like Q4_K with 5-bit q | 8-bit (q + 112), block 32, offset 16 d sc - dmin m |
| Q6_K | w = d sc (q - 32), 16 x 16 in a 256 super-block, 8-bit sc | 8-bit (q + 96), block 16 |
| Q8_0 | w = d q, 32 | 8-bit (q + 128), block 32 |

The products `d * sc` and `dmin * m` are taken in fp32, as llama.cpp de-quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgellm.daemon.update.remerge import dequantize

QK_K = 256


@dataclass
class Blocks:
    """A quantized [N, K] matrix (rows are output features, as in GGUF and MatMulNBits)."""

    bits: int  # 4 or 8
    block: int  # elements per block along K: 32, or 16 (Q6_K)
    q: np.ndarray  # uint8 [N, K / block, block], values in [0, 2**bits)
    scales: np.ndarray  # float32 [N, K / block]
    offsets: np.ndarray | None  # float32 [N, K / block], or None
    kind: str  # where it came from: a GGUF type name, or "round to nearest"

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * self.q.shape[2]

    def dequantize(self) -> np.ndarray:
        """[N, K] float32, by the formula a device repeats (edgellm/daemon/update/remerge.py)."""
        return dequantize(self.q, self.scales, self.offsets, self.zero).reshape(self.shape)

    def rows(self, order: np.ndarray) -> Blocks:
        return Blocks(self.bits, self.block, self.q[order], self.scales[order],
                      None if self.offsets is None else self.offsets[order], self.kind)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B input: 8-bit as is, 4-bit two to a byte with the even element in the low nibble."""
        if self.bits == 8:
            return self.q
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)


def stack(parts: list[Blocks]) -> Blocks:
    """Rows of several matrices with the same K, bits and block, as one matrix (packed q/k/v, gate/up)."""
    first = parts[0]
    if any((p.bits, p.block, p.q.shape[1:]) != (first.bits, first.block, first.q.shape[1:]) for p in parts):
        raise ValueError("only blocks of one width and layout stack")
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
    kinds = sorted({p.kind for p in parts})
    return Blocks(first.bits, first.block, np.concatenate([p.q for p in parts]),
                  np.concatenate([p.scales for p in parts]), offsets, "+".join(kinds))


# -- GGUF types ----------------------------------------------------------------------------------------------
def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs element j with j + 16 of a 32-block: low nibbles first, then high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K / Q5_K super-block's 12 bytes."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_0(raw: np.ndarray) -> Blocks:
    b = raw.reshape(raw.shape[0], -1, 18)
    return Blocks(4, 32, _nibbles(b[..., 2:]), _f16(b[..., 0:2]), None, "Q4_0")


def _q4_1(raw: np.ndarray) -> Blocks:
    b = raw.reshape(raw.shape[0], -1, 20)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return Blocks(4, 32, _nibbles(b[..., 4:]), d, m + 8 * d, "Q4_1")


def _q5_high_bits(qh: np.ndarray, n_blocks: int) -> np.ndarray:
    """Q5_0 / Q5_1: the fifth bit of each of the 32 elements, from a little-endian uint32."""
    bits = qh.copy().view(np.uint32)[..., 0][..., None] >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q5_0(raw: np.ndarray) -> Blocks:
    b = raw.reshape(raw.shape[0], -1, 22)
    q = _nibbles(b[..., 6:]) | (_q5_high_bits(b[..., 2:6], b.shape[1]) << 4)
    return Blocks(8, 32, q + np.uint8(112), _f16(b[..., 0:2]), None, "Q5_0")


def _q5_1(raw: np.ndarray) -> Blocks:
    b = raw.reshape(raw.shape[0], -1, 24)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 8:]) | (_q5_high_bits(b[..., 4:8], b.shape[1]) << 4)
    return Blocks(8, 32, q + np.uint8(112), d, m + 16 * d, "Q5_1")


def _q8_0(raw: np.ndarray) -> Blocks:
    b = raw.reshape(raw.shape[0], -1, 34)
    q = b[..., 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8 is its bit pattern with the sign bit flipped
    return Blocks(8, 32, q, _f16(b[..., 0:2]), None, "Q8_0")


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 32-block fp32 scale d*sc and min dmin*m of Q4_K / Q5_K super-blocks."""
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    return d[..., None] * sc.astype(np.float32), dmin[..., None] * mn.astype(np.float32)


def _q4_k(raw: np.ndarray) -> Blocks:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 144)
    scale, mins = _k_scales(b)
    qs = b[..., 16:].reshape(n, b.shape[1], 4, 32)  # 4 x 32 bytes: sub-blocks 2i (low nibbles) and 2i+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 32)
    scale, mins = scale.reshape(n, -1), mins.reshape(n, -1)
    return Blocks(4, 32, q, scale, 8 * scale - mins, "Q4_K")


def _q5_k(raw: np.ndarray) -> Blocks:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 176)
    scale, mins = _k_scales(b)
    qh = b[..., 16:48]  # 32 bytes: bit i of byte j is the fifth bit of element j of sub-block i
    qs = b[..., 48:].reshape(n, b.shape[1], 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, b.shape[1], 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = (low | (high << 4)).reshape(n, -1, 32)
    scale, mins = scale.reshape(n, -1), mins.reshape(n, -1)
    return Blocks(8, 32, q + np.uint8(112), scale, 16 * scale - mins, "Q5_K")


def _q6_k(raw: np.ndarray) -> Blocks:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 210)
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    # Two halves of 128 elements; in each, ql holds 64 bytes (low nibbles: elements 0-63, high: 64-127) and
    # qh 32 bytes (bits 0-1, 2-3, 4-5, 6-7 for elements 0-31, 32-63, 64-95, 96-127).
    ql = ql.reshape(n, -1, 2, 2, 32)  # half, [first 32 bytes, next 32], byte
    lo = np.concatenate([ql[..., 0, :] & 0x0F, ql[..., 1, :] & 0x0F, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4],
                        axis=-1)  # [n, super, half, 128]
    qh = qh.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    hi = (qh & 0x03).reshape(n, -1, 2, 128)
    q = (lo | (hi << 4)).reshape(n, -1, 16)
    return Blocks(8, 16, q + np.uint8(96), (d[..., None] * sc).reshape(n, -1), None, "Q6_K")


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q5_K": _q5_k,
            "Q6_K": _q6_k, "Q8_0": _q8_0}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


def decode(kind: str, raw: np.ndarray, rows: int) -> Blocks | np.ndarray | None:
    """A GGUF tensor's bytes as Blocks (quantized), a float32 matrix (F32, F16, BF16), or None when its type
    has no exact form here (the caller then de-quantizes it and rounds it again, and says so)."""
    raw = np.asarray(raw)
    if kind in DECODERS:
        return DECODERS[kind](raw.view(np.uint8).reshape(rows, -1))
    if kind in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[kind]).reshape(rows, -1).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).reshape(rows, -1).astype(np.uint32) << 16).view(np.float32)
    return None
