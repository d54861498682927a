"""MQTT's JSON shapes (docs/mqtt-api.md): the requests, parsed once and strictly, and the replies, rendered
from the worker's typed events. The OpenAI-compatible HTTP API builds the same request models."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import singledispatch
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.constrain.tools import Tool, ToolChoice
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.formats import AnswerMode
from edgellm.daemon.serve.replies import (
    Answered,
    Deleted,
    Embedded,
    Event,
    Failed,
    Found,
    Generated,
    Ingested,
    Reply,
    TextDelta,
)

ID_MAX = 128
_SURROGATE = re.compile("[\ud800-\udfff]")


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


MAX_DEPTH = 64  # JSON nesting: a legitimate request or schema is far shallower; deeper would exhaust recursion


def load_json(payload: bytes, what: str = "payload") -> Any:
    """Bytes to a JSON value, or EdgeError('bad_request') naming the problem: not UTF-8, not JSON, nested
    deeper than MAX_DEPTH, or holding a lone UTF-16 surrogate (legal in JSON, unencodable in UTF-8)."""
    value = _decode_json(payload, what)
    check_json_value(value, what)
    return value


def _decode_json(payload: bytes, what: str) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError("bad_request", f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise EdgeError("bad_request", f"{what} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise EdgeError("bad_request", f"{what} is nested too deeply; at most {MAX_DEPTH} levels") from None
    return value


def check_json_value(value: Any, what: str = "payload") -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with lone surrogates, without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise EdgeError("bad_request", f"{where or what}: nested too deeply; at most {MAX_DEPTH} levels",
                                param=where.split(".")[0] or None)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and has_surrogate(key):
                    raise EdgeError("bad_request", f"{where or what}: a key holds a lone UTF-16 surrogate",
                                    param=where.split(".")[0] or None)
                stack.append((child, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(item, str) and has_surrogate(item):
            raise EdgeError("bad_request", f"{where or what}: holds a lone UTF-16 surrogate (such as \\ud800), "
                            "which is not text; send valid Unicode", param=where.split(".")[0] or None)


def has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def scrub(value: Any) -> Any:
    """A copy of a JSON value whose strings can be encoded: lone surrogates become U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def encode_json(message: Any) -> bytes:
    """UTF-8 JSON for the wire. Never raises on text: whatever we echo is made encodable first."""
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(scrub(message), ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class Incoming:
    """A request payload parsed once: its envelope (best effort, so even a bad request can be answered) and
    either the validated request or the error to answer with."""

    id: str | None = None
    reply_to: str | None = None
    request: Envelope | None = None
    error: EdgeError | None = None


def parse_request(method: str, payload: bytes, methods: dict[str, type[Envelope]] = METHODS) -> Incoming:
    try:
        data = _decode_json(payload, "payload")
    except EdgeError as e:
        return Incoming(error=e)
    incoming = Incoming()
    if isinstance(data, dict):  # before any other check, so that every error can be answered and matched
        for key in ("id", "reply_to"):
            value = data.get(key)
            if isinstance(value, str) and 0 < len(value) <= 1024:  # a reply address is checked as it was sent
                setattr(incoming, key, scrub(value) if key == "id" else value)
    try:
        check_json_value(data)
    except EdgeError as e:
        incoming.error = e
        return incoming
    if method not in methods:
        incoming.error = EdgeError("unknown_method", f"method '{method}' does not exist; use one of: "
                                   f"{', '.join(methods)}")
    elif not isinstance(data, dict):
        incoming.error = EdgeError("bad_request", "payload must be a JSON object")
    else:
        try:
            incoming.request = methods[method].model_validate(data)
        except ValidationError as e:
            incoming.error = validation_error(e)
    return incoming


def validation_error(error: ValidationError) -> EdgeError:
    """EdgeError('bad_request') naming up to five fields and what is wrong with each; `param` is the first."""
    errors = error.errors()
    first = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return EdgeError("bad_request", describe_validation(error), param=first)


def describe_validation(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "payload"
        message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def error_reply(request_id: str | None, error: EdgeError) -> dict[str, Any]:
    return {"type": "result", "ok": False, "id": request_id, "error": error.to_dict()}


def render(request_id: str, event: Event) -> dict[str, Any]:
    """An event of the worker as the MQTT message docs/mqtt-api.md describes."""
    if isinstance(event, TextDelta):
        delta = {"type": "delta", "id": request_id, "seq": event.seq, "text": event.text}
        return {**delta, "replayed": True} if event.replayed else delta
    if isinstance(event, Failed):
        return error_reply(request_id, event.error)
    return {"type": "result", "ok": True, "id": request_id, **reply_body(event.reply)}


@singledispatch
def reply_body(reply: Reply) -> dict[str, Any]:
    raise TypeError(f"no MQTT shape for {type(reply).__name__}")


@reply_body.register
def _(reply: Generated) -> dict[str, Any]:
    r = reply.result
    body: dict[str, Any] = {"finish_reason": r.finish_reason, "usage": asdict(r.usage),
                            "timings": {k: round(v, 2) for k, v in asdict(r.timings).items()},
                            "model": asdict(reply.model)}
    if reply.json_mode:
        body["json"] = r.json
    else:
        body["text"] = r.text
    if reply.tool_calls:
        body["tool_calls"] = [c.model_dump() for c in reply.tool_calls]
    return body


@reply_body.register
def _(reply: Embedded) -> dict[str, Any]:
    return {"embeddings": reply.vectors.tolist(), "dimension": int(reply.vectors.shape[1]),
            "model": asdict(reply.model)}


@reply_body.register
def _(reply: Ingested) -> dict[str, Any]:
    return asdict(reply.report)


@reply_body.register
def _(reply: Found) -> dict[str, Any]:
    return {"hits": [h.to_dict() for h in reply.hits]}


@reply_body.register
def _(reply: Answered) -> dict[str, Any]:
    return {**asdict(reply.answer), "model": asdict(reply.model)}


@reply_body.register
def _(reply: Deleted) -> dict[str, Any]:
    return {"deleted_chunks": reply.chunks}
