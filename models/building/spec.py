"""A decoder's shape, read from a Hugging Face config.json or a GGUF header, and its rotary tables.

Everything the fused graph (edgellm/models/building/fused_graph.py) needs to know about a model before it reads a
single weight; nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgellm.models.errors import BuildError

# model_type -> the GGUF architecture name llama.cpp writes for it
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi": "phi2", "phi3": "phi3"}
FUSED_TYPES = tuple(GGUF_ARCHS)


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

    def caches(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [positions, dim/2], for GroupQueryAttention's rotary inside."""
        inv, attention = self.inv_freq()
        angles = np.arange(positions, dtype=np.float64)[:, None] * inv.astype(np.float64)[None, :]
        return (np.cos(angles) * attention).astype(np.float32), (np.sin(angles) * attention).astype(np.float32)


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
    model_type: str  # llama | mistral | qwen2 | phi | phi3
    architecture: str  # transformers' class name, for the manifest
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    norm_eps: float
    rope: Rope
    tied: bool
    sliding_window: int | None = None

    @property
    def parallel(self) -> bool:
        """Phi-2: attention and MLP read the same LayerNorm output and add to one residual."""
        return self.model_type == "phi"

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        """From a transformers config.json (as a dict)."""
        kind = config.get("model_type")
        if kind not in FUSED_TYPES:
            raise BuildError(f"the fused graph covers {', '.join(FUSED_TYPES)}, not '{kind}'")
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
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if kind not in ("mistral", "qwen2", "phi3"):
            window = None
        return cls(
            model_type=kind, architecture=(config.get("architectures") or [kind])[0], vocab=config["vocab_size"],
            hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate=config["intermediate_size"], context=int(context),
            norm_eps=float(config.get("rms_norm_eps") or config.get("layer_norm_eps") or 1e-5),
            rope=Rope(int(head_dim * partial), float(config.get("rope_theta", 10000.0)), scaling),
            tied=bool(config.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None)

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set[str], freq_factors: np.ndarray | None = None) -> ModelSpec:
        """From a GGUF header (key -> value) and the names of its tensors."""
        arch = meta.get("general.architecture")
        kinds = {"llama": "llama", "qwen2": "qwen2", "phi2": "phi", "phi3": "phi3"}
        if arch not in kinds:
            raise BuildError(f"GGUF architecture '{arch}' has no fused graph here; supported: {', '.join(kinds)}")

        def key(name: str, default=None):
            return meta.get(f"{arch}.{name}", default)

        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length") or hidden // heads)
        kind = kinds[arch]
        vocab = int(key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []))
        scaling: dict = {}
        if key("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        rope = Rope(int(key("rope.dimension_count") or head_dim), float(key("rope.freq_base", 10000.0)), scaling,
                    tuple(float(f) for f in freq_factors) if freq_factors is not None else None)
        context = int(key("context_length", 2048))
        if kind == "phi3" and "rope_factors_short.weight" in tensor_names:
            raise BuildError("this Phi-3 GGUF uses long-context rope factors (the 128k variants); build it from "
                             "its Hugging Face folder instead")
        window = key("attention.sliding_window")
        return cls(
            model_type=kind, architecture={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                           "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM"}[kind],
            vocab=vocab, hidden=hidden, layers=int(key("block_count")), heads=heads,
            kv_heads=int(key("attention.head_count_kv") or heads), head_dim=head_dim,
            intermediate=int(key("feed_forward_length")), context=context,
            norm_eps=float(key("attention.layer_norm_rms_epsilon") or key("attention.layer_norm_epsilon") or 1e-5),
            rope=rope, tied="output.weight" not in tensor_names,
            sliding_window=int(window) if window else None)
