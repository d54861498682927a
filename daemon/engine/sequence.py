"""One request's generation, as a state machine fed with logits: what to feed next, what to sample, when to stop.

The same Sequence runs alone (`run_alone`: the CLI, the smoke test) or among others in the scheduler's
batched steps (edgellm/daemon/engine/scheduler.py), so the two cannot answer differently by construction.

    prompt tokens --feed--> logits --on_logits--> token (+ tokens the grammar forces) --feed--> ...

Events (Delta text, then one Result, or an EdgeError) go to `events`, read by the request's own thread.
A sequence's life is its `state`:

    QUEUED --first pass--> PREFILLING --prompt in--> DECODING --> FINISHED | CANCELLED | FAILED
       (a prompt fed in one pass goes from QUEUED to DECODING)

A decoding pass may also check a draft (edgellm/daemon/engine/drafting.py): `propose` appends guessed tokens
to the feed, the pass returns logits for each, and `fed` samples position by position, as a pass per token
would, keeping the guesses while they equal what was sampled. Greedy output is the same token for token;
with temperature the output has the same distribution, because sampling from p and keeping a guess d when
the sample equals it is the standard speculative acceptance rule (accept d with probability p(d), else
draw from p without d) for a draft that puts all its mass on d. `discard` then says how many fed tokens'
keys the cache drops. Grammar masks are computed from the matcher as it stands after the kept tokens, so
nothing in the grammar is rolled back.

Only the thread running the passes changes `state`. The one thing another thread may do is `abandon()`: the
reader stops reading, and the next `check()` ends the sequence as CANCELLED.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from edgellm.daemon.engine.adapters import Adapter
from edgellm.daemon.engine.constrain.json_constraint import JsonConstraint
from edgellm.daemon.engine.detokenize import IncrementalDecoder
from edgellm.daemon.engine.drafting import Mode, PromptLookup, Speculation
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sampling import Sampler, log_probabilities
from edgellm.daemon.engine.stops import StopFilter
from edgellm.daemon.errors import EdgeError


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    drafted_tokens: int = 0  # guessed tokens checked by speculative decoding
    accepted_tokens: int = 0  # of those, the ones the model sampled too (they cost no pass of their own)


@dataclass
class Timings:
    ttft_ms: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    total_ms: float = 0.0


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, with the likeliest tokens at its position. A token
    the grammar forced had no alternative: its log-probability is 0."""
    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]]  # (text, logprob), likeliest first; `params.logprobs` of them


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # of the tokens whose text this delta completes


@dataclass
class Result:
    text: str
    finish_reason: str  # stop | length
    usage: Usage
    timings: Timings
    json: Any = None
    tokens: list[int] = field(default_factory=list, repr=False)  # the generated ids, forced ones included
    forward_passes: int = field(default=0, repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # when the request asked for them


Event = Delta | Result | EdgeError


class State(Enum):
    QUEUED = "queued"  # made; no pass has run (the scheduler may still find a cached prefix for it)
    PREFILLING = "prefilling"  # part of the prompt is in the cache
    DECODING = "decoding"  # the prompt is in; each pass samples a token
    FINISHED = "finished"  # its Result is posted
    CANCELLED = "cancelled"  # its reader left, or its interrupt raised (cancel, deadline)
    FAILED = "failed"  # an error ended it (invalid output, a failing pass)

    @property
    def in_prompt(self) -> bool:
        return self in (State.QUEUED, State.PREFILLING)

    @property
    def done(self) -> bool:
        return self in (State.FINISHED, State.CANCELLED, State.FAILED)


_CANCELLING = frozenset({"cancelled", "deadline_exceeded"})  # error codes that mean "stopped", not "broke"


class Sequence:
    """Holds everything one request's generation needs between forward passes; touched by one thread at a
    time (the scheduler's, or the caller's in `run_alone`)."""

    def __init__(self, ids: list[int], params: GenerationParams, *, context: int, eos: frozenset[int],
                 tokenizer, constraint: JsonConstraint | None = None,
                 cached: tuple[int, list[np.ndarray]] | None = None, split_last: bool = False,
                 interrupt: Callable[[], None] | None = None, started: float | None = None,
                 adapter: Adapter | None = None, solo: bool = False, speculative: Mode = "auto"):
        """`cached`: a prefix-cache hit, (tokens, their keys and values), for whoever makes the cache.
        `adapter`: the LoRA adapter every pass of this sequence runs with (None: the base).
        `split_last`: without a hit, feed the prompt's last token in a pass of its own. A repeat of this prompt
        will find all but its last token cached and compute that token alone: then the two see bit-identical
        logits (see Generator.sequence).
        `solo`: computed exactly as alone on a fresh model, even in the scheduler: a cache of its own, no cached
        prefix, the whole prompt in one pass, no draft (the update health check compares such an answer bit for
        bit).
        `speculative`: the drafting mode when the request does not choose one (Speculation)."""
        cached_tokens, self.cached_keys = cached if cached is not None else (0, None)
        self.ids, self.params, self.adapter, self.solo = ids, params, adapter, solo
        self.budget = min(params.max_tokens, context - len(ids))
        self.eos = eos
        self.constraint = constraint
        self.interrupt = interrupt
        self.sampler = Sampler(params)
        self.detokenizer = IncrementalDecoder(tokenizer)
        self.tokenizer = tokenizer
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._logprobs_sent = 0  # of `logprobs`, how many went out with a Delta
        self.stops = StopFilter(params.stop)
        self.usage, self.timings = Usage(prompt_tokens=len(ids), cached_tokens=cached_tokens), Timings()
        self.start = started or time.perf_counter()
        self.todo: list[int] = ids[cached_tokens:]  # tokens to feed before the next logits are wanted
        self.state = State.QUEUED
        self._split = split_last
        self.split_last = split_last and not cached_tokens and len(self.todo) > 1
        self.generated: list[int] = []
        self.parts: list[str] = []
        self.first_at: float | None = None
        self.passes = 0
        self.abandoned = False  # the only field another thread writes: its reader stopped reading
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        mode = params.speculative or speculative
        self.speculation = Speculation("off" if solo else mode)
        self._lookup = PromptLookup(ids) if self.speculation.mode != "off" else None
        self.draft: list[int] = []  # guessed tokens the next pass feeds after `todo`
        self.discard = 0  # tokens the last pass fed whose keys are not the sequence's (rejected guesses)

    @property
    def finished(self) -> bool:
        return self.state.done

    @property
    def length(self) -> int:
        """Tokens whose keys are in the cache."""
        return len(self.ids) + len(self.generated) - len(self.todo)

    def use_cached(self, tokens: int) -> None:
        """Before the first pass: the cache now holds the keys of the prompt's first `tokens` tokens."""
        assert self.state is State.QUEUED and tokens < len(self.ids)
        self.usage.cached_tokens = tokens
        self.todo = self.ids[tokens:]
        self.split_last = False

    def next_feed(self, limit: int | None = None) -> list[int]:
        """The tokens of the next pass (at most `limit` of a prompt), with the draft if one was proposed."""
        if self.draft:
            return [*self.todo, *self.draft]
        todo = self.todo[:-1] if self.split_last else self.todo
        return todo[:limit] if limit else list(todo)

    @property
    def logit_rows(self) -> int:
        """Positions of the next pass whose logits it needs: the last, and one before each guess."""
        return 1 + len(self.draft)

    def propose(self, room: int, alone: bool) -> None:
        """Before a decoding pass: guess up to `room` tokens to check in it (`alone`: no other sequence decodes
        beside this one, so the pass would run by itself anyway). Guesses the grammar rejects are cut."""
        self.draft = []
        if self._lookup is None or self.state is not State.DECODING or not self.todo:
            return
        k = min(self.speculation.length(alone), room, self.budget - len(self.generated) - 1)
        if k <= 0:
            return
        draft = self._lookup.draft(k)
        if draft and self.constraint is not None:
            draft = draft[: self.constraint.matcher.validate_tokens(draft)]
        self.draft = draft

    def check(self) -> None:
        """Before every pass: a cancelled or late request raises EdgeError here."""
        if self.abandoned:
            raise EdgeError("cancelled", "nobody reads this request's output any more")
        if self.interrupt is not None:
            self.interrupt()

    def abandon(self) -> None:
        self.abandoned = True

    def fed(self, n: int, logits: np.ndarray) -> bool:
        """`n` tokens of the feed went through a pass; `logits` [positions, vocab] end with the last position's
        (and, when a draft was fed, hold one row per guess before it). Returns True when this pass completed the
        prompt: the cache then holds exactly its keys."""
        self.passes += 1
        draft, self.draft, self.discard = self.draft, [], 0
        self.todo = self.todo[n - len(draft):]
        if self.split_last and len(self.todo) == 1:
            self.split_last = False  # the prompt's last token gets a pass of its own
        if self.todo:
            if self.state is State.QUEUED:
                self.state = State.PREFILLING
            return False
        prompt_done = self.state.in_prompt
        self.state = State.DECODING
        rows = logits[len(logits) - len(draft) - 1:]
        kept = 0  # guesses that were sampled too: their keys are in the cache, their logits are the next row
        while True:
            new = self._on_logits(rows[kept])
            match = _common_prefix(new, draft[kept:])
            kept += match
            if self.finished or match < len(new):
                self.todo = self.todo[match:]
                break
        if draft:
            self.discard = len(draft) - kept
            self.usage.drafted_tokens += len(draft)
            self.usage.accepted_tokens += kept
            self.speculation.update(len(draft), kept)
        return prompt_done

    def _on_logits(self, logits: np.ndarray) -> list[int]:
        """Sample from one position's logits; returns the tokens emitted (the sample and what the grammar forces
        after it), which are also the next `todo` unless the sequence finished."""
        params, constraint = self.params, self.constraint
        left = self.budget - len(self.generated)
        if constraint is not None and (closing := constraint.closing(self.generated, left)):
            # budget-aware closing: the shortest valid completion, forced where the budget would cut the JSON
            # short; the answer is valid, shorter, and finishes with `length`
            self._first_token()
            self._record(closing)
            self._emit(closing)
            self._finish("length")
            return closing
        logits = logits.copy()
        if constraint is not None:
            constraint.mask(logits)
        elif params.ignore_eos:  # a grammar ends its own output, so only free text ignores EOS
            logits[sorted(self.eos)] = -np.inf
        recent = self.ids + self.generated if params.penalizes else ()
        token = self.sampler(logits, recent)
        self._first_token()
        forced = constraint.accept(token) if constraint is not None else []
        if token in self.eos:
            self._finish("stop")
            return []
        new = [token, *forced][: self.budget - len(self.generated)]
        self._record(new, logits)
        stopped = self._emit(new)
        if stopped or (constraint is not None and constraint.finished):
            self._finish("stop")
        elif len(self.generated) >= self.budget:
            self._finish("length")
        else:
            self.todo = new
        return new

    def _record(self, tokens: list[int], logits: np.ndarray | None = None) -> None:
        """The log-probabilities of tokens about to be emitted, if asked for: the first was sampled from
        `logits` (masked and penalized as sampling saw them); the rest, and all without logits, were forced."""
        if self.logprobs is None or not tokens:
            return
        decode = self.tokenizer.decode
        forced = tokens
        if logits is not None:
            lp = log_probabilities(logits)
            top = np.argsort(-lp)[: self.params.logprobs] if self.params.logprobs else []
            self.logprobs.append(TokenLogprob(tokens[0], decode([tokens[0]]), float(lp[tokens[0]]),
                                              [(decode([int(t)]), float(lp[t])) for t in top]))
            forced = tokens[1:]
        for t in forced:
            alone = [(decode([t]), 0.0)] if self.params.logprobs else []
            self.logprobs.append(TokenLogprob(t, decode([t]), 0.0, alone))

    def _unsent_logprobs(self) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        out, self._logprobs_sent = self.logprobs[self._logprobs_sent:], len(self.logprobs)
        return out

    def _first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.timings.ttft_ms = (self.first_at - self.start) * 1000
            self.timings.prefill_tps = len(self.ids) / max(self.first_at - self.start, 1e-9)

    def _emit(self, tokens: list[int]) -> bool:
        """Append generated tokens and post their text; True when a stop string was reached."""
        self.generated.extend(tokens)
        if self._lookup is not None:
            self._lookup.extend(tokens)
        text, stopped = self.stops.push(self.detokenizer.push(tokens))
        if text:
            self.parts.append(text)
            self.events.put(Delta(text, self._unsent_logprobs()))
        return stopped

    def _finish(self, reason: str) -> None:
        tail = self.stops.flush()  # text held back for a stop string that never came
        if tail:
            self.parts.append(tail)
            self.events.put(Delta(tail, self._unsent_logprobs()))
        end = time.perf_counter()
        self.usage.completion_tokens = len(self.generated)
        self.timings.total_ms = (end - self.start) * 1000
        if self.first_at is not None and len(self.generated) > 1:
            self.timings.decode_tps = (len(self.generated) - 1) / max(end - self.first_at, 1e-9)
        text = "".join(self.parts)
        self.todo = []
        if self.constraint is not None:
            if not self.constraint.complete:
                return self.fail(EdgeError("bad_request", f"max_tokens: the output reached {self.budget} tokens "
                                           "before the JSON was complete; raise max_tokens or bound the schema "
                                           "(maxItems, maxLength)", param="max_tokens"))
            try:
                value = self.constraint.parse(text)
            except EdgeError as e:
                return self.fail(e)
        else:
            value = None
        self.state = State.FINISHED
        self.events.put(Result(text, reason, self.usage, self.timings, value, list(self.generated), self.passes,
                               self.logprobs))

    def fail(self, error: EdgeError) -> None:
        self.state = State.CANCELLED if error.code in _CANCELLING else State.FAILED
        self.todo = []
        self.events.put(error)

    def drain(self) -> Iterator[Delta | Result]:
        """The events posted so far, without waiting; an error is raised."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, EdgeError):
                raise event
            yield event

    def follow(self) -> Iterator[Delta | Result]:
        """Every event up to the final one, waiting for each (the scheduler posts them); an error is raised."""
        while True:
            event = self.events.get()
            if isinstance(event, EdgeError):
                raise event
            yield event
            if isinstance(event, Result):
                return


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n
