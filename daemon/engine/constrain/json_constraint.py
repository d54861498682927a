"""JSON-schema constrained decoding with llguidance, failing closed.

A schema llguidance cannot compile is a bad request, never unconstrained text; a finished output is
parsed and validated again with jsonschema before anyone sees it as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from edgellm.daemon.engine.constrain.copy_grammar import copied_values, copy_grammar, has_copied_fields, is_copied
from edgellm.daemon.engine.constrain.json_close import shortest_completion
from edgellm.daemon.engine.constrain.schema_refs import ref_loop
from edgellm.daemon.errors import EdgeError

# Compact separators: more tokens are forced, so more are fast-forwarded (~35% of JSON tokens:
# docs/measured-facts.md, "Constrained JSON").
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_tokenizer(tokenizer_json: str, eos_ids: list[int], vocab_size: int) -> llguidance.LLTokenizer:
    """Build llguidance's tokenizer, repairing the decoder of GGUF-converted tokenizer.json files.

    Their decoder Sequence[ByteFallback, Fuse, Replace, ByteLevel] makes llguidance see literal 'Ġ'/'Ċ',
    and every mask involving spaces is then silently wrong.
    """
    spec = json.loads(tokenizer_json)
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    byte_level = next((d for d in parts if d.get("type") == "ByteLevel"), None)
    if byte_level is not None:
        spec["decoder"] = byte_level
    lltok = llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=eos_ids)
    space = lltok.tokenize_str(" a")
    if b" " not in lltok.decode_bytes(space):
        raise EdgeError("model_unavailable", "this model's tokenizer cannot drive constrained decoding: "
                        "its decoder does not map spaces back to bytes")
    return lltok


# What a JSON number means in practice, where the schema does not say: at most 6 fractional digits and 15
# before the point. Unbounded, a small model can write 20.00000000000000015315... until max_tokens.
CLOSE_HORIZON = 96  # tokens left at which budget-aware closing starts to look (it costs a parse per token)
CLOSE_MARGIN = 4  # force the completion this many tokens early: one sampled token can lengthen it by several
NUMBER_STEP = 1e-6
NUMBER_LIMIT = 1e15
_DATA_KEYS = {"const", "enum", "default", "examples", "x-guidance"}


def bounded_numbers(schema: Any) -> Any:
    """A copy of `schema` whose number and integer schemas carry multipleOf and minimum/maximum where they
    had none (llguidance enforces both in the grammar). The output is still validated against the original."""
    if isinstance(schema, list):
        return [bounded_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else bounded_numbers(v) for k, v in schema.items()}
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "number" in types or "integer" in types:
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = NUMBER_STEP
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_LIMIT
    return out


def check_schema(schema: dict[str, Any]) -> None:
    """The checks a schema passes before it is compiled: it is a JSON Schema, and no $ref of it loops."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise EdgeError("bad_request", f"json_schema: not a valid JSON Schema: {e.message}",
                        param="json_schema") from None
    if (loop := ref_loop(schema)) is not None:
        raise EdgeError("bad_request", f"json_schema: cannot be enforced: the $ref {loop!r} only refers to itself, "
                        "so no JSON value satisfies it", param="json_schema")


def compile_json_schema(schema: dict[str, Any], lltok: llguidance.LLTokenizer, document: str = "") -> str:
    """llguidance's grammar for `schema`; fields marked x-edgellm-copy take their values from `document`;
    numbers are bounded (bounded_numbers)."""
    check_schema(schema)
    bounded = bounded_numbers(schema)
    if bounded != schema:
        try:
            return _compile(bounded, lltok, document)
        except EdgeError:  # bounds llguidance cannot turn into a regex (e.g. a schema's own maximum of 1e20)
            pass
    return _compile(schema, lltok, document)


def _compile(schema: dict[str, Any], lltok: llguidance.LLTokenizer, document: str) -> str:
    try:
        if has_copied_fields(schema):
            grammar = llguidance.LLMatcher.grammar_from_lark(copy_grammar(schema, document, JSON_OPTIONS))
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise EdgeError("bad_request", f"json_schema: {e}", param="json_schema") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        raise EdgeError("bad_request", f"json_schema: cannot be enforced: {messages[0]}", param="json_schema")
    return grammar


LIMIT_WORDS = ("too many", "limit", "too deep", "too large")  # llguidance's parser limits, as its errors say


class JsonConstraint:
    """Masks logits to tokens the schema allows, and tells which tokens the schema forces next."""

    def __init__(self, lltok: llguidance.LLTokenizer, schema: dict[str, Any], grammar: str, document: str = ""):
        self.lltok = lltok
        self.schema = schema
        self.document = document
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        self._bitmask = allocate_token_bitmask(1, lltok.vocab_size)
        fill_next_token_bitmask(self.matcher, self._bitmask)  # a grammar that allows no first token fails here
        if self.matcher.is_error():  # it compiled, but no output can start: the schema is at fault
            raise EdgeError("bad_request", f"json_schema: cannot be enforced: {_problem(self.matcher)}",
                            param="json_schema")

    def _check(self) -> None:
        if self.matcher.is_error():
            problem = _problem(self.matcher)
            if any(word in problem.lower() for word in LIMIT_WORDS):  # the schema's fault, not ours
                raise EdgeError("bad_request", f"json_schema: cannot be enforced: the output outgrew the grammar "
                                f"engine's limits ({problem}); make deeply recursive parts of the schema bounded",
                                param="json_schema")
            raise EdgeError("internal", f"constrained decoding failed: {problem}")

    def mask(self, logits: np.ndarray) -> None:
        """Set disallowed logits (a 1-D row) to -inf in place."""
        fill_next_token_bitmask(self.matcher, self._bitmask)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        logits[: len(allowed)][allowed == 0] = -np.inf
        logits[len(allowed):] = -np.inf

    def accept(self, token: int) -> list[int]:
        """Consume a sampled token; return the tokens the grammar forces after it (already consumed)."""
        self.matcher.consume_token(token)
        self._check()
        if self.matcher.is_stopped():
            return []
        forced = self.matcher.compute_ff_tokens()
        if forced:
            self.matcher.consume_tokens(forced)
            self._check()
        return forced

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far is a whole document (it may still go on, as a number may)."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()

    def closing(self, generated: list[int], left: int) -> list[int] | None:
        """Budget-aware closing: when the shortest valid completion of the output so far needs all but
        CLOSE_MARGIN of the `left` tokens, that completion's tokens, checked by the grammar and consumed;
        otherwise None (and nothing changes). See edgellm/daemon/engine/constrain/json_close.py."""
        if left > CLOSE_HORIZON:
            return None
        tail = shortest_completion(self.lltok.decode_str(generated), self.schema, JSON_OPTIONS["item_separator"],
                                   JSON_OPTIONS["key_separator"])
        if not tail:
            return None
        tokens = self.lltok.tokenize_str(tail)
        if not left - CLOSE_MARGIN <= len(tokens) <= left:
            return None
        trial = self.matcher.deep_copy()
        if trial.try_consume_tokens(tokens) != len(tokens) or not (trial.is_accepting() or trial.is_stopped()):
            return None
        self.matcher.consume_tokens(tokens)
        return tokens

    def parse(self, text: str) -> Any:
        """The final check: the text must parse and validate, or the request fails."""
        try:
            value = json.loads(text)
            jsonschema.validate(value, self.schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            raise EdgeError("internal", f"constrained output failed validation: {e}") from None
        for kind, copied in copied_values(self.schema, value):
            if not is_copied(kind, copied, self.document):
                raise EdgeError("internal", f"constrained output failed validation: {copied!r} is not in the prompt")
        return value


def _problem(matcher: llguidance.LLMatcher) -> str:
    """The matcher's error without the parser state it appends (internal detail, and long)."""
    first = matcher.get_error().splitlines()[0].strip()
    if "NoExtensionBias" in first:
        return "no JSON value satisfies it (a $ref that only refers to itself, or an empty alternative)"
    return first
