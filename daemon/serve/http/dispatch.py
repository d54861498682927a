"""What both HTTP dialects' routes (OpenAI's in app.py, Ollama's in ollama_routes.py) do the same way: read a
body within the size limit, parse it strictly, queue a worker request, and follow its events back, cancelling
the job when the client hangs up or stops reading."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import BaseModel, ValidationError

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.http.transport import QueueSink
from edgellm.daemon.serve.jsontext import load_json
from edgellm.daemon.serve.metrics import Metrics
from edgellm.daemon.serve.replies import Event, Failed, Finished, Reply, TextDelta
from edgellm.daemon.serve.requests import Envelope, validation_error
from edgellm.daemon.serve.served import ServedModels
from edgellm.daemon.serve.worker import Job, Worker

log = logging.getLogger("edgellm.http")


class Dispatch:
    def __init__(self, worker: Worker, models: ServedModels, metrics: Metrics, limit: int, stall: float):
        self.worker, self.models, self.metrics = worker, models, metrics
        self.limit, self.stall = limit, stall

    @property
    def model_name(self) -> str:
        return self.models.served.model_info.name

    def serves(self, name: str) -> bool:
        """The model, 'default', or a LoRA adapter loaded beside it (by its name, as vLLM serves adapters)."""
        return name in ("default", self.model_name, *self.models.served.adapters)

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit, whether its length was declared or it
        arrives chunked: never more than the limit is held in memory."""
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.limit:
                raise EdgeError("too_large", f"request body is over the limit of {self.limit} bytes")
        return bytes(body)

    async def parse(self, model: type[BaseModel], request: Request):
        """The body as `model`; its fields are checked first (`check_fields`: unknown ones are refused by name)."""
        data = load_json(await self.read_body(request), "body")
        if not isinstance(data, dict):
            raise EdgeError("bad_request", "body: must be a JSON object")
        model.check_fields(data)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def submit(self, method: str, request: Envelope, streamed: bool = False) -> tuple[Job, QueueSink]:
        request_id = uuid.uuid4().hex[:16]
        stall = self.stall

        def stalled() -> None:
            if self.worker.cancel(request_id, f"the HTTP client read nothing for {stall:g} s "
                                  "(limits.stream_stall_seconds)"):
                self.metrics.stats.stall()
                log.info("request %s: the client stopped reading its stream; cancelled", request_id)

        sink = QueueSink(asyncio.get_running_loop(), stall if streamed else None, stalled)
        job = Job(method, request, request_id, sink)
        self.worker.submit(job)  # EdgeError('busy') becomes 429
        return job, sink

    def hang_up(self, job: Job) -> None:
        if self.worker.cancel(job.request_id, "the HTTP client went away"):
            self.metrics.stats.disconnected()

    async def events(self, job: Job, sink: QueueSink) -> AsyncIterator[Event]:
        """The job's events in order, up to its final one. Leaving early (the client hung up: Starlette
        cancels a streaming response, or final_of's watcher cancels a plain one) cancels the job."""
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
                self.hang_up(job)

    async def final_of(self, job: Job, sink: QueueSink, request: Request) -> Reply:
        """The reply of a request answered whole; a client that hangs up meanwhile cancels it at once."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.hang_up(job)

        watcher = asyncio.create_task(watch())
        try:
            async for event in self.events(job, sink):
                if isinstance(event, Failed):
                    request.state.counted = True  # the worker counted it (ErrorLog counts the others)
                    raise event.error
                if isinstance(event, Finished):
                    return event.reply
        finally:
            watcher.cancel()
        raise EdgeError("internal", "the request ended without a final reply")

    async def run(self, method: str, request: Envelope, http: Request) -> Reply:
        job, sink = await self.submit(method, request)
        return await self.final_of(job, sink, http)
