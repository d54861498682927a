"""What the HTTP routes stand on: the API key and size guard (ASGI middleware), the hand-off of worker events to
the event loop (QueueSink, with stall detection), and uvicorn in a thread on a socket we open ourselves."""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from starlette.datastructures import Headers

from edgellm.daemon.errors import CommandError
from edgellm.daemon.serve.http.ollama import error_for
from edgellm.daemon.serve.http.openai import ERROR_CODE_HEADER
from edgellm.daemon.serve.replies import Event
from edgellm.daemon.serve.settings import Settings

log = logging.getLogger("edgellm.http")


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
            path = scope["path"]
            if self.key and path.startswith(("/v1/", "/api/", "/metrics")):
                if not authorized(headers, self.key):
                    refused = error_for(path, 401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                        "<key>'", "invalid_api_key")
            declared = headers.get("content-length") or "0"
            size = int(declared) if declared.isdigit() else 0
            if refused is None and size > self.limit:
                refused = error_for(path, 413, f"request body is {size} bytes; the limit is {self.limit}",
                                    "too_large")
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ErrorLog:
    """Plain ASGI middleware: every error response (status 400 and up) is one log line, method, path, status and
    reason, and counts in edgellm_errors_total by its code, as MQTT's error replies do. A request the worker
    failed was counted by the worker (the route marks it in its state)."""

    BODY_KEPT = 4096  # of an error body, enough for its message

    def __init__(self, app, count: Callable[[str], None]):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, code, body = 0, "", bytearray()

        async def watch(message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
                code = Headers(raw=message.get("headers", [])).get(ERROR_CODE_HEADER, str(status))
            elif message["type"] == "http.response.body" and status >= 400:
                body.extend(message.get("body", b"")[: self.BODY_KEPT - len(body)])
                if not message.get("more_body"):
                    self._report(scope, status, code, bytes(body))
            await send(message)

        await self.app(scope, receive, watch)

    def _report(self, scope, status: int, code: str, body: bytes) -> None:
        if status == 499 or scope.get("path") == "/health":  # a hang-up mid-body is logged where it is noticed;
            return                                                 # a degraded /health is a state, not an error
        try:
            error = json.loads(body)["error"]  # OpenAI's {"error": {"message": ...}} or Ollama's {"error": "..."}
            reason = error if isinstance(error, str) else str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            reason = body.decode(errors="replace")[:200]
        (log.warning if status >= 500 else log.info)("HTTP %s %s %d %s: %s", scope.get("method"),
                                                      scope.get("path"), status, code, reason)
        if not scope.get("state", {}).get("counted"):
            self.count(code)


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
