"""The decoder graph edgellm runs: onnxruntime's fused contrib ops, built straight from a model's weights.

The optimum export spends ~450 small ops per token on SmolLM2 (rotary, attention and norms spelled out in
primitive ops); decode on 2 cores is limited by their count and thread syncs, not by the bytes read
(docs/measured-facts.md, "The decoder graph"). This graph is the shape onnxruntime-genai's builder makes:
- Llama, Mistral, Qwen2, Phi-3: per layer one (Skip)SimplifiedLayerNormalization, the q/k/v projection, one
  GroupQueryAttention (rotary inside), the output projection, a second skip-norm, the gate/up projection,
  SiLU-and-multiply, the down projection;
- Phi-2: one (Skip)LayerNormalization feeding attention and the MLP side by side (partial rotary, biases
  everywhere, FastGelu for gelu_new), both added to the residual.

Weights come one tensor at a time from a Weights source (models/building/weights.py) and go straight to the
external data file (models/building/onnx_writer.py). A GGUF's blocks become MatMulNBits nodes as they are
(models/gguf/blocks.py);
float weights are quantized here with onnxruntime's own block quantizer. Inputs and outputs are the optimum
export's (input_ids, attention_mask, past_key_values.N.key/value -> logits, present.N.key/value) plus
logit_positions, and GroupQueryAttention writes its keys into the buffers it reads (edgellm.kv_cache =
in_place), which the engine binds once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.daemon.engine.adapters import ADAPTER_SLOTS_KEY
from edgellm.daemon.engine.decoder import KV_CACHE_KEY, KV_IN_PLACE
from edgellm.models.building.graph_edits import LOGIT_POSITIONS
from edgellm.models.building.onnx_writer import ExternalData
from edgellm.models.building.spec import FUSED_TYPES, ModelSpec
from edgellm.models.building.weights import LowRank, Remerged, Tensor
from edgellm.models.errors import BuildError
from edgellm.models.gguf.blocks import Blocks, stack

# model metadata: {node: [rows, ...]} for weights that stack several matrices' rows (q/k/v, gate/up), so a
# bundle cuts chunks where each matrix starts and an update that changes q and v leaves k's chunks alone
ROW_SLICES_KEY = "edgellm.row_slices"
# node -> first rows of its re-merged matrices; their factors are in REMERGE_FILE (daemon/update/remerge.py)
REMERGE_KEY = "edgellm.remerge"
REMERGE_FILE = "remerge.safetensors"
REMERGED = "LoRA re-merged"
OPSET = 21
MS = "com.microsoft"
ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits (docs/measured-facts.md, "Quantization")


def supports(model_type: str) -> bool:
    return model_type in FUSED_TYPES


@dataclass
class Plan:
    """How float weights are stored: fp32, or MatMulNBits blocks of `bits` (the head at `head_bits`, names in
    `eight_bit` at 8). Quantized GGUF blocks are kept as they are unless `requantize`."""

    bits: int | None  # None: fp32
    block_size: int = 32
    symmetric: bool = True
    head_bits: int = 8
    eight_bit: tuple[str, ...] = ()
    requantize: bool = False
    adapter_slots: tuple[str, ...] = ()  # projections (q_proj, v_proj, ...) that take a LoRA adapter at run time


@dataclass
class Report:
    """What the build did with each weight, for the manifest."""

    imported: Counter = field(default_factory=Counter)  # GGUF type -> weights taken exactly
    quantized: int = 0  # float weights quantized here (round to nearest)
    rounded: list[str] = field(default_factory=list)  # GGUF weights with no exact form, rounded again
    requantized: int = 0  # GGUF weights de-quantized and quantized again (--no-gguf-import)
    low_rank: int = 0  # tuned weights kept as their base's blocks plus a float low-rank change (--keep-base)
    remerged: dict[str, list[int]] = field(default_factory=dict)  # node -> first rows of its re-merged matrices
    factors: dict[str, np.ndarray] = field(default_factory=dict)  # their LoRA factors, for REMERGE_FILE


def quantize_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocks:
    """A float [N, K] matrix as blocks, rounded to nearest by onnxruntime's own quantizer (C++)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    if k % block:
        raise BuildError(f"a weight with {k} inputs does not split into blocks of {block}")
    per = 8 // bits
    packed = np.zeros((n, k // block, block // per), dtype=np.uint8)
    scales = np.zeros((n, k // block), dtype=np.float32)
    zeros = np.zeros((n, -(-(k // block) // per)), dtype=np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w.T, dtype=np.float32), scales, zeros, block, n, k, symmetric)
    q = packed if bits == 8 else np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k // block, block)
    offsets = None
    if not symmetric:  # w = s (q - zp) = s (q - zero) + s (zero - zp)
        zp = zeros if bits == 8 else np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(n, -1)[:, : k // block]
        offsets = scales * ((1 << (bits - 1)) - zp.astype(np.float32))
    return Blocks(bits, block, q, scales, offsets, "round to nearest")


class _Graph:
    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.block_sums: dict[tuple[str, int], str] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, array))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names

    def block_sum(self, x: str, k: int, block: int) -> str:
        """x summed over each block of K (one per input and block size, shared by the projections reading it)."""
        key = (x, block)
        if key not in self.block_sums:
            base = f"/edgellm/blocksum/{len(self.block_sums)}"
            shape = self.const(f"{base}/shape", np.array([0, 0, k // block, block], np.int64))
            axes = self.const(f"{base}/axes", np.array([-1], np.int64))
            (r,) = self.op("Reshape", [x, shape], f"{base}/Reshape")
            (self.block_sums[key],) = self.op("ReduceSum", [r, axes], f"{base}/ReduceSum", keepdims=0)
        return self.block_sums[key]


class _Builder:
    def __init__(self, spec: ModelSpec, weights, plan: Plan, data: ExternalData):
        self.spec, self.weights, self.plan = spec, weights, plan
        self.g = _Graph(data)
        self.report = Report()
        self.shared: dict[int, tuple[Blocks, dict[str, str]]] = {}  # id -> (blocks, initializer names)
        self.row_slices: dict[str, list[int]] = {}  # node -> rows of each matrix stacked in its weights
        self.adapter_slots: dict[str, dict] = {}  # node -> its run-time adapter inputs (daemon/engine/adapters.py)

    # -- weights --------------------------------------------------------------------------------------
    def matrix(self, name: str) -> Tensor:
        value = self.weights.get(name)
        if value is None:
            raise BuildError(f"SOURCE: the model has no tensor {name}")
        return value

    def vector(self, name: str) -> np.ndarray | None:
        value = self.weights.get(name)
        return None if value is None else np.asarray(value, dtype=np.float32).reshape(-1)

    def _as_stored(self, value: Tensor | Remerged, name: str, head: bool = False) -> Tensor:
        """A weight in the form the plan stores it: blocks (imported, re-merged or quantized here) or float."""
        plan = self.plan
        if isinstance(value, Remerged):
            wide = head or any(part in name for part in plan.eight_bit)
            repeatable = plan.bits == 4 and plan.symmetric and value.base.block == plan.block_size  # remerge.py's form
            if repeatable and not plan.requantize and not wide:
                return value.blocks()
            value = value.merged
        if isinstance(value, Blocks):
            if plan.bits is None:
                return value.dequantize()
            if not plan.requantize:
                self.report.imported[value.kind] += 1
                return value
            self.report.requantized += 1
            value = value.dequantize()
        if plan.bits is None:
            return value
        bits = plan.bits
        if head or any(part in name for part in plan.eight_bit):
            bits = max(bits, plan.head_bits if head else 8)
        self.report.quantized += 1
        return quantize_blocks(value, bits, plan.block_size, plan.symmetric)

    # -- projections ----------------------------------------------------------------------------------
    def linear(self, x: str, names: list[str], node: str, bias: np.ndarray | None = None,
               head: bool = False) -> str:
        """x @ W^T (+ bias) for the rows of the named matrices stacked: one node where they share a form."""
        values = [self.matrix(n) for n in names]
        changes = [v if isinstance(v, LowRank) else None for v in values]
        parts = [self._as_stored(v.base if isinstance(v, LowRank) else v, n, head)
                 for v, n in zip(values, names, strict=True)]
        groups: list[list[int]] = []
        for i, p in enumerate(parts):  # neighbours that can stack share a node (Q4_K_M mixes widths within q/k/v)
            if groups and _stackable(parts[groups[-1][-1]], p):
                groups[-1].append(i)
            else:
                groups.append([i])
        outs, start = [], 0
        for i, group in enumerate(groups):
            rows = sum(_rows(parts[j]) for j in group)
            part_bias = None if bias is None else bias[start:start + rows]
            start += rows
            suffix = "" if len(groups) == 1 else f"/part{i}"
            self._note_remerged(node + suffix, [(parts[j], values[j]) for j in group])
            outs.append(self._emit(x, [parts[j] for j in group], node + suffix, part_bias))
        if len(outs) == 1:
            y = outs[0]
        else:
            (y,) = self.g.op("Concat", outs, f"{node}/Concat", axis=-1)
        if any(c is not None for c in changes):
            y = self._add_change(x, y, changes, [_rows(p) for p in parts], node)
        modules = [(n.removesuffix(".weight"), _rows(p)) for n, p in zip(names, parts, strict=True)]
        if not head and any(m.rsplit(".", 1)[-1] in self.plan.adapter_slots for m, _ in modules):
            y = self._adapter_slot(x, y, modules, parts[0].shape[1], node)
        return y

    def _note_remerged(self, node: str, stacked: list[tuple[Tensor, Tensor | LowRank | Remerged]]) -> None:
        """Record where a node's re-merged matrices start and their factors, for `bundle build`'s recipe."""
        from edgellm.daemon.update.remerge import factor_name

        row = 0
        for stored, value in stacked:
            if isinstance(value, Remerged) and isinstance(stored, Blocks) and stored.kind == REMERGED:
                self.report.remerged.setdefault(node, []).append(row)
                self.report.factors[factor_name(node, row, "up")] = value.up
                self.report.factors[factor_name(node, row, "down")] = value.down
            row += _rows(stored)

    def _adapter_slot(self, x: str, y: str, modules: list[tuple[str, int]], k: int, node: str) -> str:
        """y + (x down) up with down [batch, K, rank] and up [batch, rank, N] fed at run time: each row of a
        batch its own LoRA adapter (zeros for none), the base's weights untouched."""
        down, up = f"lora:{node}:down", f"lora:{node}:up"
        self.adapter_slots[node] = {"in": k, "down": down, "up": up, "modules": [list(m) for m in modules]}
        (t,) = self.g.op("MatMul", [x, down], f"{node}/AdapterDown")
        (d,) = self.g.op("MatMul", [t, up], f"{node}/AdapterUp")
        (y,) = self.g.op("Add", [y, d], f"{node}/AdapterAdd")
        return y

    def _add_change(self, x: str, y: str, changes: list[LowRank | None], rows: list[int], node: str) -> str:
        """y + (x down^T) up^T: the tuned change of each stacked matrix that has one, in two thin float MatMuls
        (the ups sit block-diagonally, so an unchanged matrix, e.g. k of a q/v LoRA, gets zero)."""
        g = self.g
        down = np.concatenate([c.down for c in changes if c is not None])
        up = np.zeros((sum(rows), len(down)), np.float32)
        row = col = 0
        for change, n in zip(changes, rows, strict=True):
            if change is not None:
                rank = len(change.down)
                up[row:row + n, col:col + rank] = change.up
                col += rank
                self.report.low_rank += 1
            row += n
        (t,) = g.op("MatMul", [x, self._half(f"{node}/lora_down", down.T)], f"{node}/LoraDown")
        (d,) = g.op("MatMul", [t, self._half(f"{node}/lora_up", up.T)], f"{node}/LoraUp")
        (y,) = g.op("Add", [y, d], f"{node}/LoraAdd")
        return y

    def _half(self, name: str, array: np.ndarray) -> str:
        """A LoRA factor stored in fp16 and read in fp32: an adapter update ships half the bytes (onnxruntime
        folds the Cast when it loads the model, so decoding does not pay for it)."""
        (out,) = self.g.op("Cast", [self.g.const(name, np.ascontiguousarray(array, dtype=np.float16))],
                           f"{name}/Cast", to=TensorProto.FLOAT)
        return out

    def _emit(self, x: str, group: list[Tensor], node: str, bias: np.ndarray | None) -> str:
        g = self.g
        if not isinstance(group[0], Blocks):
            w = np.concatenate(group) if len(group) > 1 else group[0]
            (y,) = g.op("MatMul", [x, g.const(f"{node}/weight", np.ascontiguousarray(w.T))], f"{node}/MatMul")
            if bias is not None:
                (y,) = g.op("Add", [y, g.const(f"{node}/bias", bias)], f"{node}/Add")
            return y
        blocks = stack(group) if len(group) > 1 else group[0]
        if len(group) > 1:
            self.row_slices[node] = [_rows(p) for p in group]
        names = self._store_blocks(blocks, node)
        n, k = blocks.shape
        inputs = [x, names["q"], names["scales"]]
        if bias is not None:
            inputs += ["", "", g.const(f"{node}/bias", bias)]
        main = f"{node}/main" if blocks.offsets is not None else f"{node}/output"
        g.op("MatMulNBits", inputs, f"{node}/MatMulNBits", outputs=[main], domain=MS, K=k, N=n, bits=blocks.bits,
             block_size=blocks.block, accuracy_level=ACCURACY_LEVEL)
        if blocks.offsets is None:
            return main
        sums = g.block_sum(x, k, blocks.block)
        (corr,) = g.op("MatMul", [sums, names["offsets_t"]], f"{node}/Offsets")
        (y,) = g.op("Add", [main, corr], f"{node}/Add")
        return y

    def _store_blocks(self, blocks: Blocks, node: str, share: bool = False) -> dict[str, str]:
        """Initializers of a block matrix. One stored with `share` (a tied embedding) is written once and its
        names handed to the next node that uses the same Blocks (the head); the others are let go once written,
        so a build holds one layer, not the model."""
        entry = self.shared.get(id(blocks))
        if entry is not None and entry[0] is blocks:  # (the Blocks is kept alive here, so its id is not reused)
            return entry[1]
        g = self.g
        names = {"q": g.const(f"{node}/q{blocks.bits}", blocks.packed()),
                 "scales": g.const(f"{node}/scales", blocks.scales)}
        if blocks.offsets is not None:
            names["offsets_t"] = g.const(f"{node}/offsets", np.ascontiguousarray(blocks.offsets.T))  # [K/b, N]
        if share:
            self.shared[id(blocks)] = (blocks, names)
        return names

    # -- the embedding --------------------------------------------------------------------------------
    def embedding(self, table: Tensor) -> str:
        """Rows of the embedding table for input_ids. A block table is de-quantized row by row, only the rows
        looked up, from the same initializers a tied head reads."""
        g = self.g
        if not isinstance(table, Blocks):
            (x,) = g.op("Gather", [g.const("model.embed_tokens.weight", table), "input_ids"],
                        "/model/embed_tokens/Gather")
            return x
        names = self._store_blocks(table, "/model/embed_tokens", share=True)
        p = "/model/embed_tokens"
        (q,) = g.op("Gather", [names["q"], "input_ids"], f"{p}/GatherQ", axis=0)  # [b, s, K/blk, packed]
        if table.bits == 4:
            (lo,) = g.op("BitwiseAnd", [q, g.const(f"{p}/low", np.array(15, np.uint8))], f"{p}/Low")
            (hi,) = g.op("BitShift", [q, g.const(f"{p}/four", np.array(4, np.uint8))], f"{p}/High",
                         direction="RIGHT")
            axis = g.const(f"{p}/last", np.array([-1], np.int64))
            (lo,) = g.op("Unsqueeze", [lo, axis], f"{p}/LowAxis")
            (hi,) = g.op("Unsqueeze", [hi, axis], f"{p}/HighAxis")
            (pairs,) = g.op("Concat", [lo, hi], f"{p}/Interleave", axis=-1)
            shape = g.const(f"{p}/block_shape", np.array([0, 0, 0, table.block], np.int64))
            (q,) = g.op("Reshape", [pairs, shape], f"{p}/Unpack")
        (qf,) = g.op("Cast", [q], f"{p}/Cast", to=TensorProto.FLOAT)
        (centred,) = g.op("Sub", [qf, g.const(f"{p}/zero", np.array(table.zero, np.float32))], f"{p}/Centre")
        (s,) = g.op("Gather", [names["scales"], "input_ids"], f"{p}/GatherScales", axis=0)
        unsq = g.const(f"{p}/unsqueeze", np.array([-1], np.int64))
        (s,) = g.op("Unsqueeze", [s, unsq], f"{p}/ScalesAxis")
        (w,) = g.op("Mul", [centred, s], f"{p}/Scale")
        if table.offsets is not None:
            (o,) = g.op("Gather", [names["offsets_t"], "input_ids"], f"{p}/GatherOffsets", axis=1)  # [K/b, b, s]
            (o,) = g.op("Transpose", [o], f"{p}/OffsetsOrder", perm=[1, 2, 0])
            (o,) = g.op("Unsqueeze", [o, unsq], f"{p}/OffsetsAxis")
            (w,) = g.op("Add", [w, o], f"{p}/Offset")
        flat = g.const(f"{p}/flat", np.array([0, 0, -1], np.int64))
        (x,) = g.op("Reshape", [w, flat], f"{p}/Rows")
        return x


def _rows(t: Tensor) -> int:
    return t.shape[0]


def _stackable(a: Tensor, b: Tensor) -> bool:
    if isinstance(a, Blocks) and isinstance(b, Blocks):
        return (a.bits, a.block, a.q.shape[1:]) == (b.bits, b.block, b.q.shape[1:])
    return not isinstance(a, Blocks) and not isinstance(b, Blocks)


def build_fused_decoder(spec: ModelSpec, weights, plan: Plan, data: ExternalData) -> tuple[onnx.ModelProto, Report]:
    """The fused graph of `spec`, its weights written to `data` as it goes."""
    b = _Builder(spec, weights, plan, data)
    g = b.g
    heads, kv_heads, head_dim = spec.heads, spec.kv_heads, spec.head_dim
    eps = spec.norm_eps

    # GroupQueryAttention's sequence bookkeeping, as onnxruntime-genai computes it from the mask.
    (mask_sum,) = g.op("ReduceSum", ["attention_mask", g.const("/seqlens/axes", np.array([1], np.int64))],
                       "/seqlens/ReduceSum", keepdims=0)
    (last,) = g.op("Sub", [mask_sum, g.const("/seqlens/one", np.array(1, np.int64))], "/seqlens/Sub")
    (seqlens_k,) = g.op("Cast", [last], "/seqlens/Cast", to=TensorProto.INT32)
    (mask_shape,) = g.op("Shape", ["attention_mask"], "/total/Shape")
    (total,) = g.op("Gather", [mask_shape, g.const("/total/index", np.array(1, np.int64))], "/total/Gather")
    (total_len,) = g.op("Cast", [total], "/total/Cast", to=TensorProto.INT32)
    cos, sin = spec.rope.caches(spec.context)
    cos_cache, sin_cache = g.const("rotary.cos_cache", cos), g.const("rotary.sin_cache", sin)
    window = spec.sliding_window or -1

    embed = b._as_stored(b.matrix("model.embed_tokens.weight"), "model.embed_tokens")
    x = b.embedding(embed)
    phi = spec.parallel
    residual = None
    for i in range(spec.layers):
        p, node = f"model.layers.{i}", f"/model/layers.{i}"
        norm = g.const(f"{p}.input_layernorm.weight", b.vector(f"{p}.input_layernorm.weight"))
        norm_inputs = [norm] + ([g.const(f"{p}.input_layernorm.bias", b.vector(f"{p}.input_layernorm.bias"))]
                                if phi else [])
        kind = "LayerNormalization" if phi else "SimplifiedLayerNormalization"
        if residual is None:
            (h,) = g.op(kind, [x, *norm_inputs], f"{node}/input_layernorm", axis=-1, epsilon=eps)
            residual = x
        else:
            skip = "SkipLayerNormalization" if phi else "SkipSimplifiedLayerNormalization"
            h, _, _, residual = g.op(skip, [x, residual, *norm_inputs], f"{node}/input_layernorm", outputs=4,
                                     domain=MS, epsilon=eps)
        a = f"{p}.self_attn"
        if b.weights.has(f"{a}.qkv_proj.weight"):
            qkv_names = [f"{a}.qkv_proj.weight"]
            bias = b.vector(f"{a}.qkv_proj.bias")
        else:
            qkv_names = [f"{a}.{n}_proj.weight" for n in "qkv"]
            biases = [b.vector(f"{a}.{n}_proj.bias") for n in "qkv"]
            bias = np.concatenate(biases) if all(v is not None for v in biases) else None
        qkv = b.linear(h, qkv_names, f"{node}/self_attn/qkv_proj", bias)
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             cos_cache, sin_cache],
            f"{node}/self_attn/GroupQueryAttention",
            outputs=[f"{node}/self_attn/output", f"present.{i}.key", f"present.{i}.value"], domain=MS,
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, local_window_size=window)
        if phi:
            o = b.linear(attn, [f"{a}.dense.weight"], f"{node}/self_attn/dense", b.vector(f"{a}.dense.bias"))
            m = f"{p}.mlp"
            up = b.linear(h, [f"{m}.fc1.weight"], f"{node}/mlp/fc1")
            (act,) = g.op("FastGelu", [up, g.const(f"{m}.fc1.bias", b.vector(f"{m}.fc1.bias"))],
                          f"{node}/mlp/FastGelu", domain=MS)
            down = b.linear(act, [f"{m}.fc2.weight"], f"{node}/mlp/fc2", b.vector(f"{m}.fc2.bias"))
            (x,) = g.op("Add", [o, down], f"{node}/ParallelAdd")
            continue
        o = b.linear(attn, [f"{a}.o_proj.weight"], f"{node}/self_attn/o_proj")
        norm = g.const(f"{p}.post_attention_layernorm.weight", b.vector(f"{p}.post_attention_layernorm.weight"))
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, norm],
                                 f"{node}/post_attention_layernorm", outputs=4, domain=MS, epsilon=eps)
        m = f"{p}.mlp"
        packed = b.weights.has(f"{m}.gate_up_proj.weight")
        gate_up = b.linear(h, [f"{m}.gate_up_proj.weight"] if packed else [f"{m}.gate_proj.weight",
                                                                         f"{m}.up_proj.weight"],
                           f"{node}/mlp/gate_up_proj")
        gate, up = g.op("Split", [gate_up], f"{node}/mlp/Split", outputs=2, axis=-1, num_outputs=2)
        (sig,) = g.op("Sigmoid", [gate], f"{node}/mlp/Sigmoid")
        (silu,) = g.op("Mul", [gate, sig], f"{node}/mlp/SiLU")
        (act,) = g.op("Mul", [silu, up], f"{node}/mlp/Mul")
        x = b.linear(act, [f"{m}.down_proj.weight"], f"{node}/mlp/down_proj")

    final = "model.final_layernorm" if phi else "model.norm"
    norm_inputs = [g.const(f"{final}.weight", b.vector(f"{final}.weight"))]
    if phi:
        norm_inputs.append(g.const(f"{final}.bias", b.vector(f"{final}.bias")))
    skip = "SkipLayerNormalization" if phi else "SkipSimplifiedLayerNormalization"
    h, _, _, _ = g.op(skip, [x, residual, *norm_inputs], "/model/norm", outputs=4, domain=MS, epsilon=eps)
    (picked,) = g.op("Gather", [h, LOGIT_POSITIONS], "/edgellm/logit_positions/Gather", axis=1)
    head_bias = b.vector("lm_head.bias")
    if b.weights.has("lm_head.weight"):
        logits = b.linear(picked, ["lm_head.weight"], "/lm_head", head_bias, head=True)
    elif isinstance(embed, Blocks) and embed.kind != "round to nearest":  # tied to GGUF blocks: share them
        logits = b._emit(picked, [embed], "/lm_head", head_bias)
    else:  # tied to a float table: the head gets its own, wider blocks (it reads every token's state)
        logits = b.linear(picked, ["model.embed_tokens.weight"], "/lm_head", head_bias, head=True)
    (logits,) = g.op("Identity", [logits], "/logits", outputs=["logits"])

    f = TensorProto.FLOAT
    cache_shape = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, ["num_logits"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "num_logits", spec.vocab])]
    for i in range(spec.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f, cache_shape))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", f, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
    for node, slot in b.adapter_slots.items():
        rows = sum(n for _, n in slot["modules"])
        inputs += [helper.make_tensor_value_info(slot["down"], f, ["batch_size", slot["in"], f"rank:{node}"]),
                   helper.make_tensor_value_info(slot["up"], f, ["batch_size", f"rank:{node}", rows])]
    graph = helper.make_graph(g.nodes, "edgellm_fused_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgellm")
    props = {KV_CACHE_KEY: KV_IN_PLACE, ROW_SLICES_KEY: json.dumps(b.row_slices)}
    if b.adapter_slots:
        props[ADAPTER_SLOTS_KEY] = json.dumps(b.adapter_slots)
    if b.report.remerged:
        props[REMERGE_KEY] = json.dumps(b.report.remerged)
    helper.set_model_props(model, props)
    b.report.rounded = list(getattr(weights, "rounded", []))
    return model, b.report
