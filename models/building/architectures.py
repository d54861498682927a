"""The decoder families the fused graph builds, each described by data: adding one is an entry here and a parity
test (tests/test_architectures.py), not a code path in models/building/fused_graph.py.

A description says how a layer is wired: which norm (RMS or LayerNorm) sits where, whether q and k are normed
per head, whether the embedding is scaled, the MLP's activation, whether attention and MLP run side by side,
and how GGUF names its tensors. Numbers that vary within a family (rotary bases, windows, head sizes) are read
per model into a ModelSpec (models/building/spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Norm(Enum):
    RMS = "rms"  # SimplifiedLayerNormalization: x / rms(x) * w
    LAYER = "layer"  # LayerNormalization: (x - mean) / std * w + b


class Activation(Enum):
    SILU = "silu"
    GELU_TANH = "gelu_tanh"  # transformers' gelu_pytorch_tanh and gelu_new


class Window(Enum):
    """Which layers attend through a sliding window."""

    NONE = "none"
    ALL = "all"  # config.sliding_window on every layer (Mistral; Qwen2 and Phi-3 when use_sliding_window)
    PATTERN = "pattern"  # local layers with their own rotary base, every n-th layer global (Gemma 3)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    hf_class: str  # transformers' class, for the manifest
    gguf_arch: str  # general.architecture as llama.cpp's converter writes it
    norm: Norm = Norm.RMS
    # transformers' names of the per-layer norms: before attention, after it (on its output, before the residual
    # add), before the MLP, after it. Llama has two; Gemma 3 has four; Phi-2 one (attention and MLP share it).
    input_norm: str = "input_layernorm"
    attention_out_norm: str | None = None
    mlp_in_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    final_norm: str = "model.norm"
    # Gemma stores RMSNorm weights as w - 1 (it computes x * (1 + w)); llama.cpp's converter adds the 1 back.
    hf_norm_offset: float = 0.0
    qk_norm: bool = False  # an RMSNorm over each head of q and k before the rotary (Qwen 3, Gemma 3)
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma); a tied head reads the unscaled table
    activation: Activation = Activation.SILU
    gated: bool = True  # act(gate) * up; else act(fc1 + bias) (Phi-2)
    parallel: bool = False  # attention and MLP read the same norm's output and add to one residual (Phi-2)
    attention_out: str = "self_attn.o_proj"
    mlp_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # stacked into one projection
    mlp_down: str = "mlp.down_proj"
    window: Window = Window.NONE
    window_pattern: int = 0  # Window.PATTERN: layer i is global when (i + 1) % window_pattern == 0
    local_rope_base: float = 10000.0  # Window.PATTERN: the local layers' rotary base when the file does not say
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaves q/k rotary halves (Llama only)
    gguf_layer: dict[str, str] = field(default_factory=dict)  # transformers' per-layer names -> GGUF's


_LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_QK_NORM_NAMES = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in [
    Architecture("llama", "LlamaForCausalLM", "llama", gguf_permuted_qk=True, gguf_layer=_LLAMA_NAMES),
    Architecture("mistral", "MistralForCausalLM", "llama", window=Window.ALL, gguf_permuted_qk=True,
                 gguf_layer=_LLAMA_NAMES),
    Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", window=Window.ALL, gguf_layer=_LLAMA_NAMES),
    Architecture("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True, window=Window.ALL,
                 gguf_layer=_LLAMA_NAMES | _QK_NORM_NAMES),
    Architecture("phi", "PhiForCausalLM", "phi2", norm=Norm.LAYER, mlp_in_norm=None,
                 final_norm="model.final_layernorm", activation=Activation.GELU_TANH, gated=False, parallel=True,
                 attention_out="self_attn.dense", mlp_up=("mlp.fc1",), mlp_down="mlp.fc2",
                 gguf_layer={"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                             "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv",
                             "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
                             "input_layernorm": "attn_norm"}),
    Architecture("phi3", "Phi3ForCausalLM", "phi3", window=Window.ALL, mlp_up=("mlp.gate_up_proj",),
                 gguf_layer={"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}),
    Architecture("gemma3_text", "Gemma3ForCausalLM", "gemma3", attention_out_norm="post_attention_layernorm",
                 mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
                 hf_norm_offset=1.0, qk_norm=True, embed_scale=True, activation=Activation.GELU_TANH,
                 window=Window.PATTERN, window_pattern=6,
                 gguf_layer={**_LLAMA_NAMES, **_QK_NORM_NAMES, "post_attention_layernorm": "post_attention_norm",
                             "pre_feedforward_layernorm": "ffn_norm",
                             "post_feedforward_layernorm": "post_ffw_norm"}),
]}
BY_GGUF = {a.gguf_arch: a for a in ARCHITECTURES.values() if a.model_type != "mistral"}  # llama.cpp: mistral is llama


def supported() -> str:
    """The families, as a refusal names them."""
    return ", ".join(sorted({a.gguf_arch for a in ARCHITECTURES.values()}))
