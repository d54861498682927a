"""An OpenAI-compatible HTTP API inside the daemon: the same worker queue, engine and limits as MQTT.

Off by default, on 127.0.0.1 by default; any other address needs an API key (Settings enforces it).
Errors use OpenAI's shape and status codes, so the openai SDK and LangChain report them as they would.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from edgellm.daemon.engine.chat import ChatMessage, ToolCall
from edgellm.daemon.engine.constrain.tools import Tool, ToolChoice
from edgellm.daemon.errors import CommandError, EdgeError
from edgellm.daemon.serve.metrics import Metrics
from edgellm.daemon.serve.replies import Event, Failed, Finished, Generated, Reply, TextDelta
from edgellm.daemon.serve.served import ServedModels
from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.serve.wire import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    encode_json,
    load_json,
    validation_error,
)
from edgellm.daemon.serve.worker import Job, Worker

log = logging.getLogger("edgellm.http")
HTTP_PARAMS = {"json_schema": "response_format"}  # wire field -> the OpenAI parameter it came from
STATUS = {"bad_request": 400, "unknown_method": 404, "too_large": 413, "unsupported_media": 415, "busy": 429,
          "deadline_exceeded": 504, "cancelled": 503, "model_unavailable": 503, "internal": 500}


def openai_error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            413: "invalid_request_error", 415: "invalid_request_error",
            429: "rate_limit_exceeded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# -- request shapes: OpenAI's, with the fields we do not use ignored and the ones we cannot honour refused --
class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # unknown fields pass, as OpenAI's; wrong types do not


class FunctionCallIn(_OpenAI):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_OpenAI):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def parsed(self, where: str) -> ToolCall:
        try:
            arguments = json.loads(self.function.arguments or "{}")
        except json.JSONDecodeError as e:
            raise EdgeError("bad_request", f"{where}.function.arguments: not JSON ({e.msg})",
                            param="messages") from None
        if not isinstance(arguments, dict):
            raise EdgeError("bad_request", f"{where}.function.arguments: must be a JSON object", param="messages")
        return ToolCall(id=self.id, name=self.function.name, arguments=arguments)


class MessageIn(_OpenAI):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Sampling(_OpenAI):
    model: str = "default"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool | None = None  # llama-server's extension, for fixed-length answers

    def params(self) -> dict[str, Any]:
        if self.n != 1:
            raise EdgeError("bad_request", "n: only 1 completion per request is supported", param="n")
        out = {"max_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
               "top_p": self.top_p, "seed": self.seed, "ignore_eos": self.ignore_eos,
               "stop": [self.stop] if isinstance(self.stop, str) else self.stop, "stream": self.stream}
        return {k: v for k, v in out.items() if v is not None}


class ChatCompletionRequest(_Sampling):
    messages: list[MessageIn]
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # at most one call per turn is made either way

    def to_wire(self) -> ChatRequest:
        extra: dict[str, Any] = {"tools": self.tools or [], "tool_choice": self.tool_choice}
        fmt = self.response_format or {"type": "text"}
        kind = fmt.get("type")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise EdgeError("bad_request", "response_format.json_schema.schema: give a JSON Schema object",
                                param="response_format.json_schema.schema")
            extra["json_schema"] = schema
        elif kind == "json_object":
            extra["json_schema"] = {"type": "object"}
        elif kind != "text":  # anything else would silently be free text: fail closed
            raise EdgeError("bad_request", f"response_format.type: {kind!r} is not supported; use 'text', "
                            "'json_object' or 'json_schema'", param="response_format.type")
        return ChatRequest(messages=self.history(), **self.params(), **extra)

    def history(self) -> list[ChatMessage]:
        """OpenAI's messages as the engine's: a call's arguments parsed, a tool result named after its call."""
        called: dict[str, str] = {}
        out = []
        for i, m in enumerate(self.messages):
            calls = [c.parsed(f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls or [])]
            called.update((c.id, c.name) for c in calls)
            name = m.name or called.get(m.tool_call_id or "") if m.role == "tool" else None
            out.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text(),
                                   tool_calls=calls or None, tool_call_id=m.tool_call_id if m.role == "tool" else None,
                                   name=name))
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def to_wire(self) -> GenerateRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise EdgeError("bad_request", "prompt: give exactly one prompt", param="prompt")
        return GenerateRequest(prompt=prompts[0], raw=True, **self.params())


class EmbeddingRequest(_OpenAI):
    model: str = "default"
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input", mode="before")
    @classmethod
    def _text_not_token_ids(cls, value):
        """Token ids are the client's tokenizer's (OpenAI's tiktoken), not the embedding model's: refused with
        the fix rather than embedded as nonsense."""
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) or (isinstance(v, list) and v and all(isinstance(t, int) for t in v))
               for v in items):
            raise ValueError("send text, not token ids (they are the client's tokenizer's, not this model's); "
                             "with LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False)")
        return value


def authorized(headers: Headers, key: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


class Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware gets in the way of disconnect detection): the API
    key, as 'Authorization: Bearer KEY' only, and a declared Content-Length over the limit."""

    def __init__(self, app, key: str | None, limit: int):
        self.app, self.key, self.limit = app, key, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refused = None
            if self.key and scope["path"].startswith(("/v1/", "/metrics")):
                if not authorized(headers, self.key):
                    refused = openai_error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                           "invalid_api_key")
            declared = headers.get("content-length") or "0"
            size = int(declared) if declared.isdigit() else 0
            if refused is None and size > self.limit:
                refused = openai_error(413, f"request body is {size} bytes; the limit is {self.limit}", "too_large")
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class QueueSink:
    """Delivers a Job's replies, made on the worker thread, to the request's event loop.

    With `stall` seconds and `on_stall`, a consumer that leaves an event untaken that long is taken for a
    client that stopped reading (its socket buffer is full, so the response is stuck in a send): `on_stall`
    runs once, on the worker thread, so the request stops holding a decode slot for nobody."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float | None = None,
                 on_stall: Callable[[], None] = lambda: None):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.stall, self.on_stall = stall, on_stall
        self._sent_at: collections.deque[float] = collections.deque()  # untaken events' send times, oldest first
        self._stalled = False

    def send(self, request_id: str, event: Event) -> None:
        now = time.monotonic()
        if self.stall is not None and not self._stalled and self._sent_at and now - self._sent_at[0] > self.stall:
            self._stalled = True
            self.on_stall()
        self._sent_at.append(now)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def take(self) -> Event:
        event = await self.queue.get()
        self._sent_at.popleft()
        return event


def create_app(settings: Settings, worker: Worker, models: ServedModels, metrics: Metrics,
               mqtt_health: Callable[[], dict] = lambda: {"connected": True, "state": "connected"}) -> FastAPI:
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    key = settings.http.key()
    limit = settings.limits.max_payload_bytes
    stall = settings.limits.stream_stall_seconds

    def model_name() -> str:
        return models.served.model_info.name

    app.add_middleware(Guard, key=key, limit=limit)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return openai_error(400, f"{param or 'body'}: {first['msg']}", "invalid_request", param)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _exc: ClientDisconnect):
        """A client that hangs up while sending its body: one line, no traceback; nobody reads the reply."""
        log.info("%s %s: the client hung up before its request body was complete", request.method,
                 request.url.path)
        return Response(status_code=499)

    @app.exception_handler(EdgeError)
    async def edge_error(_request, exc: EdgeError):
        return openai_error(STATUS[exc.code], exc.message, exc.code, HTTP_PARAMS.get(exc.param, exc.param))

    def check_model(name: str) -> JSONResponse | None:
        """The model, 'default', or a LoRA adapter loaded beside it (by its name, as vLLM serves adapters)."""
        adapters = models.served.adapters
        if name in ("default", model_name(), *adapters):
            return None
        listed = ", ".join(f"'{n}'" for n in [model_name(), *adapters])
        return openai_error(404, f"model '{name}' is not served here; GET /v1/models lists {listed} "
                            "(or say 'default')", "model_not_found", "model")

    async def submit(method: str, wire, streamed: bool = False) -> tuple[Job, QueueSink]:
        request_id = uuid.uuid4().hex[:16]

        def stalled() -> None:
            if worker.cancel(request_id, f"the HTTP client read nothing for {stall:g} s (limits.stream_stall_seconds)"):
                metrics.stats.stall()
                log.info("request %s: the client stopped reading its stream; cancelled", request_id)

        sink = QueueSink(asyncio.get_running_loop(), stall if streamed else None, stalled)
        job = Job(method, wire, request_id, sink)
        worker.submit(job)  # EdgeError('busy') becomes 429
        return job, sink

    def hang_up(job: Job) -> None:
        if worker.cancel(job.request_id, "the HTTP client went away"):
            metrics.stats.disconnected()

    async def events(job: Job, sink: QueueSink) -> AsyncIterator[Event]:
        """The job's events in order, up to its final one. Leaving early (the client hung up: Starlette
        cancels a streaming response, or the watcher below cancels a plain one) cancels the job."""
        finished = False
        try:
            while True:
                event = await sink.take()
                finished = not isinstance(event, TextDelta)
                yield event
                if finished:
                    return
        finally:
            if not finished:
                hang_up(job)

    async def final_of(job: Job, sink: QueueSink, request: Request) -> Reply:
        """The reply of a request answered whole; a client that hangs up meanwhile cancels it at once."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            hang_up(job)

        watcher = asyncio.create_task(watch())
        try:
            async for event in events(job, sink):
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    return event.reply
        finally:
            watcher.cancel()
        raise EdgeError("internal", "the request ended without a final reply")

    def content_of(reply: Generated) -> str | None:
        if reply.tool_calls and not reply.result.text:
            return None
        return json.dumps(reply.result.json, ensure_ascii=False) if reply.json_mode else reply.result.text

    def tool_calls_of(reply: Generated, streamed: bool = False) -> list[dict]:
        return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                for i, c in enumerate(reply.tool_calls)]

    def usage_of(reply: Generated) -> dict:
        u = reply.result.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit, whether its length was declared or it
        arrives chunked: never more than the limit is held in memory."""
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise EdgeError("too_large", f"request body is over the limit of {limit} bytes")
        return bytes(body)

    async def parse(model: type[BaseModel], request: Request):
        data = load_json(await read_body(request), "body")
        if not isinstance(data, dict):
            raise EdgeError("bad_request", "body: must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def wire_of(body: ChatCompletionRequest | CompletionRequest):
        try:
            wire = body.to_wire()
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model in models.served.adapters:
            wire.adapter = body.model  # the base with this adapter beside it, for this request only
        return wire

    def sse(obj: dict | str) -> bytes:
        return b"data: " + (obj.encode() if isinstance(obj, str) else encode_json(obj)) + b"\n\n"

    async def stream_events(job: Job, sink: QueueSink, chunk: Callable[[dict], dict],
                            include_usage: bool) -> AsyncIterator[bytes]:
        async for event in events(job, sink):
            if isinstance(event, TextDelta):
                yield sse(chunk({"text": event.text}))
            elif isinstance(event, Failed):
                yield sse({"error": {"message": event.error.message, "type": "server_error",
                                     "code": event.error.code}})
            else:
                reply = event.reply
                if reply.json_mode:  # constrained output is streamed whole at the end, already validated
                    yield sse(chunk({"text": content_of(reply)}))
                elif reply.tool_calls:  # as OpenAI streams a call: its id and name, then its arguments
                    for call in tool_calls_of(reply, streamed=True):
                        arguments = call["function"]["arguments"]
                        yield sse(chunk({"tool_calls": [{**call, "function": {**call["function"], "arguments": ""}}]}))
                        yield sse(chunk({"tool_calls": [{"index": call["index"],
                                                         "function": {"arguments": arguments}}]}))
                yield sse(chunk({"finish_reason": reply.result.finish_reason}))
                if include_usage:
                    yield sse(chunk({"usage": usage_of(reply)}))
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(ChatCompletionRequest, request)
        if (refused := check_model(body.model)) is not None:
            return refused
        wire = wire_of(body)
        if wire.json_schema is not None or (wire.tools and wire.tool_choice != "none"):
            wire.stream = False  # deltas of constrained output are not validated yet: send it whole
        job, sink = await submit("chat", wire, streamed=body.stream)
        completion_id, created = f"chatcmpl-{job.request_id}", int(time.time())
        answering = wire.adapter or model_name()  # an adapter answers under its own name, as vLLM does
        if body.stream:
            first = [True]

            def chunk(part: dict) -> dict:
                delta = ({"content": part["text"]} if "text" in part else
                         {"tool_calls": part["tool_calls"]} if "tool_calls" in part else {})
                if first[0] and delta:
                    delta, first[0] = {"role": "assistant", **delta}, False
                out = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": answering, "choices": [] if "usage" in part else
                       [{"index": 0, "delta": delta, "finish_reason": part.get("finish_reason")}]}
                if "usage" in part:
                    out["usage"] = part["usage"]
                return out

            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(job, sink, chunk, include_usage),
                                     media_type="text/event-stream")
        reply = await final_of(job, sink, request)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": answering,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content_of(reply),
                                                     **({"tool_calls": tool_calls_of(reply)} if reply.tool_calls
                                                        else {})},
                             "finish_reason": reply.result.finish_reason, "logprobs": None}],
                "usage": usage_of(reply)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(CompletionRequest, request)
        if (refused := check_model(body.model)) is not None:
            return refused
        wire = wire_of(body)
        job, sink = await submit("generate", wire, streamed=body.stream)
        completion_id, created = f"cmpl-{job.request_id}", int(time.time())
        answering = wire.adapter or model_name()
        if body.stream:
            def chunk(part: dict) -> dict:
                return {"id": completion_id, "object": "text_completion", "created": created, "model": answering,
                        "choices": [{"index": 0, "text": part.get("text", ""), "logprobs": None,
                                     "finish_reason": part.get("finish_reason")}], **(
                            {"usage": part["usage"]} if "usage" in part else {})}

            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(job, sink, chunk, include_usage),
                                     media_type="text/event-stream")
        reply = await final_of(job, sink, request)
        return {"id": completion_id, "object": "text_completion", "created": created, "model": answering,
                "choices": [{"index": 0, "text": reply.result.text, "logprobs": None,
                             "finish_reason": reply.result.finish_reason}], "usage": usage_of(reply)}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse(EmbeddingRequest, request)
        embedder = models.served.require_embedder()
        if body.model not in ("default", embedder.name):
            return openai_error(404, f"model '{body.model}' is not served here; embeddings come from "
                                f"'{embedder.name}' (or say 'default')", "model_not_found", "model")
        job, sink = await submit("embed", EmbedRequest(input=body.input))
        reply = await final_of(job, sink, request)
        data = []
        for i, vector in enumerate(reply.vectors):
            value = (base64.b64encode(vector.astype(np.float32).tobytes()).decode()
                     if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": reply.model.name,
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    @app.get("/v1/models")
    async def list_models():
        served = models.served
        names = [model_name()] + ([served.embedder.name] if served.embedder else [])
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "edgellm"} for n in names]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "edgellm", "parent": model_name()}
                 for n in served.adapters]  # LoRA adapters, as vLLM lists them
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(request: Request):
        """200 when the model serves and the broker is connected; 503 naming what is wrong otherwise. Where the
        broker is and why it cannot be reached are shown to a caller with the API key only."""
        try:
            model = models.served.model_info
        except Exception as e:  # no model: the engine cannot answer
            return openai_error(503, f"no model is loaded: {e}", "model_unavailable")
        mqtt = mqtt_health()
        if not (key and authorized(request.headers, key)):
            mqtt = {"connected": mqtt["connected"], "state": mqtt.get("state", "connected")}
        body = {"status": "ok" if mqtt["connected"] else "degraded", "model": asdict(model),
                "queue_depth": worker.depth, "mqtt": mqtt}
        return JSONResponse(body, 200 if mqtt["connected"] else 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def not_found(path: str):
        return openai_error(404, f"/{path} does not exist; see /v1/models, /v1/chat/completions, "
                            "/v1/completions, /v1/embeddings, /health, /metrics", "not_found")

    return app


class HttpServer:
    """uvicorn in a thread of the daemon process (no second copy of the model), on a socket we open: its send
    buffer, which connections inherit, is fixed (http.send_buffer_kb), so a client that stops reading fills it
    after a bounded number of streamed tokens and its stream stalls visibly (QueueSink)."""

    def __init__(self, app: FastAPI, settings: Settings):
        http = settings.http
        config = uvicorn.Config(app, host=http.host, port=http.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=max(1, int(settings.limits.grace_seconds)))
        self.server = uvicorn.Server(config)
        self.socket = listening_socket(http.host, http.port, http.send_buffer_kb << 10)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="edgellm-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop_intake(self) -> None:
        self.server.should_exit = True

    def join(self, timeout: float = 30) -> None:
        self.thread.join(timeout)


def listening_socket(host: str, port: int, send_buffer: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CommandError(f"http.host/http.port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
