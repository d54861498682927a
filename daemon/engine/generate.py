"""Generation on one loaded model: prompts to token ids, and a request's generation as a stream of events.

`stream()` yields text deltas and ends with one Result; `generate()` is the same stream joined, so streamed
and non-streamed text cannot differ. A Generator made with `batch_rows > 1` (the daemon's) hands its
sequences to a Scheduler thread that batches their decode steps; otherwise a sequence runs in the caller's
thread, alone. Both drive the same Sequence (edgellm/daemon/engine/sequence.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from edgellm.daemon.engine.adapters import Adapter
from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.constrain.copy_grammar import has_copied_fields
from edgellm.daemon.engine.constrain.json_constraint import JsonConstraint, compile_json_schema, grammar_tokenizer
from edgellm.daemon.engine.decoder import KVCache
from edgellm.daemon.engine.drafting import MAX_DRAFT, Mode
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.prefix_cache import PrefixCache
from edgellm.daemon.engine.scheduler import Scheduler
from edgellm.daemon.engine.sequence import Delta, Result, Sequence, Timings, Usage
from edgellm.daemon.errors import EdgeError

__all__ = ["Delta", "Generator", "Result", "Timings", "Usage"]


class Generator:
    """Generation on one loaded model. Holds per-model caches (the grammar tokenizer, the prefix cache, the
    scheduler's KV pool), never per-request state."""

    def __init__(self, model: LoadedModel, prefix_cache: PrefixCache | None = None, batch_rows: int = 1,
                 batch_context: int = 512, speculative: Mode = "auto"):
        """`speculative`: the drafting mode of requests that do not choose one (edgellm/daemon/engine/drafting.py)."""
        self.model = model
        self.speculative = speculative
        self.prefix_cache = prefix_cache
        self._lltok = None
        self._template_ends: tuple[list[int], list[int]] | None = None
        self.scheduler = None
        if batch_rows > 1 and model.decoder.in_place:
            self.scheduler = Scheduler(model.decoder, batch_rows, min(batch_context, model.context_length),
                                       on_prompt=self._remember_prompt, lookup=self._cached_prefix)

    def sequences(self) -> dict[str, int]:
        """What the scheduler holds, by state (empty without one: sequences then run on their callers' threads)."""
        return self.scheduler.census() if self.scheduler is not None else {}

    def prompt_ids(self, prompt: str | None = None, messages: list[ChatMessage] | None = None,
                   raw: bool = False) -> list[int]:
        """Token ids for a prompt (wrapped in the chat template unless raw) or a chat."""
        if messages is not None:
            return self.model.encode(self.model.render_chat(messages), add_special_tokens=False)
        if prompt is None or not prompt.strip():
            raise EdgeError("bad_request", "prompt: is empty; give the text to continue or answer", param="prompt")
        if raw or self.model.template is None:
            return self.model.encode(prompt)
        return self.model.encode(self.model.render_chat([ChatMessage(role="user", content=prompt)]),
                                 add_special_tokens=False)

    def _constraint(self, schema: dict, ids: list[int], copy_source: str | None = None) -> JsonConstraint:
        """The schema's grammar. Fields marked x-edgellm-copy copy from `copy_source`, by default the prompt the
        model reads."""
        if self._lltok is None:
            m = self.model
            self._lltok = grammar_tokenizer(m.tokenizer_json(), sorted(m.eos_token_ids), m.decoder.vocab_size)
        document = ""
        if has_copied_fields(schema):
            document = copy_source if copy_source is not None else self._copy_source(ids)
        return JsonConstraint(self._lltok, schema, compile_json_schema(schema, self._lltok, document), document)

    def _copy_source(self, ids: list[int]) -> str:
        """The text copied fields may copy from: the prompt without what the chat template wrote itself around
        a user's message (its default system prompt, the role markers). Otherwise a model could answer
        "vendor": "You are a helpful AI assistant named SmolLM", which is in the prompt but in no document."""
        if self._template_ends is None:
            self._template_ends = ([], [])
            if self.model.template is not None:
                marker = "\x00"
                head, _, tail = self.model.render_chat([ChatMessage(role="user", content=marker)]).partition(marker)
                self._template_ends = (self.model.encode(head, add_special_tokens=False),
                                       self.model.encode(tail, add_special_tokens=False))
        head, tail = self._template_ends
        if head and ids[:len(head)] == head:
            ids = ids[len(head):]
        if tail and ids[-len(tail):] == tail:
            ids = ids[:-len(tail)]
        return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, ids: list[int], params: GenerationParams, interrupt: Callable[[], None] | None = None,
                 copy_source: str | None = None, solo: bool = False) -> Result:
        return next(e for e in self.stream(ids, params, interrupt, copy_source=copy_source, solo=solo)
                    if isinstance(e, Result))

    def sequence(self, ids: list[int], params: GenerationParams, interrupt: Callable[[], None] | None = None,
                 started: float | None = None, copy_source: str | None = None, solo: bool = False) -> Sequence:
        """A request's generation, ready to run: checked, with its grammar and any cached prefix. `copy_source`:
        the text x-edgellm-copy fields copy from, when it is not the whole prompt (grounded answers). `solo`:
        computed as on a fresh Generator of its own (Sequence), though it runs in this one's scheduler."""
        context = self.model.context_length
        if not ids:
            raise EdgeError("bad_request", "prompt: is empty; give the text to continue or answer", param="prompt")
        if len(ids) >= context:
            raise EdgeError("bad_request", f"prompt: is {len(ids)} tokens; the model's context is {context} "
                            "tokens. Shorten the prompt", param="prompt")
        adapter = self._adapter(params.adapter)
        constraint = (self._constraint(params.json_schema, ids, copy_source) if params.json_schema is not None
                      else None)
        # (the scheduler looks the prefix up itself, when it runs the sequence)
        hit = self._cached_prefix(ids, adapter) if self.scheduler is None and not solo else None
        # A repeat of a cacheable prompt computes its last token alone, on top of the cached rest. onnxruntime
        # computes one row and many rows with different kernels, so the cold request does the same: then the
        # cold and the warm request see bit-identical logits and give the same greedy answer.
        split_last = self.prefix_cache is not None and len(ids) >= self.prefix_cache.min_tokens and not solo
        return Sequence(ids, params, context=context, eos=self.model.eos_token_ids, tokenizer=self.model.tokenizer,
                        constraint=constraint, cached=hit, split_last=split_last, interrupt=interrupt,
                        started=started, adapter=adapter, solo=solo, speculative=self.speculative)

    def _adapter(self, name: str | None) -> Adapter | None:
        slots = self.model.decoder.adapters
        if name is None:
            return None
        if slots is None:
            raise EdgeError("bad_request", f"adapter: model {self.model.manifest.name} takes no run-time adapters; "
                            "build it with `--adapter-slots` (or merge the adapter into it)", param="adapter")
        return slots.get(name)

    def stream(self, ids: list[int], params: GenerationParams, interrupt: Callable[[], None] | None = None,
               started: float | None = None, copy_source: str | None = None,
               solo: bool = False) -> Iterator[Delta | Result]:
        """`interrupt` runs before every forward pass and may raise EdgeError (cancelled, deadline_exceeded).
        `started` (a perf_counter time) is when the request's own work began, e.g. before its prompt was
        templated and tokenized; time to first token and total time count from it."""
        seq = self.sequence(ids, params, interrupt, started or time.perf_counter(), copy_source, solo)
        if self.scheduler is not None:
            self.scheduler.submit(seq)
            try:
                yield from seq.follow()
            finally:
                seq.abandon()  # a caller that stops reading (an error, a closed generator) frees its row
        else:
            yield from self._run_alone(seq)

    def _run_alone(self, seq: Sequence) -> Iterator[Delta | Result]:
        decoder = self.model.decoder
        cache = decoder.new_cache(len(seq.ids) + seq.budget, seq.cached_keys)
        seq.cached_keys = None
        while not seq.finished:
            seq.check()
            seq.propose(MAX_DRAFT, alone=True)
            feed = seq.next_feed()
            logits = decoder.forward(feed, cache, adapter=seq.adapter, last=seq.logit_rows)
            if seq.fed(len(feed), logits):
                self._remember_prompt(seq, cache)
            cache.rewind(seq.discard)
            yield from seq.drain()
        yield from seq.drain()

    def _cached_prefix(self, ids: list[int], adapter: Adapter | None):
        """Keys and values depend on the adapter (it changes k and v): each adapter has its own prefixes."""
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.lookup(ids, adapter.name if adapter else "")

    def _remember_prompt(self, seq: Sequence, cache: KVCache) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.store(seq.ids, cache.prefix(), seq.adapter.name if seq.adapter else "")
