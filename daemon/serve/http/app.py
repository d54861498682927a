"""An OpenAI-compatible HTTP API inside the daemon: the same worker queue, engine and limits as MQTT.

Off by default, on 127.0.0.1 by default; any other address needs an API key (Settings enforces it). The
routes read a body, translate it (openai.py), queue it on the worker, and send its events back as one JSON
response or a server-sent event stream; errors use OpenAI's shape and status codes, so the openai SDK and
LangChain report them as they would.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.http.openai import (
    RENDERERS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIBody,
    check_dimensions,
    edge_error_response,
    embeddings,
    model_list,
    model_object,
    openai_error,
    stream_error,
)
from edgellm.daemon.serve.http.transport import ErrorLog, Guard, QueueSink, authorized
from edgellm.daemon.serve.jsontext import encode_json, load_json
from edgellm.daemon.serve.metrics import Metrics
from edgellm.daemon.serve.replies import Event, Failed, Finished, Reply, TextDelta
from edgellm.daemon.serve.requests import EmbedRequest, Envelope, validation_error
from edgellm.daemon.serve.served import ServedModels
from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.serve.worker import Job, Worker

log = logging.getLogger("edgellm.http")


def create_app(settings: Settings, worker: Worker, models: ServedModels, metrics: Metrics,
               mqtt_health: Callable[[], dict] = lambda: {"connected": True, "state": "connected"}) -> FastAPI:
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    key = settings.http.key()
    limit = settings.limits.max_payload_bytes
    stall = settings.limits.stream_stall_seconds

    def model_name() -> str:
        return models.served.model_info.name

    app.add_middleware(Guard, key=key, limit=limit)
    app.add_middleware(ErrorLog, count=metrics.stats.error)  # outermost: it sees the Guard's refusals too

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
        return edge_error_response(exc)

    def unknown_model(name: str) -> JSONResponse | None:
        """None for the model, 'default', or a LoRA adapter loaded beside it (by its name, as vLLM serves
        adapters); a 404 naming what is served otherwise."""
        adapters = models.served.adapters
        if name in ("default", model_name(), *adapters):
            return None
        listed = ", ".join(f"'{n}'" for n in [model_name(), *adapters])
        return openai_error(404, f"model '{name}' is not served here; GET /v1/models lists {listed} "
                            "(or say 'default')", "model_not_found", "model")

    async def submit(method: str, request: Envelope, streamed: bool = False) -> tuple[Job, QueueSink]:
        request_id = uuid.uuid4().hex[:16]

        def stalled() -> None:
            if worker.cancel(request_id, f"the HTTP client read nothing for {stall:g} s (limits.stream_stall_seconds)"):
                metrics.stats.stall()
                log.info("request %s: the client stopped reading its stream; cancelled", request_id)

        sink = QueueSink(asyncio.get_running_loop(), stall if streamed else None, stalled)
        job = Job(method, request, request_id, sink)
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
                    request.state.counted = True  # the worker counted it (ErrorLog counts the others)
                    raise event.error
                if isinstance(event, Finished):
                    return event.reply
        finally:
            watcher.cancel()
        raise EdgeError("internal", "the request ended without a final reply")

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
        if issubclass(model, OpenAIBody):
            model.check_fields(data)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def sse(obj: dict | str) -> bytes:
        return b"data: " + (obj.encode() if isinstance(obj, str) else encode_json(obj)) + b"\n\n"

    async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest):
        """A completion, chat or text, answered whole or as a stream: the one place an HTTP response's shape is
        chosen (what the worker streams is decided once, in requests.streams_deltas)."""
        if (refused := unknown_model(body.model)) is not None:
            return refused
        try:
            wire = body.to_request()
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model in models.served.adapters:
            wire.adapter = body.model  # the base with this adapter beside it, for this request only
        job, sink = await submit(body.method, wire, streamed=body.stream)
        render = RENDERERS[type(body)](job.request_id, wire.adapter or model_name())  # an adapter answers
        if not body.stream:                                                           # under its own name
            return render.whole(await final_of(job, sink, request))

        async def chunks() -> AsyncIterator[bytes]:
            async for event in events(job, sink):
                if isinstance(event, TextDelta):
                    yield sse(render.text(event.text, event.logprobs))
                elif isinstance(event, Failed):
                    yield sse(stream_error(event.error))
                else:
                    for chunk in render.final(event.reply, body.include_usage):
                        yield sse(chunk)
            yield sse("[DONE]")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, await parse(ChatCompletionRequest, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, await parse(CompletionRequest, request))

    @app.post("/v1/embeddings")
    async def embed(request: Request):
        body = await parse(EmbeddingRequest, request)
        embedder = models.served.require_embedder()
        if body.model not in ("default", embedder.name):
            return openai_error(404, f"model '{body.model}' is not served here; embeddings come from "
                                f"'{embedder.name}' (or say 'default')", "model_not_found", "model")
        check_dimensions(body.dimensions, embedder.dimension, embedder.name)
        job, sink = await submit("embed", EmbedRequest(input=body.input))
        return embeddings(await final_of(job, sink, request), body.encoding_format)

    def listed() -> dict:
        served = models.served
        return model_list(model_name(), served.embedder.name if served.embedder else None, served.adapters)

    @app.get("/v1/models")
    async def list_models():
        return listed()

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        found = model_object(name, everything := listed())
        if found is None:
            names = ", ".join(f"'{m['id']}'" for m in everything["data"])
            return openai_error(404, f"model '{name}' is not served here; served: {names}", "model_not_found",
                                "model")
        return found

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

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def not_found(request: Request, path: str):
        """A route asked with the wrong method is 405 with the methods it takes; a path that is no route, 404."""
        allowed = sorted({m for r in app.routes if getattr(r, "path", None) not in (None, "/{path:path}")
                          and r.matches({"type": "http", "path": f"/{path}", "method": "GET"})[0] != Match.NONE
                          for m in r.methods} - {"HEAD"})
        if allowed:
            refused = openai_error(405, f"{request.method} /{path}: this route takes {', '.join(allowed)}",
                                   "method_not_allowed")
            refused.headers["allow"] = ", ".join(allowed)
            return refused
        return openai_error(404, f"/{path} does not exist; see /v1/models, /v1/chat/completions, "
                            "/v1/completions, /v1/embeddings, /health, /metrics", "not_found")

    return app
