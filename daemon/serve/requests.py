"""The requests the worker runs, whichever transport brought them: parsed once and strictly (unknown fields and
wrong types are errors naming the field). MQTT's payloads are these shapes as they are (docs/mqtt-api.md); the
OpenAI-compatible HTTP API translates its own into them (edgellm/daemon/serve/http/openai.py)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.constrain.tools import Tool, ToolChoice
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.formats import AnswerMode

ID_MAX = 128


class Envelope(BaseModel):
    """Fields every request may carry; `reply_to` and `id` are the MQTT 3.1.1 fallback for properties."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "10" is not a number here, nor true a 1
    id: str | None = Field(None, min_length=1, max_length=ID_MAX)
    reply_to: str | None = Field(None, min_length=1, max_length=1024)
    deadline_ms: int | None = Field(None, ge=1, le=24 * 3600 * 1000,
                                    description="answer within this many ms of arrival, or not at all")


class GenerateRequest(Envelope, GenerationParams):
    prompt: str = Field(max_length=1_000_000)
    raw: bool = Field(False, description="send the prompt as is, without the chat template")
    stream: bool = False


class ChatRequest(Envelope, GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    tools: list[Tool] = Field(default_factory=list, max_length=128,
                              description="functions the model may call (edgellm/daemon/engine/constrain/tools.py)")
    tool_choice: ToolChoice | None = Field(None, description="auto (default with tools), none, required, or "
                                           '{"type": "function", "function": {"name": ...}}')


class EmbedRequest(Envelope):
    input: str | list[str] = Field(description="one text or up to 256 texts")

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not 1 <= len(texts) <= 256:
            raise EdgeError("bad_request", "input: give 1 to 256 texts")
        return texts


class StatusRequest(Envelope):
    pass


Scalar = str | int | float | bool
COLLECTION = Field("default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class IngestRequest(Envelope):
    text: str | None = Field(None, max_length=10_000_000, description="inline text; needs `source`")
    source: str | None = Field(None, min_length=1, max_length=1024, description="the name citations will show")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="a file or folder under one of store.ingest_dirs")
    collection: str = COLLECTION
    metadata: dict[str, Scalar] = Field(default_factory=dict, max_length=64)

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("holds a NUL character (U+0000), which no file name can")
        return value


class SearchRequest(Envelope):
    query: str = Field(min_length=1, max_length=10_000)
    k: int = Field(5, ge=1, le=50)
    collection: str | None = Field(None, min_length=1, max_length=64)
    filter: dict[str, Scalar] = Field(default_factory=dict, max_length=16)
    mode: str = Field("auto", pattern="^(auto|float|bit)$")


class AskRequest(Envelope, GenerationParams):
    question: str = Field(min_length=1, max_length=10_000)
    k: int = Field(4, ge=1, le=20)
    collection: str | None = Field(None, min_length=1, max_length=64)
    filter: dict[str, Scalar] = Field(default_factory=dict, max_length=16)
    mode: AnswerMode | None = Field(None, description="grounded: a span copied from the best sentence; free: text "
                                    "from the passages; default: the store.answer_mode setting")


class DeleteRequest(Envelope):
    source: str = Field(min_length=1, max_length=4096)
    collection: str = COLLECTION


class CancelRequest(Envelope):
    request_id: str = Field(min_length=1, max_length=ID_MAX, description="the id of the request to cancel")


METHODS: dict[str, type[Envelope]] = {
    "generate": GenerateRequest, "chat": ChatRequest, "embed": EmbedRequest,
    "status": StatusRequest, "cancel": CancelRequest, "ingest": IngestRequest, "search": SearchRequest,
    "ask": AskRequest, "delete": DeleteRequest,
}


def validation_error(error: ValidationError) -> EdgeError:
    """EdgeError('bad_request') naming up to five fields and what is wrong with each; `param` is the first."""
    errors = error.errors()
    first = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return EdgeError("bad_request", describe_validation(error), param=first)


def refuse_unknown(body: dict, known: Iterable[str], refused: Mapping[str, str] = {}, prefix: str = "") -> None:
    """For the HTTP dialects, which take other clients' bodies: a field in `refused` (known, not honoured) with a
    value that is not empty is an EdgeError giving the reason; a field neither known nor refused is an EdgeError
    naming it, with the closest known name when it looks like a typo."""
    known = set(known)
    for name, value in body.items():
        where = prefix + name
        if name in refused and value not in (None, "", [], {}, False):
            raise EdgeError("bad_request", f"{where}: not supported ({refused[name]})", param=where)
        if name not in known and name not in refused:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise EdgeError("bad_request", f"{where}: unknown field{hint}", param=where)


def describe_validation(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "payload"
        message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def streams_deltas(request: Envelope, params: GenerationParams) -> bool:
    """Whether the worker sends a request's output as text deltas while it is generated: the one place this is
    decided, for every transport. Only free text streams: output shaped by a JSON schema or a tool call is known
    valid only once complete, so it goes whole with the final reply (a streaming HTTP client gets it as one
    chunk then)."""
    return bool(getattr(request, "stream", False)) and params.json_schema is None
