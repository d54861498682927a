"""The decoder graph edgellm runs: onnxruntime's fused contrib ops, built straight from a model's weights.

The optimum export spends ~450 small ops per token on SmolLM2 (rotary, attention and norms spelled out in
primitive ops); decode on 2 cores is limited by their count and thread syncs, not by the bytes read
(docs/measured-facts.md, "The decoder graph"). This graph is the shape onnxruntime-genai's builder makes, wired
as the model's Architecture says (models/building/architectures.py): per layer a (Skip)SimplifiedLayerNormalization
or (Skip)LayerNormalization, the q/k/v projection (QK-norm per head where described), one GroupQueryAttention
(rotary inside, the layer's own window and rotary base), the output projection (and its own norm: Gemma 3),
a second skip-norm, the gate/up projection, SiLU or GELU-tanh and multiply, the down projection (and its norm);
or, for Phi-2, one norm feeding attention and the MLP side by side, both added to the residual.

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
from edgellm.models.building.architectures import Activation, Norm
from edgellm.models.building.graph_edits import LOGIT_POSITIONS
from edgellm.models.building.onnx_writer import ExternalData
from edgellm.models.building.spec import FUSED_TYPES, ModelSpec, check_rotary
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
    kv_cache: str = "float32"  # the keys and values' type: float16 halves the cache (docs/measured-facts.md)


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
    kv_cache: str | None = None  # the type keys and values are kept in


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
        self.report = Report(kv_cache=plan.kv_cache)
        self._halves: dict[str, str] = {}
        self.shared: dict[int, tuple[Blocks, dict[str, str]]] = {}  # id -> (blocks, initializer names)
        self.row_slices: dict[str, list[int]] = {}  # node -> rows of each matrix stacked in its weights
        self.adapter_slots: dict[str, dict] = {}  # node -> its run-time adapter inputs (daemon/engine/adapters.py)
        self.caches: dict[str, list[str]] = {}  # rotary tables, one pair per rotary base

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

    # -- the layer's parts, as the architecture describes them ----------------------------------------
    def norm(self, x: str, residual: str | None, name: str, node: str) -> tuple[str, str | None]:
        """The named norm of x, or of x + residual (a Skip norm, which also hands back the sum as the next
        residual). A first norm with residual None starts the residual at x."""
        g, spec = self.g, self.spec
        layer = spec.arch.norm is Norm.LAYER
        inputs = [g.const(f"{name}.weight", self.vector(f"{name}.weight"))]
        if layer:
            inputs.append(g.const(f"{name}.bias", self.vector(f"{name}.bias")))
        if residual is None:
            kind = "LayerNormalization" if layer else "SimplifiedLayerNormalization"
            (h,) = g.op(kind, [x, *inputs], node, axis=-1, epsilon=spec.norm_eps)
            return h, x
        kind = "SkipLayerNormalization" if layer else "SkipSimplifiedLayerNormalization"
        h, _, _, total = g.op(kind, [x, residual, *inputs], node, outputs=4, domain=MS, epsilon=spec.norm_eps)
        return h, total

    def attention(self, h: str, i: int, sequence: tuple[str, str]) -> str:
        """q/k/v in one projection, GroupQueryAttention with the layer's rotary and window, the output projection."""
        g, spec, arch = self.g, self.spec, self.spec.arch
        a, node = f"model.layers.{i}.self_attn", f"/model/layers.{i}/self_attn"
        if self.weights.has(f"{a}.qkv_proj.weight"):
            names, bias = [f"{a}.qkv_proj.weight"], self.vector(f"{a}.qkv_proj.bias")
        else:
            names = [f"{a}.{n}_proj.weight" for n in "qkv"]
            biases = [self.vector(f"{a}.{n}_proj.bias") for n in "qkv"]
            bias = np.concatenate(biases) if all(v is not None for v in biases) else None
        qkv = self.linear(h, names, f"{node}/qkv_proj", bias)
        inputs = [qkv, "", ""]
        if arch.qk_norm:  # per head, before the rotary: q, k and v go to the attention apart
            q_rows, kv_rows = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            sizes = g.const(f"{node}/split_sizes", np.array([q_rows, kv_rows, kv_rows], np.int64))
            q, k, v = g.op("Split", [qkv, sizes], f"{node}/SplitQKV", outputs=3, axis=-1)
            inputs = [self._head_norm(q, f"{a}.q_norm", f"{node}/q_norm"),
                      self._head_norm(k, f"{a}.k_norm", f"{node}/k_norm"), v]
        window = spec.window(i)
        cos, sin = self._rotary_caches(i)
        output = f"{node}/output"
        if self.plan.kv_cache == "float16":  # GroupQueryAttention runs in the cache's type: cast around it
            inputs = [self._to_float16(x) if x else x for x in inputs]
            cos, sin, output = self._to_float16(cos), self._to_float16(sin), f"{node}/output_fp16"
        scale = {} if spec.attention_scale is None else {"scale": spec.attention_scale}
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *sequence, cos, sin],
            f"{node}/GroupQueryAttention", outputs=[output, f"present.{i}.key", f"present.{i}.value"],
            domain=MS, num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1, rotary_interleaved=0,
            local_window_size=window if window else -1, **scale)
        if output != f"{node}/output":
            (attn,) = g.op("Cast", [attn], f"{node}/output_fp32", to=TensorProto.FLOAT)
        out = f"model.layers.{i}.{arch.attention_out}"
        return self.linear(attn, [f"{out}.weight"], f"/model/layers.{i}/{arch.attention_out.replace('.', '/')}",
                           self.vector(f"{out}.bias"))

    def _to_float16(self, x: str) -> str:
        """`x` cast to float16, once per tensor (the rotary tables are shared by layers)."""
        if x not in self._halves:
            (self._halves[x],) = self.g.op("Cast", [x], f"{x}/fp16", to=TensorProto.FLOAT16)
        return self._halves[x]

    def _head_norm(self, x: str, name: str, node: str) -> str:
        """RMSNorm over each head of a [batch, seq, heads * head_dim] projection."""
        g = self.g
        per_head = g.const(f"{node}/heads", np.array([0, 0, -1, self.spec.head_dim], np.int64))
        flat = g.const(f"{node}/flat", np.array([0, 0, -1], np.int64))
        (r,) = g.op("Reshape", [x, per_head], f"{node}/Heads")
        (n,) = g.op("SimplifiedLayerNormalization", [r, g.const(f"{name}.weight", self.vector(f"{name}.weight"))],
                    node, axis=-1, epsilon=self.spec.norm_eps)
        (y,) = g.op("Reshape", [n, flat], f"{node}/Flat")
        return y

    def _rotary_caches(self, i: int) -> tuple[str, str]:
        """cos and sin tables [context, rotated / 2] of layer i's rotary (local layers may have their own base).
        The file holds the inverse frequencies only; onnxruntime folds the tables when it loads the model
        (Gemma 3's four tables at 32k positions would be 67 MB on disk)."""
        rope = self.spec.rotary(i)
        name = "rotary" if rope is self.spec.rope else "rotary.local"
        if name not in self.caches:
            g = self.g
            inv, attention = rope.inv_freq()
            (positions,) = g.op("Range", [g.const(f"{name}/start", np.array(0, np.float32)),
                                          g.const(f"{name}/limit", np.array(self.spec.context, np.float32)),
                                          g.const(f"{name}/delta", np.array(1, np.float32))], f"{name}/Range")
            (column,) = g.op("Unsqueeze", [positions, g.const(f"{name}/axis", np.array([1], np.int64))],
                             f"{name}/Positions")
            (angles,) = g.op("Mul", [column, g.const(f"{name}.inv_freq", inv[None, :])], f"{name}/Angles")
            factor = g.const(f"{name}/attention_factor", np.array(attention, np.float32)) if attention != 1 else None
            tables = []
            for kind in ("Cos", "Sin"):
                (t,) = g.op(kind, [angles], f"{name}/{kind}")
                if factor is not None:
                    (t,) = g.op("Mul", [t, factor], f"{name}/{kind}Factor")
                tables.append(t)
            self.caches[name] = tables
        cos, sin = self.caches[name]
        return cos, sin

    def mlp(self, h: str, i: int) -> str:
        """act(gate) * up then down (gated), or act(fc1 + bias) then fc2 (Phi-2)."""
        g, arch = self.g, self.spec.arch
        p, node = f"model.layers.{i}", f"/model/layers.{i}/mlp"
        names = [f"{p}.{n}.weight" for n in arch.mlp_up]
        if arch.gated:
            gate_up = self.linear(h, names, f"{node}/gate_up_proj")
            gate, up = g.op("Split", [gate_up], f"{node}/Split", outputs=2, axis=-1, num_outputs=2)
            act = self._activation(gate, None, node)
            (act,) = g.op("Mul", [act, up], f"{node}/Mul")
        else:
            up = self.linear(h, names, f"{node}/{arch.mlp_up[0].split('.')[-1]}")
            act = self._activation(up, f"{p}.{arch.mlp_up[0]}.bias", node)
        down = f"{p}.{arch.mlp_down}"
        return self.linear(act, [f"{down}.weight"], f"{node}/{arch.mlp_down.split('.')[-1]}",
                           self.vector(f"{down}.bias"))

    def _activation(self, x: str, bias: str | None, node: str) -> str:
        """The MLP's activation of x (+ the named bias, which FastGelu adds itself)."""
        g = self.g
        value = None if bias is None else self.vector(bias)
        if self.spec.arch.activation is Activation.GELU_TANH:  # FastGelu is the tanh approximation
            inputs = [x] + ([g.const(bias, value)] if value is not None else [])
            (y,) = g.op("FastGelu", inputs, f"{node}/FastGelu", domain=MS)
            return y
        (sig,) = g.op("Sigmoid", [x], f"{node}/Sigmoid")
        (y,) = g.op("Mul", [x, sig], f"{node}/SiLU")
        return y

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
    """The fused graph of `spec`, wired as its architecture's description says, its weights written to `data`."""
    b = _Builder(spec, weights, plan, data)
    g = b.g
    arch = spec.arch
    check_rotary(spec)

    # GroupQueryAttention's sequence bookkeeping, as onnxruntime-genai computes it from the mask.
    (mask_sum,) = g.op("ReduceSum", ["attention_mask", g.const("/seqlens/axes", np.array([1], np.int64))],
                       "/seqlens/ReduceSum", keepdims=0)
    (last,) = g.op("Sub", [mask_sum, g.const("/seqlens/one", np.array(1, np.int64))], "/seqlens/Sub")
    (seqlens_k,) = g.op("Cast", [last], "/seqlens/Cast", to=TensorProto.INT32)
    (mask_shape,) = g.op("Shape", ["attention_mask"], "/total/Shape")
    (total,) = g.op("Gather", [mask_shape, g.const("/total/index", np.array(1, np.int64))], "/total/Gather")
    (total_len,) = g.op("Cast", [total], "/total/Cast", to=TensorProto.INT32)
    sequence = (seqlens_k, total_len)

    embed = b._as_stored(b.matrix("model.embed_tokens.weight"), "model.embed_tokens")
    x = b.embedding(embed)
    if arch.embed_scale:  # the table stays unscaled for the tied head
        scale = g.const("/model/embed_tokens/embed_scale", np.array(np.sqrt(spec.hidden), np.float32))
        (x,) = g.op("Mul", [x, scale], "/model/embed_tokens/EmbedScale")
    residual = None
    for i in range(spec.layers):
        p, node = f"model.layers.{i}", f"/model/layers.{i}"
        h, residual = b.norm(x, residual, f"{p}.{arch.input_norm}", f"{node}/input_layernorm")
        attn = b.attention(h, i, sequence)
        if arch.parallel:
            (x,) = g.op("Add", [attn, b.mlp(h, i)], f"{node}/ParallelAdd")
            continue
        if arch.attention_out_norm:
            attn, _ = b.norm(attn, None, f"{p}.{arch.attention_out_norm}", f"{node}/{arch.attention_out_norm}")
        h, residual = b.norm(attn, residual, f"{p}.{arch.mlp_in_norm}", f"{node}/{arch.mlp_in_norm}")
        x = b.mlp(h, i)
        if arch.mlp_out_norm:
            x, _ = b.norm(x, None, f"{p}.{arch.mlp_out_norm}", f"{node}/{arch.mlp_out_norm}")
    h, _ = b.norm(x, residual, arch.final_norm, "/model/norm")
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
    kv = TensorProto.FLOAT16 if plan.kv_cache == "float16" else f
    kv_heads, head_dim = spec.kv_heads, spec.head_dim
    cache_shape = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, ["num_logits"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "num_logits", spec.vocab])]
    for i in range(spec.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv, cache_shape))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", kv, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
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
