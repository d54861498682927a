"""Edits to the exported ONNX graph that quantizers and the engine need, done before quantization."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

LOGIT_POSITIONS = "logit_positions"


def untie_output_head(model: onnx.ModelProto) -> int:
    """Replace `Transpose(initializer)` feeding a MatMul by a stored transposed weight.

    optimum ties the output head to the embedding through a runtime Transpose; the quantizers then see
    no constant weight and silently leave the head in fp32 (113 MB read per token on SmolLM2).
    Returns the number of weights materialized.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done = 0
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[tr.input[0]])
        transposed = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        name = tr.output[0] + "_stored"
        graph.initializer.append(numpy_helper.from_array(transposed, name))
        node.input[1] = name
        if all(c is node for c in consumers.get(tr.output[0], [])):
            graph.node.remove(tr)
        done += 1
    return done


def _output_head(graph: onnx.GraphProto) -> onnx.NodeProto:
    producers = {o: n for n in graph.node for o in n.output}
    node = producers["logits"]
    while node.op_type not in ("MatMul", "MatMulNBits"):  # e.g. Phi's bias Add after the head MatMul
        node = next(producers[i] for i in node.input if i in producers)
    return node


def add_logit_positions(model: onnx.ModelProto) -> None:
    """Add an input selecting which positions get logits.

    Prefill then computes the vocabulary projection for one position instead of all of them
    (on SmolLM2 a 200-token prompt would otherwise spend 5.6 GFLOP on logits nobody reads),
    while perplexity evaluation still asks for every position.
    """
    graph = model.graph
    head = _output_head(graph)
    gathered = head.input[0] + "_at_logit_positions"
    gather = helper.make_node("Gather", [head.input[0], LOGIT_POSITIONS], [gathered], axis=1,
                              name="/edgellm/logit_positions/Gather")
    head.input[0] = gathered
    graph.node.insert(list(graph.node).index(head), gather)
    graph.input.append(helper.make_tensor_value_info(LOGIT_POSITIONS, onnx.TensorProto.INT64, ["num_logits"]))
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "num_logits"


def output_head_name(model: onnx.ModelProto) -> str:
    return _output_head(model.graph).name


def output_head_is_float(model: onnx.ModelProto) -> bool:
    return _output_head(model.graph).op_type == "MatMul"


def check_decoder_io(model: onnx.ModelProto, model_type: str) -> None:
    """The engine feeds input_ids, attention_mask and per-layer past keys/values [batch, heads, past, dim]."""
    from edgellm.models.errors import BuildError

    inputs = {i.name: i for i in model.graph.input}
    past = [i for n, i in inputs.items() if n.startswith("past_key_values.")]
    outputs = {o.name for o in model.graph.output}
    ok = ("input_ids" in inputs and "attention_mask" in inputs and "logits" in outputs and past
          and all(len(i.type.tensor_type.shape.dim) == 4 for i in past)
          and all(o.replace("past_key_values.", "present.") in outputs for o in (i.name for i in past)))
    if not ok:
        raise BuildError(f"architecture '{model_type}' exports with a KV cache layout the engine does not run "
                         f"(inputs: {', '.join(list(inputs)[:6])}...)")
