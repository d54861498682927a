"""A merged LoRA update the device computes instead of downloading it.

Merging a LoRA into a 4-bit model and rounding again changes most nibbles and every scale of each tuned
weight, so even as XOR deltas those weights are most of the update (5.3% of SmolLM2's bundle for a q/v LoRA).
But the host can define the merged weight as a function of what the device already holds, the parent's
blocks, and of what is small, the LoRA's factors:

    w      = scales * (q - 8) + offsets                     the parent's blocks, de-quantized in float32
    merged = float32(float64(w) + sum_j up[:, j] * down[j])  the change added in float64, rank by rank, in order
    blocks = round to nearest, symmetric, per block of 32    scale = the block's largest-magnitude value / -8

Every step is an IEEE operation numpy rounds the same way on any CPU (no BLAS sum whose order depends on
the machine), so the host's build and the device's computation give the same bytes. The device still checks
each computed chunk against the sha256 in the signed manifest and fetches any that does not match, so a
difference costs bytes, never correctness. The host builds merged models with this function
(models/building/fused_graph.py) and `bundle build` runs it on the parent's bytes before it writes a recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgellm.daemon.update.bundle import Piece, RemergedWeight

ZERO = 8  # MatMulNBits' default zero point for 4-bit weights


@dataclass(frozen=True)
class Change:
    """The LoRA factors added to rows start .. start + len(up) of a node's weight."""

    start: int
    up: np.ndarray  # [rows, rank], float16 values
    down: np.ndarray  # [rank, cols], float16 values


def dequantize(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, zero: int) -> np.ndarray:
    """Blocks as float32 [n, blocks, block]: scales * (q - zero) + offsets, the one formula host and device use
    (models/gguf/blocks.py de-quantizes with it too)."""
    w = scales[..., None] * (q.astype(np.float32) - zero)
    return w if offsets is None else w + offsets[..., None]


def merge_and_round(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, up: np.ndarray,
                    down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, scales) of base blocks (q uint8 [n, blocks, 32] unpacked, scales and offsets float32 [n, blocks])
    plus up @ down, rounded again. The result has no offsets."""
    n, nb, block = q.shape
    merged = dequantize(q, scales, offsets, ZERO).reshape(n, nb * block).astype(np.float64)
    for j in range(up.shape[1]):
        merged += up[:, j, None].astype(np.float64) * down[None, j, :].astype(np.float64)
    x = merged.astype(np.float32).reshape(n, nb, block)
    biggest = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    scale = biggest / np.float32(-ZERO)
    steps = np.divide(x, scale[..., None], out=np.zeros_like(x), where=scale[..., None] != 0)
    return np.clip(np.rint(steps) + ZERO, 0, 2 * ZERO - 1).astype(np.uint8), scale.astype(np.float32)


def unpack(packed: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit B [n, blocks, 16] (even element in the low nibble) as [n, blocks, 32]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack(q: np.ndarray) -> np.ndarray:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def remerge_node(q_packed: bytes, scales: bytes, offsets_t: bytes | None, rows: int, cols: int,
                 changes: list[Change], block: int = 32) -> dict[str, bytes]:
    """A fused node's new initializers ("q", "scales" and, where some rows keep their offsets, "offsets",
    stored transposed as the graph reads them) from the parent's: the changed rows merged and rounded, the
    others as they were (models/gguf/blocks.py `stack` lays out a node the same way)."""
    nb = cols // block
    q = unpack(np.frombuffer(q_packed, np.uint8).reshape(rows, nb, block // 2)).copy()
    s = np.frombuffer(scales, np.float32).reshape(rows, nb).copy()
    o = None if offsets_t is None else np.frombuffer(offsets_t, np.float32).reshape(nb, rows).T.copy()
    changed = np.zeros(rows, bool)
    for c in changes:
        end = c.start + len(c.up)
        if end > rows or c.down.shape[1] != cols or changed[c.start:end].any():
            raise ValueError(f"a change of rows {c.start}..{end} does not fit a {rows} x {cols} weight")
        q[c.start:end], s[c.start:end] = merge_and_round(q[c.start:end], s[c.start:end],
                                                         None if o is None else o[c.start:end], c.up, c.down)
        changed[c.start:end] = True
    out = {"q": pack(q).tobytes(), "scales": s.tobytes()}
    if o is not None and not changed.all():
        o[changed] = 0
        out["offsets"] = np.ascontiguousarray(o.T).tobytes()
    return out


def factor_name(node: str, start: int, which: str) -> str:
    """Where a change's factors sit in the model's remerge.safetensors."""
    return f"{node}@{start}:{which}"


def load_factors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def compute_weight(weight: RemergedWeight, factors: dict[str, np.ndarray],
                   read: Callable[[Piece], bytes]) -> dict[str, bytes]:
    """A bundle's re-merged weight (edgellm/daemon/update/bundle.py RemergedWeight) from the parent's bytes
    (`read` returns a piece of a chunk the device holds) and the factors file's tensors."""
    base = {role: b"".join(read(p) for p in pieces) for role, pieces in weight.base.items()}
    changes = [Change(c.start, factors[c.up], factors[c.down]) for c in weight.changes]
    return remerge_node(base["q"], base["scales"], base.get("offsets"), weight.rows, weight.cols, changes,
                        weight.block)
