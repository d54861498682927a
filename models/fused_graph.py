"""A decoder graph built from a Llama-family model's weights with onnxruntime's fused contrib ops.

The optimum export spends ~450 small ops per token on SmolLM2 (rotary, attention, norms spelled out in
primitive ops); decode on 2 cores is limited by their count and thread syncs, not by the bytes read
(docs/measured-facts.md, "The decoder graph"). This graph is the shape onnxruntime-genai's builder makes: per layer one
SkipSimplifiedLayerNormalization, one packed QKV MatMul, one GroupQueryAttention (rotary inside), the
output MatMul, a second skip-norm, one packed gate/up MatMul, SiLU-and-multiply and the down MatMul.

Its inputs and outputs are the optimum export's (input_ids, attention_mask, past_key_values.N.key/value ->
logits, present.N.key/value) plus logit_positions, so the engine, the prefix cache and the quantizers need
no second code path. Projections keep optimum-style node names (`.../self_attn/qkv_proj/MatMul`), with fp32
weights the quantizers then replace.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellm.daemon.engine.decoder import KV_CACHE_KEY, KV_IN_PLACE
from edgellm.models.graph_edits import LOGIT_POSITIONS

FUSED_TYPES = ("llama", "mistral", "qwen2")
EMBEDDING = "model.embed_tokens.weight"
OPSET = 21


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        domain = "com.microsoft" if op_type in ("SkipSimplifiedLayerNormalization", "GroupQueryAttention") else ""
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names

    def linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ weight.T (torch Linear layout), as a MatMul with a constant [in, out] weight the quantizer finds.
        Node names follow optimum's (`model.layers.3.mlp.down_proj` -> `/model/layers.3/mlp/down_proj/MatMul`)."""
        node = "/" + re.sub(r"(layers)/(\d+)", r"\1.\2", name.replace(".", "/"))
        (y,) = self.op("MatMul", [x, self.const(f"{name}.weight", weight.T)], f"{node}/MatMul")
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(f"{name}.bias", bias)], f"{node}/Add")
        return y


def supports(model_type: str) -> bool:
    return model_type in FUSED_TYPES


def _rotary_caches(model, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] from the model's own rotary module (so rope_scaling variants hold)."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().numpy().astype(np.float64)
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


def build_fused_decoder(model, context_length: int) -> onnx.ModelProto:
    """The fused graph of a transformers Llama/Mistral/Qwen2 causal LM (fp32 weights)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    b = _Builder()

    # GroupQueryAttention's sequence bookkeeping, as onnxruntime-genai computes it from the mask.
    (mask_sum,) = b.op("ReduceSum", ["attention_mask", b.const("/seqlens/axes", np.array([1], np.int64))],
                       "/seqlens/ReduceSum", keepdims=0)
    (last,) = b.op("Sub", [mask_sum, b.const("/seqlens/one", np.array(1, np.int64))], "/seqlens/Sub")
    (seqlens_k,) = b.op("Cast", [last], "/seqlens/Cast", to=TensorProto.INT32)
    (mask_shape,) = b.op("Shape", ["attention_mask"], "/total/Shape")
    (total,) = b.op("Gather", [mask_shape, b.const("/total/index", np.array(1, np.int64))], "/total/Gather")
    (total_len,) = b.op("Cast", [total], "/total/Cast", to=TensorProto.INT32)
    cos, sin = _rotary_caches(model, context_length)
    cos_cache, sin_cache = b.const("rotary.cos_cache", cos), b.const("rotary.sin_cache", sin)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    (x,) = b.op("Gather", [b.const(EMBEDDING, state[EMBEDDING]), "input_ids"], "/model/embed_tokens/Gather")
    residual = None
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        norm = b.const(f"{p}.input_layernorm.weight", state[f"{p}.input_layernorm.weight"])
        if residual is None:
            (h,) = b.op("SimplifiedLayerNormalization", [x, norm], f"/model/layers.{i}/input_layernorm",
                        axis=-1, epsilon=eps)
            residual = x
        else:
            h, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [x, residual, norm],
                                     f"/model/layers.{i}/input_layernorm", outputs=4, epsilon=eps)
        a = f"{p}.self_attn"
        qkv_w = np.concatenate([state[f"{a}.{n}_proj.weight"] for n in "qkv"])
        qkv_b = (np.concatenate([state[f"{a}.{n}_proj.bias"] for n in "qkv"])
                 if f"{a}.q_proj.bias" in state else None)
        qkv = b.linear(h, qkv_w, f"{a}.qkv_proj", qkv_b)
        attn, present_k, present_v = b.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             cos_cache, sin_cache],
            f"/model/layers.{i}/self_attn/GroupQueryAttention",
            outputs=[f"/model/layers.{i}/self_attn/output", f"present.{i}.key", f"present.{i}.value"],
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
            local_window_size=int(window) if window else -1)
        x = b.linear(attn, state[f"{a}.o_proj.weight"], f"{a}.o_proj")
        norm = b.const(f"{p}.post_attention_layernorm.weight", state[f"{p}.post_attention_layernorm.weight"])
        h, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [x, residual, norm],
                                 f"/model/layers.{i}/post_attention_layernorm", outputs=4, epsilon=eps)
        m = f"{p}.mlp"
        gate_up = b.linear(h, np.concatenate([state[f"{m}.gate_proj.weight"], state[f"{m}.up_proj.weight"]]),
                           f"{m}.gate_up_proj")
        gate, up = b.op("Split", [gate_up], f"/model/layers.{i}/mlp/Split", outputs=2, axis=-1, num_outputs=2)
        (sig,) = b.op("Sigmoid", [gate], f"/model/layers.{i}/mlp/Sigmoid")
        (silu,) = b.op("Mul", [gate, sig], f"/model/layers.{i}/mlp/SiLU")
        (act,) = b.op("Mul", [silu, up], f"/model/layers.{i}/mlp/Mul")
        x = b.linear(act, state[f"{m}.down_proj.weight"], f"{m}.down_proj")
    norm = b.const("model.norm.weight", state["model.norm.weight"])
    h, _, _, _ = b.op("SkipSimplifiedLayerNormalization", [x, residual, norm], "/model/norm", outputs=4, epsilon=eps)
    (picked,) = b.op("Gather", [h, LOGIT_POSITIONS], "/edgellm/logit_positions/Gather", axis=1)
    head = state.get("lm_head.weight", state[EMBEDDING])  # tied models share the embedding table
    b.op("MatMul", [picked, b.const("lm_head.weight_stored", head.T)], "/lm_head/MatMul", outputs=["logits"])

    f = TensorProto.FLOAT
    cache_shape = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, ["num_logits"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "num_logits", head.shape[0]])]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f, cache_shape))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", f, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
    graph = helper.make_graph(b.nodes, "edgellm_fused_decoder", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgellm")
    helper.set_model_props(model, {KV_CACHE_KEY: KV_IN_PLACE})
    return model
