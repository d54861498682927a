"""A decoder's shape, read from a Hugging Face config.json or a GGUF header, and its rotary tables.

Everything the fused graph (edgellm/models/building/fused_graph.py) needs to know about a model before it reads a
single weight; nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgellm.models.building.architectures import ARCHITECTURES, BY_GGUF, Architecture, Window, supported
from edgellm.models.errors import BuildError

# model_type -> the GGUF architecture name llama.cpp writes for it
GGUF_ARCHS = {kind: a.gguf_arch for kind, a in ARCHITECTURES.items()}
FUSED_TYPES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class Rope:
    dim: int  # rotated dimensions of a head (Phi-2 rotates the first 32 of 80)
    theta: float = 10000.0
    scaling: dict = field(default_factory=dict)  # transformers' rope_scaling: rope_type and its parameters
    freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs (Llama 3.1+): divide inv_freq by these

    def inv_freq(self) -> tuple[np.ndarray, float]:
        """Inverse frequencies [dim/2] and the factor applied to cos and sin, as transformers computes them
        (float32) for its rope types: default, linear, llama3, longrope."""
        inv = (1.0 / (np.float32(self.theta) ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim)))
        inv = inv.astype(np.float32)
        kind = self.scaling.get("rope_type") or self.scaling.get("type") or "default"
        attention = 1.0
        if self.freq_factors is not None:
            inv = inv / np.asarray(self.freq_factors, dtype=np.float32)
        elif kind == "linear":
            inv = inv / np.float32(self.scaling["factor"])
        elif kind == "llama3":
            inv = _llama3(inv, self.scaling)
        elif kind in ("longrope", "su"):
            # The short factors: a device serves contexts up to the original length (see ModelSpec.context).
            inv = (1.0 / (np.asarray(self.scaling["short_factor"], dtype=np.float32)
                          * np.float32(self.theta) ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim)))
            attention = self.scaling.get("attention_factor") or 1.0
        elif kind != "default":
            raise BuildError(f"rope scaling '{kind}' is not supported by the fused graph; use --no-fuse")
        return inv.astype(np.float32), float(attention)


def _llama3(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # a key of ARCHITECTURES
    architecture: str  # transformers' class name, for the manifest
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # may differ from hidden / heads (Gemma 3, Qwen 3)
    intermediate: int
    context: int
    norm_eps: float
    rope: Rope  # the global layers' rotary
    tied: bool
    sliding_window: int | None = None
    local_layers: tuple[int, ...] = ()  # layers attending through the window (all of them for Window.ALL)
    local_rope: Rope | None = None  # their rotary, where it differs from the global layers'
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.local_layers else None

    def rotary(self, layer: int) -> Rope:
        return self.local_rope if self.local_rope is not None and layer in self.local_layers else self.rope

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        """From a transformers config.json (as a dict)."""
        kind = config.get("model_type")
        if kind == "gemma3" and isinstance(config.get("text_config"), dict):
            raise BuildError("this is Gemma 3 with its vision tower (Gemma3ForConditionalGeneration); the fused "
                             "graph builds the text model: give a Gemma3ForCausalLM folder or the GGUF")
        if kind not in ARCHITECTURES:
            raise BuildError(f"the fused graph covers {', '.join(FUSED_TYPES)}, not '{kind}'")
        arch = ARCHITECTURES[kind]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        scaling = dict(config.get("rope_scaling") or {})
        partial = config.get("partial_rotary_factor", 1.0)
        context = config.get("max_position_embeddings") or config.get("n_positions") or 2048
        if (scaling.get("rope_type") or scaling.get("type")) in ("longrope", "su"):
            original = config.get("original_max_position_embeddings") or context
            factor = context / original
            if scaling.get("attention_factor") is None:
                scaling["attention_factor"] = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1
            context = original  # served with the short factors, up to the length the model was trained on
        layers = config["num_hidden_layers"]
        window, local, local_rope = config.get("sliding_window"), (), None
        if arch.window is Window.ALL and window and config.get("use_sliding_window", True):
            local = tuple(range(layers))
        elif arch.window is Window.PATTERN and window:
            types = config.get("layer_types") or [
                "full_attention" if (i + 1) % arch.window_pattern == 0 else "sliding_attention" for i in range(layers)]
            local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
            local_rope = Rope(int(head_dim * partial), float(config.get("rope_local_base_freq", arch.local_rope_base)))
        scalar = config.get("query_pre_attn_scalar")
        return cls(
            model_type=kind, architecture=(config.get("architectures") or [arch.hf_class])[0],
            vocab=config["vocab_size"], hidden=config["hidden_size"], layers=layers, heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate=config["intermediate_size"], context=int(context),
            norm_eps=float(config.get("rms_norm_eps") or config.get("layer_norm_eps") or 1e-5),
            rope=Rope(int(head_dim * partial), float(config.get("rope_theta", 10000.0)), scaling),
            tied=bool(config.get("tie_word_embeddings", False)),
            sliding_window=int(window) if local else None, local_layers=local, local_rope=local_rope,
            attention_scale=float(scalar) ** -0.5 if scalar else None)

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set[str], freq_factors: np.ndarray | None = None) -> ModelSpec:
        """From a GGUF header (key -> value) and the names of its tensors."""
        name = meta.get("general.architecture")
        if name not in BY_GGUF:
            raise BuildError(f"GGUF architecture '{name}' has no fused graph here; supported: {supported()}")
        arch = BY_GGUF[name]

        def key(k: str, default=None):
            return meta.get(f"{name}.{k}", default)

        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length") or hidden // heads)
        vocab = int(key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []))
        scaling: dict = {}
        if key("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        rope = Rope(int(key("rope.dimension_count") or head_dim), float(key("rope.freq_base", 10000.0)), scaling,
                    tuple(float(f) for f in freq_factors) if freq_factors is not None else None)
        context = int(key("context_length", 2048))
        if arch.model_type == "phi3" and "rope_factors_short.weight" in tensor_names:
            raise BuildError("this Phi-3 GGUF uses long-context rope factors (the 128k variants); build it from "
                             "its Hugging Face folder instead")
        layers = int(key("block_count"))
        window, local, local_rope = key("attention.sliding_window"), (), None
        if window and arch.window is not Window.PATTERN:  # as the file says (a Mistral GGUF is a "llama")
            local = tuple(range(layers))
        elif window and arch.window is Window.PATTERN:  # llama.cpp: every 6th layer global, local base 10,000
            pattern = key("attention.sliding_window_pattern", arch.window_pattern)
            local = (tuple(i for i, swa in enumerate(pattern) if swa) if isinstance(pattern, list)
                     else tuple(i for i in range(layers) if (i + 1) % int(pattern)))
            local_rope = Rope(rope.dim, float(key("rope.local.freq_base", arch.local_rope_base)))
        return cls(
            model_type=arch.model_type, architecture=arch.hf_class, vocab=vocab, hidden=hidden, layers=layers,
            heads=heads, kv_heads=int(key("attention.head_count_kv") or heads), head_dim=head_dim,
            intermediate=int(key("feed_forward_length")), context=context,
            norm_eps=float(key("attention.layer_norm_rms_epsilon") or key("attention.layer_norm_epsilon") or 1e-5),
            rope=rope, tied="output.weight" not in tensor_names,
            sliding_window=int(window) if local else None, local_layers=local, local_rope=local_rope)


def check_rotary(spec: ModelSpec) -> None:
    """GroupQueryAttention rotates inside only when half the rotated dimensions are a multiple of 8 and at most
    half a head (onnxruntime: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"): refuse
    other shapes here, naming the limit, rather than build a model that fails when it first runs."""
    for rope in {id(r): r for r in (spec.rope, spec.local_rope) if r is not None}.values():
        if rope.dim % 16 or rope.dim > spec.head_dim:
            raise BuildError(f"this model rotates {rope.dim} of each head's {spec.head_dim} dimensions; the fused "
                             "graph's attention (onnxruntime GroupQueryAttention) needs a multiple of 16, at most "
                             "the head size")
