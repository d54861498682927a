"""ask: retrieve, fit the passages into the context budget, answer from them, and cite what the answer used.

Two ways to answer (`mode`):
- grounded (the default for models under 1B parameters): the best sentences of the passages
  (edgellm/daemon/retrieval/grounding.py), and an answer the grammar copies out of them (x-edgellm-copy),
  citing the sentence it came from; when no sentence shares enough of the question's words, the documents
  do not say, in the question's language;
- free: the passages whole, and free text citing them like [1] (larger models).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.formats import AnswerMode
from edgellm.daemon.retrieval.grounding import Embed, Sentence, best_sentences, is_refusal, refusal
from edgellm.daemon.retrieval.store import Hit, RetrievalStore

__all__ = ["Answer", "answer", "ask", "is_refusal", "passages"]

SYSTEM = ("You answer questions using only the numbered passages you are given. Cite the passages you use "
          "like [1]. If the passages do not contain the answer, say that you do not know.")
GROUNDED_SYSTEM = ("Answer the question with words copied from the numbered sentences: the shortest part of "
                   "one sentence that answers it.")
GROUNDED_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
                   "properties": {"answer": {"type": "string", "x-edgellm-copy": True}}}
GROUNDED_MAX_PARAMETERS = 1e9
GROUNDED_SENTENCES = 1  # the best sentence holds the answer for 59 of the 61 questions (scripts/bench_rag.py)
PROMPT_RESERVE = 64  # tokens for the template's own markup


@dataclass
class Answer:
    answer: str
    citations: list[dict]
    usage: dict | None = None
    timings: dict | None = None


def ask(generator: Generator, store: RetrievalStore, question: str, params: GenerationParams, k: int = 4,
        collection: str | None = None, filters: dict | None = None, min_similarity: float = 0.25,
        mode: AnswerMode | None = None) -> Answer:
    return answer(generator, question, passages(generator, store, question, params, k, collection, filters,
                                                min_similarity), params, mode=mode, embed=store.embedder.embed)


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


def answer_mode(generator: Generator, mode: AnswerMode | None = None) -> str:
    """grounded or free; `auto` (or None) is grounded below GROUNDED_MAX_PARAMETERS, estimated from the size of
    the weights and their bits (a scale per block adds about one bit)."""
    if mode in ("grounded", "free"):
        return mode
    m = generator.model.manifest
    bits = (m.quantization.bits + 1) if m.quantization and m.quantization.bits else 32
    weight_bytes = sum(f.size for name, f in m.files.items() if name.startswith("model.onnx"))
    return "grounded" if weight_bytes * 8 / bits < GROUNDED_MAX_PARAMETERS else "free"


def answer(generator: Generator, question: str, given: list[Hit], params: GenerationParams,
           interrupt: Callable[[], None] | None = None, mode: AnswerMode | None = None,
           embed: Embed | None = None) -> Answer:
    """Answer from `given` and cite it; with no passages, say so rather than let the model invent an answer.
    `interrupt` is Generator.stream's (cancellation and deadlines)."""
    if not given:
        return Answer(refusal(question), [])
    if answer_mode(generator, mode) == "grounded":
        return _grounded(generator, question, given, params, interrupt, embed)
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


def _grounded(generator: Generator, question: str, given: list[Hit], params: GenerationParams,
              interrupt: Callable[[], None] | None, embed: Embed | None = None) -> Answer:
    """A span copied greedily from the best sentences, completed to the end of its clause, citing the sentence
    that holds it."""
    chosen = best_sentences(question, given, GROUNDED_SENTENCES, embed)
    if not chosen:
        return Answer(refusal(question), [])
    numbered = "\n".join(f"[{n}] {s.text}" for n, s in enumerate(chosen, 1))
    messages = [ChatMessage(role="system", content=GROUNDED_SYSTEM),
                ChatMessage(role="user", content=f"Sentences:\n{numbered}\n\nQuestion: {question}")]
    constrained = params.model_copy(update={"json_schema": GROUNDED_SCHEMA, "temperature": 0.0,
                                            "max_tokens": max(params.max_tokens, 64)})
    result = generator.generate(generator.prompt_ids(messages=messages), constrained, interrupt,
                                copy_source="\n".join(s.text for s in chosen))
    try:
        span = str(json.loads(result.text)["answer"]).strip()
    except (ValueError, KeyError, TypeError):
        span = ""
    cited = next((s for s in chosen if span and span in s.text), chosen[0])
    return Answer(_to_clause_end(span, cited.text), [_sentence_citation(n, s, given[s.hit], s is cited)
                                       for n, s in enumerate(chosen, 1)],
                  asdict(result.usage), asdict(result.timings))


def _to_clause_end(span: str, sentence: str) -> str:
    """The span and the rest of its clause: a small model stops copying early ("within" for "within one hour";
    "the surcharge is eight" for "eight percent"), and the words after it belong to the answer."""
    at = sentence.find(span) if span else -1
    if at < 0:
        return sentence
    stop = re.compile(r";|,\s|\.(?!\d)").search(sentence, at + len(span))
    return sentence[at:stop.start() if stop else len(sentence)].strip()


def _sentence_citation(n: int, s: Sentence, hit: Hit, cited: bool) -> dict:
    return {"n": n, "source": hit.source, "collection": hit.collection, "chunk_id": hit.chunk_id, "page": hit.page,
            "start": s.start, "end": s.end, "score": hit.score, "similarity": hit.similarity, "cited": cited,
            "text": s.text}
