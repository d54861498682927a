"""What a small model is given to answer from: the few sentences of the retrieved passages that share the
question's words, and the refusal it gives, in the question's language, when none does.

A 135M model cannot read three passages and write a sentence, but it can pick a span out of three sentences
(scripts/bench_rag.py --answers measures both). Sentences are scored by the question's content words they
contain (stop words of English, French and Spanish removed; words compared by their first five letters, a
crude stem; weighted by rarity among the candidates), plus a little of their passage's similarity, so the
first passage breaks ties.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgellm.daemon.retrieval.store import Hit

MIN_COVERAGE = 0.3  # without an embedder: share of the question's (weighted) content words a sentence needs
STEM = 5
Embed = Callable[[list[str]], np.ndarray]  # texts -> unit vectors (Embedder.embed)


@dataclass(frozen=True)
class Weights:
    """How meaning and words are fused, and the score below which the documents do not say: chosen on the
    development sets of scripts/bench_rag.py --answers (scripts/tune_grounding.py), never on the held-out."""

    lexical: float = 0.7  # of the coverage, added to the cosine
    threshold: float = 0.775  # the fused score a sentence needs to be answered from

STOP = set("""
a an the of to in on at by for from with and or is are was were be been do does did what which who whom whose when long
where why how much many may can could should would will shall it its this that these those there their our your
any each per than then as if not no yes into about after before under over up down out off i we you he she they
le la les l un une des du de d et ou est sont à au aux en dans par pour sur avec qui que quoi quel quelle quels
quelles quand comment combien où ne pas se sa son ses leur leurs ce cet cette ces il elle ils elles on y faut
peut doit a-t-il est-il sont-ils prend-il intervient-il
el la los las un una unos unas de del y o es son en por para con que qué quién quiénes cuál cuáles cuándo cómo
cuánto cuánta cuántos cuántas dónde se su sus lo al le les cada tiene tienen hay
""".split())

REFUSALS = {
    "en": "The documents do not say.",
    "fr": "Les documents ne le disent pas.",
    "es": "Los documentos no lo dicen.",
}
LANGUAGE_WORDS = {
    "en": set("the what when how who which is are does do much many".split()),
    "fr": set("le la les quel quelle quand combien comment qui est sont du des à où".split()),
    "es": set("el la los las qué cuál cuándo cuánto cuántos cuántas cómo quién es son del dónde".split()),
}


@dataclass(frozen=True)
class Sentence:
    text: str
    hit: int  # index of its passage among those given
    start: int  # character offsets in its source document
    end: int
    score: float


def language(question: str) -> str:
    """en, fr or es, by the question's function words (¿ and ñ settle it for Spanish)."""
    lowered = question.lower()
    if "¿" in lowered or "ñ" in lowered:
        return "es"
    words = re.findall(r"[\w']+", lowered)
    counts = {lang: sum(w in vocab for w in words) for lang, vocab in LANGUAGE_WORDS.items()}
    best = max(counts, key=lambda lang: (counts[lang], lang == "en"))
    return best if counts[best] else "en"


def refusal(question: str) -> str:
    return REFUSALS[language(question)]


def is_refusal(text: str) -> bool:
    return text.strip() in REFUSALS.values()


def _fold(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in folded if not unicodedata.combining(c))


def content_terms(text: str) -> list[str]:
    """Stems of the words that carry meaning: stop words out, accents folded, first STEM letters."""
    words = re.findall(r"[\w]+", text.lower().replace("'", " ").replace("’", " "))
    return [_fold(w)[:STEM] for w in words if w not in STOP and len(w) > 1]


def heading(hit: Hit) -> str:
    """The passage's heading line ('# Office lease'), if it has one: what its sentences are about."""
    first = hit.text.lstrip().split("\n", 1)[0]
    return first.strip(" #") if first.lstrip().startswith("#") else ""


def split_sentences(hit: Hit) -> list[tuple[str, int, int]]:
    """(text, start, end) of each sentence of a passage (headings left out), offsets in its document. A full
    stop ends a sentence only before white space, so 1.800 and 0,40 stay whole."""
    out, pos = [], 0
    for sep in [*re.finditer(r"(?<=[.!?])\s+|\n+", hit.text), None]:
        end = sep.start() if sep else len(hit.text)
        raw = hit.text[pos:end]
        text = raw.strip(" #")
        if not raw.lstrip().startswith("#") and len(content_terms(text)) >= 2:  # a heading answers nothing
            lead = len(raw) - len(raw.lstrip(" #"))
            out.append((text, hit.start + pos + lead, hit.start + pos + lead + len(text)))
        pos = sep.end() if sep else end
    return out


def best_sentences(question: str, given: list[Hit], n: int = 3, embed: Embed | None = None,
                   weights: Weights | None = None) -> list[Sentence]:
    """The `n` sentences that answer best, best first; none when none scores enough (the documents then do
    not say). With `embed` (the store's embedder), a sentence is scored by its meaning as well: the cosine of
    its embedding (with its passage's heading, what it is about) to the question's, plus its share of the
    question's content words; without it, by those words alone (MIN_COVERAGE)."""
    w = weights or Weights()
    asked = set(content_terms(question))
    candidates = [(i, *s) for i, hit in enumerate(given) for s in split_sentences(hit)]
    if not candidates or (not asked and embed is None):
        return []
    coverage = _coverage(asked, candidates, given)
    if embed is None:
        scored = [Sentence(text, i, start, end, c + 0.1 * (given[i].similarity or 0.0))
                  for (i, text, start, end), c in zip(candidates, coverage, strict=True) if c >= MIN_COVERAGE]
    else:
        cosines = meaning(question, candidates, given, embed)
        scored = [Sentence(text, i, start, end, float(cos) + w.lexical * c)
                  for (i, text, start, end), c, cos in zip(candidates, coverage, cosines, strict=True)
                  if float(cos) + w.lexical * c >= w.threshold]
    return sorted(scored, key=lambda s: -s.score)[:n]


def meaning(question: str, candidates: list, given: list[Hit], embed: Embed) -> np.ndarray:
    """Each candidate's cosine to the question, embedded with its passage's heading (what it is about)."""
    about = [f"{h}: {text}" if (h := heading(given[i])) else text for i, text, _, _ in candidates]
    vectors = embed([question, *about])
    return vectors[1:] @ vectors[0]


def _coverage(asked: set[str], candidates: list, given: list[Hit]) -> list[float]:
    """Each candidate's share of the question's content words, weighted by rarity among the candidates; a word
    of its passage's heading counts half (the sentence is about it without saying it)."""
    if not asked:
        return [0.0] * len(candidates)
    terms = [set(content_terms(text)) for _, text, _, _ in candidates]
    topics = [set(content_terms(heading(given[i]))) for i, *_ in candidates]
    weight = {t: math.log(1 + len(candidates) / (1 + sum(t in ts for ts in terms))) for t in asked}
    total = sum(weight.values())
    return [(sum(weight[t] for t in asked & ts) + 0.5 * sum(weight[t] for t in (asked & topic) - ts)) / total
            for ts, topic in zip(terms, topics, strict=True)]
