"""The generation loop: prefill, then one token (plus any grammar-forced tokens) per forward pass.

`stream()` yields text deltas and ends with one Result; `generate()` is the same stream joined, so
streamed and non-streamed text cannot differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.daemon.engine.batching import BatchingDecoder
from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.constrain import JsonConstraint, compile_json_schema, grammar_tokenizer
from edgellm.daemon.engine.detokenize import IncrementalDecoder
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.prefix_cache import PrefixCache
from edgellm.daemon.engine.sampling import Sampler
from edgellm.daemon.engine.stops import StopFilter
from edgellm.daemon.errors import EdgeError


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class Timings:
    ttft_ms: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    total_ms: float = 0.0


@dataclass
class Delta:
    text: str


@dataclass
class Result:
    text: str
    finish_reason: str  # stop | length
    usage: Usage
    timings: Timings
    json: Any = None
    forward_passes: int = field(default=0, repr=False)


class Generator:
    """Generation on one loaded model. Holds per-model caches (the grammar tokenizer), never per-request state."""

    def __init__(self, model: LoadedModel, prefix_cache: PrefixCache | None = None, batch_rows: int = 1,
                 batch_context: int = 512):
        self.model = model
        self.prefix_cache = prefix_cache
        self._lltok = None
        self.decoder = model.decoder
        if batch_rows > 1 and model.decoder.in_place:
            self.decoder = BatchingDecoder(model.decoder, batch_rows, min(batch_context, model.context_length))

    def prompt_ids(self, prompt: str | None = None, messages: list[ChatMessage] | None = None,
                   raw: bool = False) -> list[int]:
        """Token ids for a prompt (wrapped in the chat template unless raw) or a chat."""
        if messages is not None:
            return self.model.encode(self.model.render_chat(messages), add_special_tokens=False)
        if prompt is None or not prompt.strip():
            raise EdgeError("bad_request", "prompt: is empty; give the text to continue or answer")
        if raw or self.model.template is None:
            return self.model.encode(prompt)
        return self.model.encode(self.model.render_chat([ChatMessage(role="user", content=prompt)]),
                                 add_special_tokens=False)

    def _constraint(self, schema: dict) -> JsonConstraint:
        if self._lltok is None:
            m = self.model
            self._lltok = grammar_tokenizer(m.tokenizer_json(), sorted(m.eos_token_ids), m.decoder.vocab_size)
        return JsonConstraint(self._lltok, schema, compile_json_schema(schema, self._lltok))

    def generate(self, ids: list[int], params: GenerationParams,
                 interrupt: Callable[[], None] | None = None) -> Result:
        return next(e for e in self.stream(ids, params, interrupt) if isinstance(e, Result))

    def stream(self, ids: list[int], params: GenerationParams, interrupt: Callable[[], None] | None = None,
               started: float | None = None) -> Iterator[Delta | Result]:
        """`interrupt` runs before every forward pass and may raise EdgeError (cancelled, deadline_exceeded).
        `started` (a perf_counter time) is when the request's own work began, e.g. before its prompt was
        templated and tokenized; time to first token and total time count from it."""
        model = self.model
        context = model.context_length
        if not ids:
            raise EdgeError("bad_request", "prompt: is empty; give the text to continue or answer")
        if len(ids) >= context:
            raise EdgeError("bad_request", f"prompt: is {len(ids)} tokens; the model's context is {context} "
                            "tokens. Shorten the prompt")
        constraint = self._constraint(params.json_schema) if params.json_schema is not None else None
        budget = min(params.max_tokens, context - len(ids))
        sampler = Sampler(params)
        decoder = IncrementalDecoder(model.tokenizer)
        stops = StopFilter(params.stop)
        eos = model.eos_token_ids
        suppressed = sorted(eos) if params.ignore_eos else []
        usage, timings = Usage(prompt_tokens=len(ids)), Timings()
        start = started or time.perf_counter()
        feed = ids
        hit = self.prefix_cache.lookup(ids) if self.prefix_cache is not None else None
        passes = 0
        known = None
        if hit is not None:  # compute only what follows the cached prefix
            usage.cached_tokens, known = hit
            feed = ids[usage.cached_tokens:]
        cache = self.decoder.new_cache(len(ids) + budget, prefix=known)
        try:
            if hit is None and self.prefix_cache is not None and len(ids) >= self.prefix_cache.min_tokens:
                # A repeat of this prompt will compute its last token alone on top of the cached rest. onnxruntime
                # computes one row and many rows with different kernels, so do the same now: then the cold and the
                # warm request see bit-identical logits and give the same greedy answer.
                if interrupt is not None:
                    interrupt()
                self.decoder.forward(ids[:-1], cache)
                passes += 1
                feed = ids[-1:]
            generated: list[int] = []
            parts: list[str] = []
            finish = "length"
            first_at = None
            while len(generated) < budget:
                if interrupt is not None:
                    interrupt()
                logits = self.decoder.forward(feed, cache)[-1].copy()
                passes += 1
                if constraint is not None:
                    constraint.mask(logits)
                elif params.ignore_eos:  # a grammar ends its own output, so only free text ignores EOS
                    logits[suppressed] = -np.inf
                token = sampler(logits, ids + generated if params.repetition_penalty != 1.0 else ())
                if first_at is None:
                    if self.prefix_cache is not None:
                        self.prefix_cache.store(ids, cache.prefix())
                    first_at = time.perf_counter()
                    timings.ttft_ms = (first_at - start) * 1000
                    timings.prefill_tps = len(ids) / max(first_at - start, 1e-9)
                forced = constraint.accept(token) if constraint is not None else []
                if token in eos:
                    finish = "stop"
                    break
                new = [token, *forced][: budget - len(generated)]
                generated.extend(new)
                text, stopped = stops.push(decoder.push(new))
                if text:
                    parts.append(text)
                    yield Delta(text)
                if stopped or (constraint is not None and constraint.finished):
                    finish = "stop"
                    break
                feed = new
            tail = stops.flush()  # text held back for a stop string that never came
            if tail:
                parts.append(tail)
                yield Delta(tail)
            end = time.perf_counter()
            usage.completion_tokens = len(generated)
            timings.total_ms = (end - start) * 1000
            if first_at is not None and len(generated) > 1:
                timings.decode_tps = (len(generated) - 1) / max(end - first_at, 1e-9)
            text = "".join(parts)
            value = None
            if constraint is not None:
                if not constraint.finished:
                    raise EdgeError("bad_request", f"max_tokens: the output reached {budget} tokens before the JSON "
                                    "was complete; raise max_tokens or bound the schema (maxItems, maxLength)")
                value = constraint.parse(text)
            yield Result(text, finish, usage, timings, value, passes)
        finally:
            self.decoder.release(cache)  # its batching row, if it has one, goes to the next request
