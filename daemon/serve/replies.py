"""What the worker answers, typed. Each transport renders these in its own wire format: MQTT's JSON
(edgellm/daemon/serve/wire.py, `reply_body`) and OpenAI's (edgellm/daemon/serve/http/openai.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgellm.daemon.engine.chat import ToolCall
from edgellm.daemon.engine.sequence import Result, TokenLogprob
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.rag import Answer
from edgellm.daemon.retrieval.store import Hit, IngestReport


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str


@dataclass
class Generated:
    result: Result
    model: ModelInfo
    json_mode: bool  # the request gave a json_schema: the answer is `result.json`, not the text
    tool_calls: list[ToolCall] = field(default_factory=list)  # then `result.text` is "" and the finish "tool_calls"


@dataclass
class Embedded:
    vectors: np.ndarray  # [texts, dimension], unit length
    model: ModelInfo


@dataclass
class Ingested:
    report: IngestReport


@dataclass
class Found:
    hits: list[Hit]


@dataclass
class Answered:
    answer: Answer
    model: ModelInfo


@dataclass
class Deleted:
    chunks: int


Reply = Generated | Embedded | Ingested | Found | Answered | Deleted


# -- the events a request's sink receives: deltas (streaming only), then exactly one Finished or Failed ------
@dataclass
class TextDelta:
    text: str
    seq: int  # counts from 0
    replayed: bool = False  # on the first delta of a request run again after a restart: its stream starts over
    logprobs: list[TokenLogprob] | None = None  # of the tokens this text completes, when the request asked


@dataclass
class Finished:
    reply: Reply


@dataclass
class Failed:
    error: EdgeError


Event = TextDelta | Finished | Failed


def logprob_entries(logprobs: list[TokenLogprob]) -> list[dict]:
    """Tokens' log-probabilities in OpenAI's chat shape, which MQTT replies use too (so does llama-server)."""
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": round(logprob, 6), "bytes": list(text.encode())}
    return [{**entry(t.text, t.logprob), "top_logprobs": [entry(text, lp) for text, lp in t.top]} for t in logprobs]
