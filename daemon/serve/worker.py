"""The request queue and the threads that run requests on the engine, each to exactly one final event.

Transport-neutral: MQTT and HTTP hand it Jobs with a sink; the worker sends typed events (a delta, the
final reply, or an error; edgellm/daemon/serve/replies.py) and each transport renders its own wire format.
Methods are dispatched by one table, `Worker.methods`.

Up to `concurrency` generation requests run at once, so their decode steps batch (the engine's scheduler);
embedding and retrieval-store requests, and the retrieval half of ask, take turns on one lock (one SQLite
connection, one embedder)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from edgellm.daemon.engine.constrain.json_constraint import check_schema
from edgellm.daemon.engine.constrain.tools import ToolUse
from edgellm.daemon.engine.generate import Delta, Result
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.documents import Collected, collect
from edgellm.daemon.retrieval.rag import answer, passages
from edgellm.daemon.retrieval.store import DocumentInput
from edgellm.daemon.serve.replies import (
    Answered,
    Deleted,
    Embedded,
    Event,
    Failed,
    Finished,
    Found,
    Generated,
    Ingested,
    ModelInfo,
    Reply,
    TextDelta,
)
from edgellm.daemon.serve.requests import ChatRequest, Envelope, IngestRequest, streams_deltas
from edgellm.daemon.serve.served import Served, ServedModels
from edgellm.daemon.serve.settings import StoreSettings
from edgellm.daemon.serve.stats import Stats

log = logging.getLogger("edgellm.worker")
PARAM_FIELDS = set(GenerationParams.model_fields)


class ReplySink(Protocol):
    def send(self, request_id: str, event: Event) -> None: ...


@dataclass
class Job:
    method: str
    request: Envelope
    request_id: str
    sink: ReplySink
    deadline: float | None = None  # time.monotonic()
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled by request"
    received: float = field(default_factory=time.monotonic)
    replayed: bool = False  # run again after a restart: the client may have seen part of an earlier stream
    _done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise EdgeError("cancelled", self.cancel_reason)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise EdgeError("deadline_exceeded", "the request's deadline passed before it could be answered")

    def finish(self, event: Finished | Failed) -> bool:
        """Send the final event, once; later calls do nothing."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        self.sink.send(self.request_id, event)
        log.info("%s", request_line(self, event))
        return True


def request_line(job: Job, event: Finished | Failed) -> str:
    """The operator's one line per request: method, id, tokens, milliseconds, outcome."""
    ms = (time.monotonic() - job.received) * 1000
    if isinstance(event, Failed):
        return f"{job.method} id={job.request_id} ms={ms:.0f} error={event.error.code}"
    if isinstance(event.reply, Generated):
        r = event.reply.result
        return (f"{job.method} id={job.request_id} tokens={r.usage.prompt_tokens}+{r.usage.completion_tokens} "
                f"ms={ms:.0f} ok finish={r.finish_reason}")
    return f"{job.method} id={job.request_id} ms={ms:.0f} ok"


class Worker:
    def __init__(self, models: ServedModels, stats: Stats, queue_size: int, max_tokens: int,
                 heartbeat: Callable[[], None] = lambda: None, store_settings: StoreSettings | None = None,
                 concurrency: int = 1):
        self.models = models
        self.store_settings = store_settings or StoreSettings()
        self.stats = stats
        self.max_tokens = max_tokens
        self.heartbeat = heartbeat
        self.queue_size = queue_size  # waiting requests beyond this are told `busy`
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._exclusive = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"edgellm-worker-{i}", daemon=True)
                         for i in range(concurrency)]
        # method -> (handler, whether it takes the store's and embedder's turn)
        self.methods: dict[str, tuple[Callable[[Job, Served], Reply], bool]] = {
            "generate": (self._generate, False), "chat": (self._generate, False), "ask": (self._ask, False),
            "embed": (self._embed, True), "ingest": (self._ingest, True), "search": (self._search, True),
            "delete": (self._delete, True),
        }

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._jobs)

    def reconfigure(self, queue_size: int, max_tokens: int, store_settings: StoreSettings) -> None:
        """What a reload may change, in one step under the job table's lock (the main thread calls it); a job
        already running keeps the limits it read when it started."""
        with self._lock:
            self.queue_size, self.max_tokens, self.store_settings = queue_size, max_tokens, store_settings

    def submit(self, job: Job, replayed: bool = False) -> None:
        """Queue a job, or refuse it (`busy`, a duplicate id, or what `preflight` finds). Replayed jobs (owned
        before a crash) always queue: they were accepted once already."""
        self.preflight(job)
        with self._lock:
            if job.request_id in self._jobs:
                raise EdgeError("bad_request", f"id: a request with id '{job.request_id}' is already queued or "
                                "running", param="id")
            if not replayed and self._queue.qsize() >= self.queue_size:
                raise EdgeError("busy", f"{self.queue_size} requests are already waiting; retry later")
            job.replayed = replayed
            self._queue.put_nowait(job)
            self._jobs[job.request_id] = job
            self._idle.clear()

    def cancel(self, request_id: str, reason: str = "cancelled by request") -> bool:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        job.cancel_reason = reason
        job.cancelled.set()
        return True

    def drain(self, grace: float) -> None:
        """Let queued and running requests finish for `grace` seconds, cancel the rest, stop the thread."""
        self._idle.wait(grace)
        with self._lock:
            pending = list(self._jobs)
        for request_id in pending:
            self.cancel(request_id, "the daemon is shutting down")
        self._idle.wait(30)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=1.0)
            except queue.Empty:
                self.heartbeat()
                continue
            if job is None:
                return
            self.heartbeat()
            self._execute(job)
            with self._lock:
                self._jobs.pop(job.request_id, None)
                if not self._jobs:
                    self._idle.set()

    def _execute(self, job: Job) -> None:
        self.stats.request(job.method)
        try:
            job.check()
            handler, exclusive = self.methods[job.method]
            served = self.models.served
            if exclusive:
                with self._exclusive:
                    reply = handler(job, served)
            else:
                reply = handler(job, served)
            job.finish(Finished(reply))
        except EdgeError as e:
            self.stats.error(e.code)
            job.finish(Failed(e))
        except Exception as e:  # the daemon never dies of a request
            log.exception("request %s (%s) failed", job.request_id, job.method)
            self.stats.error("internal")
            job.finish(Failed(EdgeError("internal", f"{type(e).__name__}: {e}")))

    def preflight(self, job: Job) -> None:
        """The checks that need no engine, made on the caller's thread before the job queues: a request that
        fails them is refused at once, never after waiting behind a long prompt."""
        request = job.request
        if job.method in ("generate", "chat", "ask"):
            params = self._params(request)
            if params.json_schema is not None:
                check_schema(params.json_schema)
            if isinstance(request, ChatRequest):
                self._tools(request, params)

    @staticmethod
    def _tools(request: ChatRequest, params: GenerationParams) -> ToolUse:
        tools = ToolUse(request.tools, request.tool_choice)
        if tools.active and params.json_schema is not None:
            raise EdgeError("bad_request", "json_schema: give tools or a json_schema, not both; or set "
                            "tool_choice to 'none'", param="json_schema")
        return tools

    def _params(self, request: Envelope) -> GenerationParams:
        params = GenerationParams(**request.model_dump(include=PARAM_FIELDS))
        if "max_tokens" not in request.model_fields_set:
            params.max_tokens = min(params.max_tokens, self.max_tokens)
        elif params.max_tokens > self.max_tokens:
            raise EdgeError("bad_request", f"max_tokens: at most {self.max_tokens} on this device",
                            param="max_tokens")
        return params

    def _interrupt(self, job: Job) -> None:
        """Before every forward pass: show the watchdog we are alive, and stop a cancelled or late request."""
        self.heartbeat()
        job.check()

    # -- the methods -----------------------------------------------------------------------------------
    def _generate(self, job: Job, served: Served) -> Generated:
        request = job.request
        params = self._params(request)
        generator = served.generator
        started = time.perf_counter()
        tools = None
        if isinstance(request, ChatRequest):
            tools = self._tools(request, params)
            ids = generator.prompt_ids(messages=tools.messages(request.messages))
            if tools.active:
                params.json_schema = tools.schema()
        else:
            ids = generator.prompt_ids(request.prompt, raw=request.raw)
        result: Result | None = None
        seq = 0
        stream = streams_deltas(request, params)
        for event in generator.stream(ids, params, interrupt=lambda: self._interrupt(job), started=started):
            if isinstance(event, Delta):
                if stream:
                    job.sink.send(job.request_id, TextDelta(event.text, seq, job.replayed and seq == 0,
                                                            event.logprobs))
                    seq += 1
            else:
                result = event
        u = result.usage
        self.stats.generated(u.completion_tokens, result.timings.decode_tps, result.timings.ttft_ms,
                             u.drafted_tokens, u.accepted_tokens)
        if tools and tools.active:
            said = tools.read(result.json)
            result = replace(result, text=said.text, json=None,
                             finish_reason="tool_calls" if said.call else result.finish_reason)
            if request.stream and said.text:  # the answer's text, once it is known to be text
                job.sink.send(job.request_id, TextDelta(said.text, 0))
            return Generated(result, served.model_info, False, [said.call] if said.call else [])
        return Generated(result, served.model_info, params.json_schema is not None)

    def _ask(self, job: Job, served: Served) -> Answered:
        """Retrieval takes the store's turn; the answer is generated outside it, batched with other requests,
        so embed and search requests need not wait for it."""
        request, params, store = job.request, self._params(job.request), served.require_store()
        settings = self.store_settings  # read once: a reload meanwhile does not mix two configurations
        with self._exclusive:
            given = passages(served.generator, store, request.question, params, request.k,
                             request.collection, request.filter, settings.min_similarity)
        result = answer(served.generator, request.question, given, params, interrupt=lambda: self._interrupt(job),
                        mode=request.mode or settings.answer_mode, embed=store.embedder.embed)
        return Answered(result, served.model_info)

    def _embed(self, job: Job, served: Served) -> Embedded:
        embedder = served.require_embedder()
        return Embedded(embedder.embed(job.request.texts()), ModelInfo(embedder.name, embedder.manifest.version))

    def _ingest(self, job: Job, served: Served) -> Ingested:
        store = served.require_store()
        collected = self._documents(job.request)
        for r in collected.refused:
            log.warning("ingest %s: left out %s: %s", job.request_id, r.path, r.reason)
        report = store.ingest(collected.documents)
        report.refused = [asdict(r) for r in collected.refused]
        return Ingested(report)

    def _search(self, job: Job, served: Served) -> Found:
        r = job.request
        return Found(served.require_store().search(r.query, r.k, r.collection, r.filter, r.mode))

    def _delete(self, job: Job, served: Served) -> Deleted:
        return Deleted(served.require_store().delete(job.request.source, job.request.collection))

    def _documents(self, request: IngestRequest) -> Collected:
        """Inline text, or files under an allowed folder; anything else is refused before it is read."""
        if (request.text is None) == (request.path is None):
            raise EdgeError("bad_request", "give either text (with source) or path")
        if request.text is not None:
            if not request.source:
                raise EdgeError("bad_request", "source: required with text; it is what citations will show",
                                param="source")
            return Collected([DocumentInput(request.source, [request.text], request.collection, request.metadata)])
        settings = self.store_settings
        return collect([Path(request.path)], request.collection, request.metadata,
                       allowed=settings.ingest_dirs, max_bytes=settings.max_file_bytes)
