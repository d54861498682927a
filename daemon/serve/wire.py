"""MQTT's wire format (docs/mqtt-api.md): a payload parsed into a request once, with its envelope read first
so that even a bad request can be answered, and the worker's typed events rendered as MQTT replies. The
request shapes themselves are transport-neutral (edgellm/daemon/serve/requests.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import singledispatch
from typing import Any

from pydantic import ValidationError

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.jsontext import check_json_value, decode_json, scrub
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
    logprob_entries,
)
from edgellm.daemon.serve.requests import METHODS, Envelope, validation_error


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
        data = decode_json(payload, "payload")
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


def error_reply(request_id: str | None, error: EdgeError) -> dict[str, Any]:
    return {"type": "result", "ok": False, "id": request_id, "error": error.to_dict()}


def render(request_id: str, event: Event) -> dict[str, Any]:
    """An event of the worker as the MQTT message docs/mqtt-api.md describes."""
    if isinstance(event, TextDelta):
        delta = {"type": "delta", "id": request_id, "seq": event.seq, "text": event.text}
        if event.logprobs is not None:
            delta["logprobs"] = logprob_entries(event.logprobs)
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
    if r.logprobs is not None:
        body["logprobs"] = logprob_entries(r.logprobs)
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
