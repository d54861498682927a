"""ask: retrieve, fit the passages into the context budget, generate, and cite what the model was given."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.retrieval.store import Hit, RetrievalStore

NOT_FOUND = "I could not find anything about this in the documents."
SYSTEM = ("You answer questions using only the numbered passages you are given. Cite the passages you use "
          "like [1]. If the passages do not contain the answer, say that you do not know.")
PROMPT_RESERVE = 64  # tokens for the template's own markup


@dataclass
class Answer:
    answer: str
    citations: list[dict]
    usage: dict | None = None
    timings: dict | None = None


def ask(generator: Generator, store: RetrievalStore, question: str, params: GenerationParams, k: int = 4,
        collection: str | None = None, filters: dict | None = None, min_similarity: float = 0.25) -> Answer:
    return answer(generator, question, passages(generator, store, question, params, k, collection, filters,
                                                min_similarity), params)


def passages(generator: Generator, store: RetrievalStore, question: str, params: GenerationParams, k: int = 4,
             collection: str | None = None, filters: dict | None = None, min_similarity: float = 0.25) -> list[Hit]:
    """The best hits above `min_similarity` that fit the context, leaving room for max_tokens of answer. Only
    this part reads the store, so a caller can hold the store's lock for it and not for the generation."""
    hits = [h for h in store.search(question, k=k, collection=collection, filters=filters)
            if (h.similarity or 0.0) >= min_similarity]
    budget = generator.model.context_length - params.max_tokens - PROMPT_RESERVE
    given: list[Hit] = []
    for hit in hits:
        candidate = given + [hit]
        if len(generator.prompt_ids(messages=_messages(question, candidate))) > budget:
            break
        given = candidate
    return given


def answer(generator: Generator, question: str, given: list[Hit], params: GenerationParams,
           interrupt: Callable[[], None] | None = None) -> Answer:
    """Generate from `given` and cite it; with no passages, say so rather than let the model invent an answer.
    `interrupt` is Generator.stream's (cancellation and deadlines)."""
    if not given:
        return Answer(NOT_FOUND, [])
    result = generator.generate(generator.prompt_ids(messages=_messages(question, given)), params, interrupt)
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", result.text)}
    citations = [{"n": n, "source": h.source, "collection": h.collection, "chunk_id": h.chunk_id, "page": h.page,
                  "start": h.start, "end": h.end, "score": h.score, "similarity": h.similarity, "cited": n in cited,
                  "text": h.text} for n, h in enumerate(given, 1)]
    return Answer(result.text, citations, asdict(result.usage), asdict(result.timings))


def _messages(question: str, hits: list[Hit]) -> list[ChatMessage]:
    passages = "\n\n".join(f"[{n}] ({h.source}, page {h.page}) {h.text.strip()}" for n, h in enumerate(hits, 1))
    return [ChatMessage(role="system", content=SYSTEM),
            ChatMessage(role="user", content=f"Passages:\n\n{passages}\n\nQuestion: {question}")]
