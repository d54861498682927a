"""The JSON shapes of requests and replies, shared by MQTT (docs/mqtt-api.md) and the local clients."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daemon.chat import ChatMessage
from daemon.errors import EdgeError
from daemon.params import GenerationParams

ID_MAX = 128


class Envelope(BaseModel):
    """Fields every request may carry; `reply_to` and `id` are the MQTT 3.1.1 fallback for properties."""

    model_config = ConfigDict(extra="forbid")
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


def peek_envelope(payload: bytes) -> dict[str, str]:
    """Best-effort id and reply_to from a payload that may be invalid, so even a bad request can be answered."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("id", "reply_to") if isinstance(data.get(k), str) and 0 < len(data[k]) <= 1024}


def parse_request(method: str, payload: bytes, methods: dict[str, type[Envelope]] = METHODS) -> Envelope:
    if method not in methods:
        raise EdgeError("unknown_method", f"method '{method}' does not exist; use one of: {', '.join(methods)}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError("bad_request", f"payload is not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise EdgeError("bad_request", f"payload is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise EdgeError("bad_request", "payload must be a JSON object")
    try:
        return methods[method].model_validate(data)
    except ValidationError as e:
        raise EdgeError("bad_request", describe_validation(e)) from None


def describe_validation(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "payload"
        message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def error_reply(request_id: str | None, error: EdgeError) -> dict[str, Any]:
    return {"type": "result", "ok": False, "id": request_id, "error": error.to_dict()}
