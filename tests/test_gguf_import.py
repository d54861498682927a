"""A packed q/k/v weight after a LoRA merge: the parts still equal to the GGUF blocks are imported exactly, the
changed part is rounded to nearest in the same node (models/gguf/gguf_import.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgellm.models.gguf.gguf_import import QK, Blocks, _Graph, _linear, unpermute_rows

K, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
NODE = "/model/layers.0/self_attn/qkv_proj/MatMul"


def q4_1(rows: int, rng) -> Blocks:
    q = rng.integers(0, 16, size=(rows, K // QK, QK)).astype(np.uint8)
    d = rng.uniform(0.01, 0.05, size=(rows, K // QK)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, size=(rows, K // QK)).astype(np.float32)
    return Blocks("Q4_1", q, d, m)


def run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]


def test_a_lora_changed_part_is_rounded_and_the_others_stay_exact():
    rng = np.random.default_rng(0)
    blocks = {"blk.0.attn_q.weight": q4_1(HEADS * HEAD_DIM, rng), "blk.0.attn_k.weight": q4_1(KV_HEADS * HEAD_DIM, rng),
              "blk.0.attn_v.weight": q4_1(KV_HEADS * HEAD_DIM, rng)}
    # what transformers holds: q/k rows un-permuted from llama.cpp's order, stacked along the outputs
    q = blocks["blk.0.attn_q.weight"].rows(unpermute_rows(HEADS * HEAD_DIM, HEADS)).weight()
    k = blocks["blk.0.attn_k.weight"].rows(unpermute_rows(KV_HEADS * HEAD_DIM, KV_HEADS)).weight()
    v = blocks["blk.0.attn_v.weight"].weight() + 0.01 * rng.standard_normal((KV_HEADS * HEAD_DIM, K))  # the LoRA
    weight = np.concatenate([q, k, v]).T.astype(np.float32)  # ONNX MatMul layout [K, N]
    n = weight.shape[1]

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name=NODE)], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    g = _Graph(model)
    kind, nodes = _linear(g, model.graph.node[0], blocks, HEADS, KV_HEADS, head_name="")
    assert kind == "partial"
    assert _linear(_Graph(model), model.graph.node[0], blocks, HEADS, KV_HEADS, "", keep=("v_proj",)) is None
    model.graph.node.remove(model.graph.node[0])
    model.graph.node.extend(nodes)

    a = rng.standard_normal((1, 3, K)).astype(np.float32)
    got, want = run(model, a)[0], (a @ weight)[0]
    exact, changed = slice(0, (HEADS + KV_HEADS) * HEAD_DIM), slice((HEADS + KV_HEADS) * HEAD_DIM, n)
    scale = np.abs(want).max()
    # q and k: the GGUF's own values, off only by onnxruntime's int8 activations (accuracy_level 4)
    assert np.abs(got[:, exact] - want[:, exact]).max() < 0.01 * scale
    # v: symmetric 4-bit rounding of weights no longer on the GGUF grid, each off by at most half a step
    step = np.abs(weight[:, changed]).max(axis=0) / 7
    bound = np.abs(a[0]).sum(axis=1, keepdims=True) * step / 2 + 0.01 * scale
    assert np.all(np.abs(got[:, changed] - want[:, changed]) <= bound)
    offsets = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name.endswith("/offsets")))
    assert np.all(offsets[:, changed] == 0) and np.all(offsets[:, exact] != 0)
