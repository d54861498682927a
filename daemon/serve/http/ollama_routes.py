"""Ollama's routes (/api/...) over the same worker and engine as the OpenAI routes, behind the same key and
limits; the translation both ways is ollama.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from edgellm.daemon.engine.manifest import MANIFEST_NAME, ModelManifest
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.embedder import Embedder
from edgellm.daemon.serve.http.dispatch import Dispatch
from edgellm.daemon.serve.http.ollama import (
    LATEST,
    OLLAMA_VERSION,
    OllamaAnswer,
    OllamaChat,
    OllamaEmbed,
    OllamaGenerate,
    OllamaLegacyEmbed,
    OllamaShow,
    embed_response,
    model_entry,
    model_ref,
    ollama_error,
    show_response,
)
from edgellm.daemon.serve.http.openai import check_dimensions
from edgellm.daemon.serve.jsontext import encode_json
from edgellm.daemon.serve.replies import Failed, TextDelta
from edgellm.daemon.serve.requests import ChatRequest, EmbedRequest, validation_error

NDJSON = "application/x-ndjson"
FOREVER = "2318-11-20T00:00:00Z"  # /api/ps's expires_at: the daemon never unloads its model on a timer


def folder_size(manifest: ModelManifest) -> int:
    return sum(f.size for f in manifest.files.values())


def add_ollama_routes(app: FastAPI, dispatch: Dispatch) -> None:
    models = dispatch.models

    def loaded() -> list[tuple[ModelManifest, Path]]:
        """(manifest, folder) of each model served: the chat model, then the embedder."""
        served = dispatch.models.served
        out = [(served.generator.model.manifest, served.generator.model.folder)]
        if served.embedder is not None:
            out.append((served.embedder.manifest, served.embedder.folder))
        return out

    def unknown(name: str, what: str = "model") -> JSONResponse:
        names = ", ".join(f"'{m.name}{LATEST}'" for m, _ in loaded())
        return ollama_error(404, f"{what} '{name}' not found; this device serves {names}", "model_not_found")

    async def answer(request: Request, body: OllamaChat | OllamaGenerate):
        ref = model_ref(body.model)
        if not dispatch.serves(ref):
            return unknown(body.model)
        try:
            wire = body.to_request()
        except ValidationError as e:
            raise validation_error(e) from None
        if ref in models.served.adapters:
            wire.adapter = ref
        method = "chat" if isinstance(wire, ChatRequest) else "generate"  # /api/generate with a system: a chat
        job, sink = await dispatch.submit(method, wire, streamed=body.stream)
        render = OllamaAnswer((wire.adapter or dispatch.model_name) + LATEST, chat=isinstance(body, OllamaChat))
        if not body.stream:
            return render.final(await dispatch.final_of(job, sink, request), streamed=False)

        async def lines() -> AsyncIterator[bytes]:
            async for event in dispatch.events(job, sink):
                if isinstance(event, TextDelta):
                    yield encode_json(render.text(event.text, event.logprobs)) + b"\n"
                elif isinstance(event, Failed):  # after the status line: as Ollama does, an error line
                    yield encode_json({"error": event.error.message}) + b"\n"
                else:
                    yield encode_json(render.final(event.reply, streamed=True)) + b"\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    @app.post("/api/chat")
    async def chat(request: Request):
        return await answer(request, await dispatch.parse(OllamaChat, request))

    @app.post("/api/generate")
    async def generate(request: Request):
        return await answer(request, await dispatch.parse(OllamaGenerate, request))

    def embedder_for(name: str) -> Embedder | None:
        """The embedding model if `name` is it (or 'default'); None otherwise."""
        embedder = models.served.require_embedder()
        return embedder if model_ref(name) in ("default", embedder.name) else None

    @app.post("/api/embed")
    async def embed(request: Request):
        body = await dispatch.parse(OllamaEmbed, request)
        if (embedder := embedder_for(body.model)) is None:
            return unknown(body.model, "embedding model")
        check_dimensions(body.dimensions, embedder.dimension, embedder.name)
        reply = await dispatch.run("embed", EmbedRequest(input=body.input), request)
        return embed_response(reply, embedder.name + LATEST)

    @app.post("/api/embeddings")  # the older route: one prompt, one vector
    async def embeddings(request: Request):
        body = await dispatch.parse(OllamaLegacyEmbed, request)
        if embedder_for(body.model) is None:
            return unknown(body.model, "embedding model")
        reply = await dispatch.run("embed", EmbedRequest(input=body.prompt), request)
        return {"embedding": reply.vectors[0].tolist()}

    @app.get("/api/tags")
    async def tags():
        return {"models": [model_entry(m, modified(folder), folder_size(m)) for m, folder in loaded()]}

    @app.post("/api/show")
    async def show(request: Request):
        body = await dispatch.parse(OllamaShow, request)
        for manifest, folder in loaded():
            if model_ref(body.model) in (manifest.name, "default"):
                return show_response(manifest, modified(folder), _template_source(manifest, folder))
        return unknown(body.model)

    @app.get("/api/ps")
    async def ps():
        since = datetime.fromtimestamp(models.served.loaded_at, UTC).isoformat()
        running = []
        for manifest, folder in loaded():
            entry = model_entry(manifest, modified(folder), folder_size(manifest))
            g = manifest.generation
            running.append({**entry, "expires_at": FOREVER, "size_vram": 0, "loaded_at": since,
                            **({"context_length": g.context_length} if g else {})})
        return {"models": running}

    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION}


def modified(folder: Path) -> float:
    return (folder / MANIFEST_NAME).stat().st_mtime


def _template_source(manifest: ModelManifest, folder: Path) -> str | None:
    """The chat template's text, read when /api/show asks for it (an embedding model has none)."""
    name = manifest.generation.chat_template if manifest.generation else None
    if not name:
        return None
    try:
        return (folder / name).read_text()
    except OSError as e:
        raise EdgeError("model_unavailable", f"{folder / name}: cannot read the chat template: {e}") from None
