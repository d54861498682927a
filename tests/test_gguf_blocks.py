"""GGUF's block types decoded into MatMulNBits' form reproduce llama.cpp's de-quantization exactly, and run in
onnxruntime as the same matrix."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from onnx import TensorProto, helper, numpy_helper

from edgellm.models.gguf.blocks import decode

# bytes per block, elements per block, where its fp16 scales sit (random bytes there could be NaN)
LAYOUTS = {"Q4_0": (18, 32, [(0, 2)]), "Q4_1": (20, 32, [(0, 2), (2, 4)]), "Q5_0": (22, 32, [(0, 2)]),
           "Q5_1": (24, 32, [(0, 2), (2, 4)]), "Q8_0": (34, 32, [(0, 2)]), "Q4_K": (144, 256, [(0, 2), (2, 4)]),
           "Q5_K": (176, 256, [(0, 2), (2, 4)]), "Q6_K": (210, 256, [(208, 210)])}


def random_tensor(kind: str, rows: int, k: int, rng) -> np.ndarray:
    nbytes, per, scales = LAYOUTS[kind]
    raw = rng.integers(0, 256, size=(rows, k // per, nbytes), dtype=np.uint8)
    for lo, hi in scales:
        raw[..., lo:hi] = rng.uniform(-0.05, 0.05, size=(rows, k // per, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_every_block_type_decodes_to_llama_cpps_weights(kind):
    rng = np.random.default_rng(0)
    raw = random_tensor(kind, 6, 512, rng)
    blocks = decode(kind, raw, 6)
    reference = dequantize(raw, GGMLQuantizationType[kind]).reshape(6, 512)
    if blocks.offsets is None:
        assert np.array_equal(blocks.dequantize(), reference)  # the same integers times the same fp32 scales
    else:  # s (q - zero) + (zero s - m) against s q - m: the same numbers, summed in another order
        assert np.abs(blocks.dequantize() - reference).max() <= 2e-7 * np.abs(reference).max()
    assert blocks.q.max() < (1 << blocks.bits) and blocks.kind == kind


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K", "Q6_K", "Q5_1"])
def test_matmulnbits_computes_the_same_product(kind):
    """The graph form: MatMulNBits on q and scales, plus blocksum(A) @ offsets^T where there are offsets."""
    rng = np.random.default_rng(1)
    n, k = 24, 512
    blocks = decode(kind, random_tensor(kind, n, k, rng), n)
    inits = [numpy_helper.from_array(blocks.packed(), "b"), numpy_helper.from_array(blocks.scales, "s")]
    nodes = [helper.make_node("MatMulNBits", ["a", "b", "s"], ["main"], domain="com.microsoft", K=k, N=n,
                              bits=blocks.bits, block_size=blocks.block, accuracy_level=0)]
    out = "main"
    if blocks.offsets is not None:
        inits += [numpy_helper.from_array(np.array([0, k // blocks.block, blocks.block], np.int64), "shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                  numpy_helper.from_array(np.ascontiguousarray(blocks.offsets.T), "off")]
        nodes += [helper.make_node("Reshape", ["a", "shape"], ["r"]),
                  helper.make_node("ReduceSum", ["r", "axes"], ["sums"], keepdims=0),
                  helper.make_node("MatMul", ["sums", "off"], ["corr"]),
                  helper.make_node("Add", ["main", "corr"], ["y"])]
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    a = rng.standard_normal((3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    want = a @ blocks.dequantize().T
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()  # fp32 accumulation, no rounding of weights
