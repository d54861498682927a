"""Weight-only quantization with onnxruntime's MatMulNBits quantizer (int8, int4), never quantize_dynamic.

quantize_dynamic costs SmolLM2 perplexity 16.5 -> 30.5; weight-only 8-bit keeps it at 16.7
(docs/measured-facts.md, "Quantization").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from edgellm.models.building.graph_edits import output_head_is_float, output_head_name

# int8 compute on CPU; the quantizer's default level ran 3.5x slower than fp32 (docs/measured-facts.md).
ACCURACY_LEVEL_INT8 = 4


@dataclass(frozen=True)
class QuantSpec:
    scheme: str  # fp32 | int8 | int4
    block_size: int = 32
    symmetric: bool = True
    head_bits: int = 8  # the output head reads every token's hidden state; 8 bits keep it near-lossless
    eight_bit: tuple[str, ...] = ()  # MatMuls whose node name contains one of these stay at 8 bits (e.g. q_proj)

    @property
    def bits(self) -> int | None:
        return {"fp32": None, "int8": 8, "int4": 4}[self.scheme]

    @property
    def embedding_bits(self) -> int | None:
        """GatherBlockQuantized takes only 4 bits: int4 uses it, int8 keeps the embedding fp32 (near-lossless)."""
        return 4 if self.scheme == "int4" else None


def _quantizer(model: onnx.ModelProto, bits: int, spec: QuantSpec, ops: tuple[str, ...], exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    return MatMulNBitsQuantizer(
        model, bits=bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
        accuracy_level=ACCURACY_LEVEL_INT8, nodes_to_exclude=exclude, op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )


def _run(model: onnx.ModelProto, bits: int, spec: QuantSpec, ops: tuple[str, ...], exclude: list[str]):
    q = _quantizer(model, bits, spec, ops, exclude)
    q.process()
    return q.model.model


def quantize(model: onnx.ModelProto, spec: QuantSpec) -> onnx.ModelProto:
    """Quantize the head, the embedding and then every other constant-weight MatMul, each at its own width.
    Nodes a GGUF import already made exact (models/gguf/gguf_import.py) are left as they are."""
    if spec.bits is None:
        return model
    from edgellm.models.gguf.gguf_import import PREFIX

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    fixed = [n.name for n in model.graph.node if n.name.startswith(PREFIX)]
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather"]
    wide = {m for m in matmuls if spec.bits < 8 and any(p in m for p in spec.eight_bit)}
    if output_head_is_float(model):
        wide.add(output_head_name(model))
    if wide:
        model = _run(model, max(spec.bits, spec.head_bits), spec, ("MatMul",), [m for m in matmuls if m not in wide])
    embedding = [n.name for n in model.graph.node if n.op_type == "Gather" and "embed_tokens" in n.name]
    if spec.embedding_bits and embedding:
        model = _run(model, spec.embedding_bits, spec, ("Gather",), [g for g in gathers if g not in embedding])
    return _run(model, spec.bits, spec, ("MatMul",), fixed)
