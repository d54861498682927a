"""GGUF files written here the way llama.cpp's convert_hf_to_gguf.py writes them, from tiny random models.

No hub and no llama.cpp: weights are quantized with the gguf package (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or, for
the types it cannot make (the K-quants, Q3_K), filled with random blocks of that type. Beside each GGUF goes
the Hugging Face folder of the same, de-quantized weights: PyTorch's answer for what the GGUF holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgellm.models.building.spec import GGUF_ARCHS

# K-quant super-blocks are 256 wide: their tests use a model whose rows are multiples of 256.
K_TYPES = {"Q4_K": (144, [(0, 2), (2, 4)]), "Q5_K": (176, [(0, 2), (2, 4)]), "Q6_K": (210, [(208, 210)]),
           "Q3_K": (110, [(108, 110)])}


def _hf_to_gguf(name: str, model_type: str) -> str | None:
    from edgellm.models.building.architectures import ARCHITECTURES
    from edgellm.models.building.weights import _GLOBAL, _HF_NAME

    match = _HF_NAME.match(name)
    if match:
        layer, part, kind = match.groups()
        return f"blk.{layer}.{ARCHITECTURES[model_type].gguf_layer[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    return f"{_GLOBAL[stem]}.{kind}" if stem in _GLOBAL else None


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave the rotary halves of each head's rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(kind: str, rows: int, k: int, rng) -> np.ndarray:
    nbytes, scales = K_TYPES[kind]
    raw = rng.integers(0, 256, size=(rows, k // 256, nbytes), dtype=np.uint8)
    for lo, hi in scales:
        raw[..., lo:hi] = rng.uniform(0.001, 0.004, size=(rows, k // 256, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(hf: Path, out: Path, types: dict[str, str], default: str = "Q8_0", seed: int = 0,
               add_bos: bool = False) -> tuple[Path, Path]:
    """A GGUF of the HF model in `hf` (matrices in `default`, or the type `types` gives the first matching
    substring of their GGUF name), and the HF folder `out`.hf holding exactly the weights the GGUF does."""
    import gguf
    import torch
    from gguf.quants import dequantize, quantize
    from transformers import AutoModelForCausalLM

    config = json.loads((hf / "config.json").read_text())
    kind = config["model_type"]
    arch = GGUF_ARCHS[kind]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    if kind == "phi":
        writer.add_layer_norm_eps(config["layer_norm_eps"])
    else:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("sliding_window") and kind in ("mistral", "phi3", "gemma3_text"):
        writer.add_sliding_window(config["sliding_window"])
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_tokenizer(writer, hf, add_bos)
    if kind == "llama" and (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        from edgellm.models.building.spec import ModelSpec

        spec = ModelSpec.from_config(config)
        plain = ModelSpec.from_config({**config, "rope_scaling": None}).rope.inv_freq()[0]
        writer.add_tensor("rope_freqs.weight", (plain / spec.rope.inv_freq()[0]).astype(np.float32))
    tied = config.get("tie_word_embeddings", False)
    for name, value in state.items():
        if tied and name == "lm_head.weight":
            continue
        target = _hf_to_gguf(name, kind)
        if target is None:
            continue
        if value.ndim == 2 and kind in ("llama", "mistral") and target.endswith(("attn_q.weight", "attn_k.weight")):
            value = _permute(value, heads if "attn_q" in target else kv_heads)
        if value.ndim != 2:
            if kind == "gemma3_text" and name.endswith("norm.weight"):  # the converter stores Gemma's 1 + w
                value = value + 1
            writer.add_tensor(target, value.astype(np.float32))
            continue
        qtype = next((t for part, t in types.items() if part in target), default)
        if qtype in K_TYPES:
            raw = _random_blocks(qtype, value.shape[0], value.shape[1], rng)
        elif qtype == "F32":
            raw = value.astype(np.float32)
        else:
            raw = quantize(value.astype(np.float32), gguf.GGMLQuantizationType[qtype])
        ggml_type = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(target, raw, raw_dtype=ggml_type if qtype != "F32" else None)
        held = dequantize(raw, ggml_type).reshape(value.shape) if qtype != "F32" else value
        if kind in ("llama", "mistral") and target.endswith(("attn_q.weight", "attn_k.weight")):
            h = heads if "attn_q" in target else kv_heads
            held = held.reshape(h, held.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(held.shape)
        state[name] = held
        if tied and name == "model.embed_tokens.weight":
            state["lm_head.weight"] = held
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = Path(str(out) + ".hf")
    shutil.rmtree(reference, ignore_errors=True)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    model.save_pretrained(reference)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (hf / f).exists():
            shutil.copy(hf / f, reference / f)
    return out, reference


def _add_tokenizer(writer, hf: Path, add_bos: bool) -> None:
    """The tiny byte-level BPE tokenizer as llama.cpp's converter stores a gpt2-type vocabulary."""
    spec = json.loads((hf / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for token, i in {**vocab, **added}.items():
        tokens[i] = token
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    writer.add_eos_token_id(added[tok_config["eos_token"]])
    writer.add_bos_token_id(added["<|endoftext|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_add_bos_token(add_bos)
    template = hf / "chat_template.jinja"
    writer.add_chat_template(template.read_text() if template.exists() else tok_config["chat_template"])
