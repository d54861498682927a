"""Tiny random-weight models of each supported architecture, built from their transformers configs.

No hub: the tokenizer is a byte-level BPE trained here on a few sentences, saved with a ChatML template.
"""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The invoice total is 1,234.56 EUR, due in thirty days.",
    "La factura vence el 12 de marzo de 2026.",
    "Le contrat de service commence le 3 mars 2026.",
    "A sales contract transfers ownership of goods; a service contract buys work.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def tiny_config(arch: str, vocab_size: int, eos: int, pad: int):
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=512,
                  eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    if arch == "phi":  # Phi-2's shape: head_dim 80, partial rotary 0.4, biases, parallel attention + MLP
        return PhiConfig(hidden_size=160, intermediate_size=320, num_attention_heads=2,
                         partial_rotary_factor=0.4, **common)
    gqa = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":  # SmolLM2 / Llama 3 style: tied embeddings, grouped-query attention, Llama 3 rope scaling
        llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
        return LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=llama3, **gqa, **common)
    if arch == "mistral":  # a window shorter than the tests' prompts, so the sliding window is exercised
        return MistralConfig(sliding_window=4, **gqa, **common)
    if arch == "qwen2":
        return Qwen2Config(**gqa, **common)
    if arch == "phi3":  # its default pad_token_id (32000) is outside a small vocabulary: set it
        return Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                          **common)
    if arch == "qwen3":  # QK-norm, a head size apart from hidden / heads, tied head (the small sizes)
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, tie_word_embeddings=True, **common)
    if arch == "gemma3_text":  # Gemma 3 270M's wiring: four norms a layer, QK-norm, scaled embedding, GELU-tanh,
        # local layers (window shorter than the prompts) with their own rotary base, then a global one
        # (six layers: five local, one global, the pattern llama.cpp assumes for a gemma3 GGUF)
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=32, query_pre_attn_scalar=32, sliding_window=4, rope_theta=1000000.0,
                                rope_local_base_freq=10000.0, tie_word_embeddings=True,
                                **{**common, "num_hidden_layers": 6})
    raise ValueError(arch)


ARCHITECTURES = ["phi", "llama", "mistral", "qwen2", "phi3", "qwen3", "gemma3_text"]


def make_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
