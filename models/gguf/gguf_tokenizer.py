"""A tokenizer.json (the `tokenizers` library's format) from a GGUF's tokenizer fields, without transformers.

It follows what llama.cpp does with the same fields, so that edgellm and llama.cpp tokenize alike:
- `tokenizer.ggml.model = gpt2`: byte-level BPE with the file's merges, split first by the regexes llama.cpp
  uses for its `tokenizer.ggml.pre` (llama.cpp's src/llama-vocab.cpp);
- `tokenizer.ggml.model = llama`: SentencePiece-style BPE with byte fallback, merges made from the scores,
  "▁" for spaces and a space prefix unless `tokenizer.ggml.add_space_prefix` is false;
- the BOS (and EOS) token is added to a raw prompt only when `tokenizer.ggml.add_bos_token`
  (`add_eos_token`) says so. SmolLM2's GGUF says false, and llama.cpp adds none.
"""

from __future__ import annotations

import json

from edgellm.models.errors import BuildError

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order
PRE = {
    "llama3": [LLAMA3], "llama-bpe": [LLAMA3], "llama-v3": [LLAMA3], "dbrx": [LLAMA3], "smaug-bpe": [LLAMA3],
    "qwen2": [QWEN2], "stablelm2": [QWEN2],
    "smollm": [r"\p{N}", GPT2], "starcoder": [r"\p{N}", GPT2], "refact": [r"\p{N}", GPT2],
    "command-r": [r"\p{N}", GPT2], "codeshell": [r"\p{N}", GPT2],
    "gpt-2": [GPT2], "gpt2": [GPT2], "phi-2": [GPT2], "mpt": [GPT2], "olmo": [GPT2], "jais": [GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}


def tokenizer_json(meta: dict) -> str:
    """The tokenizer.json for a GGUF's header (key -> value, as models/building/weights.py reads it)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise BuildError("SOURCE: this GGUF has no tokenizer (tokenizer.ggml.tokens); devices need one")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=meta.get("tokenizer.ggml.pre") in
                                   ("llama3", "llama-bpe", "llama-v3")))
        pre = meta.get("tokenizer.ggml.pre") or "default"
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE.get(pre, PRE["default"])]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types), byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[unk] if unk is not None else None))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise BuildError(f"SOURCE: GGUF tokenizer model '{kind}' is not supported (gpt2 and llama are)")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    template = _added_ends(meta, tokens)
    if template is not None:
        tok.post_processor = template
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, separators=(",", ":"))


def _added_ends(meta: dict, tokens: list[str]):
    """BOS / EOS around a raw prompt, exactly when the GGUF asks for them (as llama.cpp adds them)."""
    from tokenizers import processors

    ends = []
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    if add_bos and bos is not None:
        ends.append(("bos", tokens[bos], bos))
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    tail = [(tokens[eos], eos)] if add_eos and eos is not None else []
    if not ends and not tail:
        return None
    head = f"{ends[0][1]}:0 " if ends else ""
    end = f" {tail[0][0]}:0" if tail else ""
    specials = [(e[1], e[2]) for e in ends] + tail
    return processors.TemplateProcessing(single=f"{head}$A:0{end}", pair=f"{head}$A:0 $B:1{end}",
                                         special_tokens=specials)


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary: every split of a piece into two pieces, the pieces with the
    higher score merging first (what transformers does for GGUFs without merges)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, USER_DEFINED)}  # normal pieces
    found = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((scores[i], -vocab[left], -vocab[right], left, right))
    found.sort(reverse=True)
    return [(left, right) for *_, left, right in found]
