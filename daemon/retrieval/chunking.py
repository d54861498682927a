"""Split text into chunks of at most N tokens with overlap, breaking at headings, paragraphs and sentences.

A chunk is a span [start, end) of its page's text, so its character offsets point back into the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

PARAGRAPH = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")  # runs of non-blank lines
SENTENCE = re.compile(r"[^.!?;\n]+(?:[.!?;]+|\n|$)")
HEADING = re.compile(r"^\s*(#{1,6}\s|[A-Z0-9][^\n]{0,80}:\s*$)")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    tokens: int
    heading: bool = False


def _pieces(text: str, count: Callable[[str], int], max_tokens: int) -> list[Span]:
    """Paragraphs, or their sentences where a paragraph is too long, or token-sized slices of a sentence."""
    out: list[Span] = []
    for para in PARAGRAPH.finditer(text):
        n = count(para.group())
        if n <= max_tokens:
            out.append(Span(para.start(), para.end(), n, bool(HEADING.match(para.group()))))
            continue
        for sent in SENTENCE.finditer(para.group()):
            s, e = para.start() + sent.start(), para.start() + sent.end()
            n = count(text[s:e])
            if n <= max_tokens:
                out.append(Span(s, e, n))
                continue
            step = max(1, (e - s) * max_tokens // (n + 1))  # characters per slice, by the sentence's density
            out.extend(Span(i, min(i + step, e), count(text[i:min(i + step, e)])) for i in range(s, e, step))
    return out


def chunk_text(text: str, count: Callable[[str], int], max_tokens: int = 200, overlap: int = 32) -> list[Span]:
    """Greedy packing of pieces; a heading starts a new chunk; the next chunk repeats up to `overlap` tokens."""
    chunks: list[Span] = []
    current: list[Span] = []

    def close() -> None:
        if current:
            chunks.append(Span(current[0].start, current[-1].end, sum(p.tokens for p in current)))

    for piece in _pieces(text, count, max_tokens):
        size = sum(p.tokens for p in current)
        if current and (piece.heading or size + piece.tokens > max_tokens):
            close()
            carried: list[Span] = []
            if not piece.heading:
                for p in reversed(current):
                    if sum(c.tokens for c in carried) + p.tokens > overlap or p.heading:
                        break
                    carried.insert(0, p)
                while carried and sum(c.tokens for c in carried) + piece.tokens > max_tokens:
                    carried.pop(0)
            current = carried
        current.append(piece)
    close()
    return chunks
