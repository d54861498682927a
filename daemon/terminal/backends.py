"""Where `edgellm run` and `chat` get their answers: a model loaded in this process, or a daemon already serving
that model (warm, no second copy in memory: `ollama run` talks to its server the same way). Both yield the
engine's events, Delta then one Result, so printing does not care which answered."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.manifest import ModelManifest, load_manifest
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sequence import Delta, Result, Timings, Usage
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.runtime import DaemonRecord, running_daemons

REMOTE_TIMEOUT = 600.0  # seconds a daemon may take over one answer before `run` gives up on it


class LocalBackend:
    """The model loaded here, for as long as the command runs."""

    def __init__(self, generator):
        self.generator = generator
        self.folder = Path(generator.model.folder)
        self.where = "loaded here"

    @property
    def manifest(self) -> ModelManifest:
        return self.generator.model.manifest

    def stream(self, params: GenerationParams, prompt: str | None = None, raw: bool = False,
               messages: list[ChatMessage] | None = None) -> Iterator[Delta | Result]:
        ids = self.generator.prompt_ids(prompt=prompt, messages=messages, raw=raw)
        yield from self.generator.stream(ids, params)


class DaemonBackend:
    """A running `edgellm serve` on this machine, over its MQTT API (every parameter travels as is) or, on an
    HTTP-only device, its OpenAI API."""

    def __init__(self, record: DaemonRecord, settings):
        self.record = record
        self.settings = settings
        self.folder = Path(record.model.folder)
        self.manifest = load_manifest(self.folder)
        via = f"MQTT as {record.mqtt.device_id}" if record.mqtt else record.http_url
        self.where = f"served by the daemon with pid {record.pid}, over {via}"

    def stream(self, params: GenerationParams, prompt: str | None = None, raw: bool = False,
               messages: list[ChatMessage] | None = None) -> Iterator[Delta | Result]:
        if self.record.mqtt is not None:
            yield from self._over_mqtt(params, prompt, raw, messages)
        else:
            yield from self._over_http(params, prompt, raw, messages)

    def _over_mqtt(self, params, prompt, raw, messages) -> Iterator[Delta | Result]:
        from edgellm.daemon.serve.client import RpcClient, rpc_topic

        m = self.record.mqtt
        settings = self.settings.model_copy(update={
            "topic_root": m.topic_root, "device_id": m.device_id,
            "mqtt": self.settings.mqtt.model_copy(update={"host": m.host, "port": m.port})})
        method = "chat" if messages is not None else "generate"
        body = params.model_dump(exclude_defaults=True)
        if messages is not None:
            body["messages"] = [msg.model_dump(exclude_none=True) for msg in messages]
        else:
            body.update(prompt=prompt, raw=raw)
        request_id = uuid.uuid4().hex[:16]
        deltas: queue.Queue = queue.Queue()
        text: list[str] = []
        with RpcClient(settings) as client:
            topic = rpc_topic(settings, method)
            done, replies = client.send(topic, {**body, "id": request_id, "stream": True}, on_delta=deltas.put,
                                        expiry_s=int(REMOTE_TIMEOUT))
            try:
                while not (done.is_set() and deltas.empty()):
                    try:
                        piece = deltas.get(timeout=0.1).get("text", "")
                    except queue.Empty:
                        continue
                    text.append(piece)
                    yield Delta(piece)
            except BaseException:  # Ctrl-C, or the reader stopped: the daemon stops decoding for us
                client.call(rpc_topic(settings, "cancel"), {"request_id": request_id}, timeout=5)
                raise
        reply = replies[0]
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise EdgeError(error.get("code", "internal"), error.get("message", "the daemon refused the request"))
        if reply.get("json") is not None and not text:  # schema-bound output comes whole, as the parsed value
            text = [json.dumps(reply["json"], ensure_ascii=False)]
        yield Result(text=reply.get("text") or "".join(text), finish_reason=reply.get("finish_reason", "stop"),
                     usage=Usage(**reply.get("usage", {"prompt_tokens": 0})),
                     timings=Timings(**reply.get("timings", {})), json=reply.get("json"))

    def _over_http(self, params, prompt, raw, messages) -> Iterator[Delta | Result]:
        if raw:
            raise EdgeError("bad_request", "--raw: the daemon's HTTP API templates every prompt; run with --local")
        body = {"model": self.manifest.name, "stream": True, "stream_options": {"include_usage": True},
                "messages": [msg.model_dump(exclude_none=True) for msg in messages or
                             [ChatMessage(role="user", content=prompt or "")]],
                **params.model_dump(include={"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                             "repetition_penalty", "frequency_penalty", "presence_penalty",
                                             "ignore_eos", "speculative"}, exclude_none=True)}
        if params.stop:
            body["stop"] = params.stop
        if params.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": params.json_schema}}
        headers = {"Content-Type": "application/json"}
        key = self.settings.http.key() if self.record.http_key_required else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.record.http_url}/v1/chat/completions", json.dumps(body).encode(),
                                         headers)
        text, finish, usage = [], "stop", {}
        try:
            with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT) as response:
                for line in response:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            text.append(piece)
                            yield Delta(piece)
        except urllib.error.HTTPError as e:
            error = json.loads(e.read() or b"{}").get("error") or {}
            raise EdgeError(error.get("code") or "internal", error.get("message") or str(e)) from None
        whole = "".join(text)
        parsed = json.loads(whole) if params.json_schema is not None else None
        yield Result(text=whole, finish_reason=finish, timings=Timings(),
                     usage=Usage(prompt_tokens=usage.get("prompt_tokens", 0),
                                 completion_tokens=usage.get("completion_tokens", 0)), json=parsed)


def serving_daemon(folder: Path, settings) -> DaemonBackend | None:
    """A daemon on this machine serving exactly this model folder, that this user can reach."""
    for record in running_daemons():
        if Path(record.model.folder).resolve() != folder.resolve():
            continue
        if record.mqtt is None and (record.http_url is None or (record.http_key_required
                                                                and settings.http.key() is None)):
            continue
        return DaemonBackend(record, settings)
    return None
