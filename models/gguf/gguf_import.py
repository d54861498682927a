"""Lossless import of a GGUF file's quantized blocks into the ONNX graph, instead of rounding its
de-quantized weights a second time (SmolLM2 int4 perplexity 23.8 -> 28.3 that way; docs/measured-facts.md).

- Q4_1 (`w = d*q + m`) has no fast MatMulNBits form with float zero points, so it becomes an exact split:
  `Y = MatMulNBits(A, q, d) + blocksum(A) @ (m + 8d)^T`, where MatMulNBits without zero points computes
  `d*(q-8)` and blocksum(A) sums A over each block of 32 along K (shared by the MatMuls that read the same A).
- Q8_0 (`w = d*q`) is MatMulNBits with bits=8 and B = q+128 (the output head), and the same bytes feed
  GatherBlockQuantized for the embedding lookup.

A weight is imported only if the GGUF block values reproduce it exactly. In a packed weight (the fused graph's
q/k/v or gate/up) the parts that still match are imported and a part a LoRA merge changed is rounded to
nearest in the same node; anything else (an unknown layout) is left for the normal quantizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

QK = 32
PREFIX = "/edgellm/gguf/"
# ONNX projection -> the GGUF matrices whose rows it stacks (the fused graph packs q/k/v and gate/up).
LINEARS = {"self_attn/q_proj": ("attn_q",), "self_attn/k_proj": ("attn_k",), "self_attn/v_proj": ("attn_v",),
           "self_attn/qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn/o_proj": ("attn_output",),
           "mlp/gate_proj": ("ffn_gate",), "mlp/up_proj": ("ffn_up",), "mlp/gate_up_proj": ("ffn_gate", "ffn_up"),
           "mlp/down_proj": ("ffn_down",)}
NODE = re.compile(r"^/model/layers\.(\d+)/(self_attn/(?:[qkvo]|qkv)_proj|mlp/(?:gate|up|down|gate_up)_proj)/MatMul$")


@dataclass
class Blocks:
    """One GGUF matrix as blocks along K: q [N, K/32, 32], scale d and min m [N, K/32] (m is None for Q8_0)."""

    kind: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None

    def weight(self) -> np.ndarray:
        """[N, K], as llama.cpp and transformers de-quantize it (fp32 arithmetic)."""
        w = self.d[..., None] * self.q.astype(np.float32)
        if self.m is not None:
            w = w + self.m[..., None]
        return w.reshape(self.q.shape[0], -1)

    def rows(self, order: np.ndarray) -> Blocks:
        return Blocks(self.kind, self.q[order], self.d[order], None if self.m is None else self.m[order])


def read_blocks(path: Path) -> dict[str, Blocks]:
    from edgellm.models.gguf.reader import gguf_reader

    found = {}
    for t in gguf_reader(path).tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0"):
            continue
        n = int(t.shape[1]) if len(t.shape) == 2 else int(t.data.shape[0])
        raw = np.asarray(t.data, dtype=np.uint8).reshape(n, -1)
        if kind == "Q4_1":  # per block: d f16, m f16, 16 bytes holding elements j (low nibble) and j+16 (high)
            b = raw.reshape(n, -1, 20)
            d, m = b[..., 0:2].copy().view(np.float16)[..., 0], b[..., 2:4].copy().view(np.float16)[..., 0]
            qs = b[..., 4:]
            found[t.name] = Blocks(kind, np.concatenate([qs & 0x0F, qs >> 4], axis=-1),
                                   d.astype(np.float32), m.astype(np.float32))
        else:  # per block: d f16, 32 int8
            b = raw.reshape(n, -1, 34)
            d = b[..., 0:2].copy().view(np.float16)[..., 0]
            found[t.name] = Blocks(kind, b[..., 2:].copy().view(np.int8), d.astype(np.float32), None)
    return found


def unpermute_rows(n: int, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows; this is the row order that undoes it
    (transformers' `_reverse_permute_weights`, applied to row indices)."""
    dim = n // heads // 2
    return np.arange(n).reshape(heads, dim, 2).swapaxes(1, 2).reshape(n)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit layout: the even element in the low nibble."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.block_sums: dict[str, str] = {}

    def weight(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def drop_initializer(self, name: str) -> None:
        self.graph.initializer.remove(self.inits.pop(name))

    def block_sum(self, a: str, k: int) -> tuple[str, list[onnx.NodeProto]]:
        if a in self.block_sums:
            return self.block_sums[a], []
        base = f"{PREFIX}blocksum/{len(self.block_sums)}"
        shape = self.add(np.array([0, 0, k // QK, QK], dtype=np.int64), f"{base}/shape")
        axes = self.add(np.array([-1], dtype=np.int64), f"{base}/axes")
        out = f"{base}/output"
        nodes = [helper.make_node("Reshape", [a, shape], [f"{base}/reshaped"], name=f"{base}/Reshape"),
                 helper.make_node("ReduceSum", [f"{base}/reshaped", axes], [out], keepdims=0,
                                  name=f"{base}/ReduceSum")]
        self.block_sums[a] = out
        return out, nodes


def _matmul_nbits(name: str, a: str, b: str, scales: str, out: str, k: int, n: int, bits: int) -> onnx.NodeProto:
    return helper.make_node("MatMulNBits", [a, b, scales], [out], name=name, domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=QK, accuracy_level=4)


def import_gguf(model: onnx.ModelProto, gguf_path: Path, num_heads: int, num_kv_heads: int,
                head_name: str, keep: tuple[str, ...] = ()) -> dict[str, int]:
    """Replace every MatMul (and the embedding Gather) whose weight, or part of it, the GGUF reproduces exactly.
    MatMuls named by `keep` (the --eight-bit layers) are imported only if wholly exact."""
    blocks = read_blocks(gguf_path)
    g = _Graph(model)
    counts = {"q4_1": 0, "q8_0": 0, "partial": 0, "kept": 0}
    nodes = list(g.graph.node)
    for node in nodes:
        if node.op_type == "MatMul":
            replacement = _linear(g, node, blocks, num_heads, num_kv_heads, head_name, keep)
        elif node.op_type == "Gather" and node.input[0] == "model.embed_tokens.weight":
            replacement = _embedding(g, node, blocks)
        else:
            continue
        if replacement is None:
            counts["kept"] += node.op_type == "MatMul" and node.input[1] in g.inits
            continue
        kind, new = replacement
        counts[kind] += 1
        index = list(g.graph.node).index(node)
        g.graph.node.remove(node)
        for offset, n in enumerate(new):
            g.graph.node.insert(index + offset, n)
    used = {i for n in g.graph.node for i in n.input}
    for name in [n for n in g.inits if n not in used]:
        g.drop_initializer(name)
    return counts


def _gguf_names(node: onnx.NodeProto, head_name: str) -> list[str]:
    if node.name == head_name:
        return ["token_embd.weight"]
    match = NODE.match(node.name)
    return [f"blk.{match.group(1)}.{part}.weight" for part in LINEARS[match.group(2)]] if match else []


def _unpermuted(name: str, b: Blocks, num_heads: int, num_kv_heads: int) -> Blocks:
    if name.endswith(("attn_q.weight", "attn_k.weight")):
        return b.rows(unpermute_rows(b.q.shape[0], num_heads if "attn_q" in name else num_kv_heads))
    return b


def _round_to_nearest(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's own symmetric 4-bit blocks of a [K, N] weight: packed [N, K/32, 16], scales [N, K/32]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    packed = np.zeros((n, k // QK, QK // 2), dtype=np.uint8)
    scales = np.zeros((n, k // QK), dtype=np.float32)
    zero_points = np.zeros((n, (k // QK + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, QK, n, k, True)
    return packed, scales


def _linear(g: _Graph, node, blocks, num_heads, num_kv_heads, head_name, keep: tuple[str, ...] = ()):
    """A packed weight (q/k/v, gate/up) imports the parts its GGUF matrices reproduce exactly; a part a LoRA
    merge changed is rounded to nearest in the same node, with a zero offset."""
    w = g.weight(node.input[1])
    names = _gguf_names(node, head_name)
    if w is None or w.ndim != 2 or not names or any(name not in blocks for name in names):
        return None
    parts = [_unpermuted(name, blocks[name], num_heads, num_kv_heads) for name in names]
    k, n = w.shape
    ends = np.cumsum([p.q.shape[0] for p in parts])
    if ends[-1] != n or any(p.q.shape[1] * QK != k for p in parts) or len({p.kind for p in parts}) != 1:
        return None
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    exact = [np.array_equal(p.weight(), w[:, lo:hi].T) for p, (lo, hi) in zip(parts, spans, strict=True)]
    partial = not all(exact)
    if not any(exact) or (partial and (parts[0].kind == "Q8_0" or any(x in node.name for x in keep))):
        return None  # nothing reusable, or the caller wants this layer quantized its own way (--eight-bit)
    a, y, base = node.input[0], node.output[0], PREFIX + node.name.strip("/").replace("/", ".")
    if parts[0].kind == "Q8_0":
        q = g.add((parts[0].q.astype(np.int16) + 128).astype(np.uint8), f"{base}/q8")
        s = g.add(parts[0].d, f"{base}/scales")
        return "q8_0", [_matmul_nbits(base + "/MatMulNBits", a, q, s, y, k, n, 8)]
    packed, scales, offsets = [], [], []
    for p, ok, (lo, hi) in zip(parts, exact, spans, strict=True):
        if ok:
            packed.append(pack_nibbles(p.q))
            scales.append(p.d)
            offsets.append(p.m + 8 * p.d)
        else:
            rows, d = _round_to_nearest(w[:, lo:hi])
            packed.append(rows)
            scales.append(d)
            offsets.append(np.zeros_like(d))
    q = g.add(np.concatenate(packed), f"{base}/q4")
    s = g.add(np.concatenate(scales), f"{base}/scales")
    off = g.add(np.ascontiguousarray(np.concatenate(offsets).T), f"{base}/offsets")  # [K/32, N]
    sums, sum_nodes = g.block_sum(a, k)
    return "partial" if partial else "q4_1", [
        *sum_nodes,
        _matmul_nbits(base + "/MatMulNBits", a, q, s, f"{base}/main", k, n, 4),
        helper.make_node("MatMul", [sums, off], [f"{base}/correction"], name=base + "/Offsets"),
        helper.make_node("Add", [f"{base}/main", f"{base}/correction"], [y], name=base + "/Add")]


def _embedding(g: _Graph, node, blocks):
    b = blocks.get("token_embd.weight")
    table = g.weight(node.input[0])
    if b is None or b.kind != "Q8_0" or table is None or not np.array_equal(b.weight(), table):
        return None
    base = PREFIX + "embed_tokens"
    data = g.add((b.q.astype(np.int16) + 128).astype(np.uint8).reshape(table.shape), f"{base}/q8")
    scales = g.add(b.d, f"{base}/scales")
    return "q8_0", [helper.make_node("GatherBlockQuantized", [data, node.input[1], scales], list(node.output),
                                     name=base + "/GatherBlockQuantized", domain="com.microsoft", bits=8,
                                     block_size=QK, gather_axis=0, quantize_axis=1)]
