"""The HTTP API inside the daemon, OpenAI's dialect under /v1 and Ollama's under /api (ollama_routes.py): the
same worker queue, engine and limits as MQTT.

Off by default, on 127.0.0.1 by default; any other address needs an API key (Settings enforces it). The
routes read a body, translate it (openai.py, ollama.py), queue it on the worker (dispatch.py), and send its
events back as one JSON response or a stream; errors use each dialect's shape and status codes, so the openai
SDK, LangChain and the ollama clients report them as they would.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.http.dispatch import Dispatch
from edgellm.daemon.serve.http.ollama import edge_error_for, error_for
from edgellm.daemon.serve.http.ollama_routes import add_ollama_routes
from edgellm.daemon.serve.http.openai import (
    RENDERERS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    check_dimensions,
    embeddings,
    model_list,
    model_object,
    openai_error,
    stream_error,
)
from edgellm.daemon.serve.http.transport import ErrorLog, Guard, authorized
from edgellm.daemon.serve.jsontext import encode_json
from edgellm.daemon.serve.metrics import Metrics
from edgellm.daemon.serve.replies import Failed, TextDelta
from edgellm.daemon.serve.requests import EmbedRequest, validation_error
from edgellm.daemon.serve.served import ServedModels
from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.serve.worker import Worker

log = logging.getLogger("edgellm.http")


def create_app(settings: Settings, worker: Worker, models: ServedModels, metrics: Metrics,
               mqtt_health: Callable[[], dict] = lambda: {"connected": True, "state": "connected"}) -> FastAPI:
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    key = settings.http.key()
    limit = settings.limits.max_payload_bytes
    stall = settings.limits.stream_stall_seconds

    app.add_middleware(Guard, key=key, limit=limit)
    app.add_middleware(ErrorLog, count=metrics.stats.error)  # outermost: it sees the Guard's refusals too

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_for(request.url.path, 400, f"{param or 'body'}: {first['msg']}", "invalid_request", param)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _exc: ClientDisconnect):
        """A client that hangs up while sending its body: one line, no traceback; nobody reads the reply."""
        log.info("%s %s: the client hung up before its request body was complete", request.method,
                 request.url.path)
        return Response(status_code=499)

    @app.exception_handler(EdgeError)
    async def edge_error(request: Request, exc: EdgeError):
        return edge_error_for(request.url.path, exc)

    dispatch = Dispatch(worker, models, metrics, limit, stall)

    def unknown_model(name: str) -> JSONResponse | None:
        """None for a model served here; a 404 naming what is served otherwise."""
        if dispatch.serves(name):
            return None
        listed = ", ".join(f"'{n}'" for n in [dispatch.model_name, *models.served.adapters])
        return openai_error(404, f"model '{name}' is not served here; GET /v1/models lists {listed} "
                            "(or say 'default')", "model_not_found", "model")

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
        job, sink = await dispatch.submit(body.method, wire, streamed=body.stream)
        render = RENDERERS[type(body)](job.request_id, wire.adapter or dispatch.model_name)  # an adapter answers
        if not body.stream:                                                           # under its own name
            return render.whole(await dispatch.final_of(job, sink, request))

        async def chunks() -> AsyncIterator[bytes]:
            async for event in dispatch.events(job, sink):
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
        return await complete(request, await dispatch.parse(ChatCompletionRequest, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, await dispatch.parse(CompletionRequest, request))

    @app.post("/v1/embeddings")
    async def embed(request: Request):
        body = await dispatch.parse(EmbeddingRequest, request)
        embedder = models.served.require_embedder()
        if body.model not in ("default", embedder.name):
            return openai_error(404, f"model '{body.model}' is not served here; embeddings come from "
                                f"'{embedder.name}' (or say 'default')", "model_not_found", "model")
        check_dimensions(body.dimensions, embedder.dimension, embedder.name)
        return embeddings(await dispatch.run("embed", EmbedRequest(input=body.input), request), body.encoding_format)

    def listed() -> dict:
        served = models.served
        return model_list(dispatch.model_name, served.embedder.name if served.embedder else None, served.adapters)

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
        """200 when the model serves and the broker is connected (or MQTT is off); 503 naming what is wrong
        otherwise. Where the broker is and why it cannot be reached are shown to a caller with the API key only."""
        try:
            model = models.served.model_info
        except Exception as e:  # no model: the engine cannot answer
            return openai_error(503, f"no model is loaded: {e}", "model_unavailable")
        mqtt = mqtt_health()
        if not (key and authorized(request.headers, key)):
            mqtt = {"connected": mqtt["connected"], "state": mqtt.get("state", "connected")}
        healthy = mqtt["connected"] or mqtt.get("state") == "disabled"  # HTTP-only: the model is all it needs
        body = {"status": "ok" if healthy else "degraded", "model": asdict(model),
                "queue_depth": worker.depth, "mqtt": mqtt}
        return JSONResponse(body, 200 if healthy else 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    add_ollama_routes(app, dispatch)

    @app.get("/")
    async def root():
        """Ollama's clients and integrations probe the root; so may a person with a browser."""
        return Response("edgellm is running: the OpenAI API under /v1, Ollama's under /api\n", media_type="text/plain")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def not_found(request: Request, path: str):
        """A route asked with the wrong method is 405 with the methods it takes; a path that is no route, 404."""
        allowed = sorted({m for r in app.routes if getattr(r, "path", None) not in (None, "/{path:path}")
                          and r.matches({"type": "http", "path": f"/{path}", "method": "GET"})[0] != Match.NONE
                          for m in r.methods} - {"HEAD"})
        where = request.url.path
        if allowed:
            refused = error_for(where, 405, f"{request.method} /{path}: this route takes {', '.join(allowed)}",
                                "method_not_allowed")
            refused.headers["allow"] = ", ".join(allowed)
            return refused
        return error_for(where, 404, f"/{path} does not exist; see /v1/models, /v1/chat/completions, "
                         "/v1/completions, /v1/embeddings, /api/chat, /api/generate, /api/embed, /api/tags, "
                         "/health, /metrics", "not_found")

    return app
