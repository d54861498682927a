"""Ollama's dialect (https://github.com/ollama/ollama/blob/main/docs/api.md), translated both ways: /api/chat and
/api/generate bodies into the worker's requests, and its replies into Ollama's responses and NDJSON stream lines,
so Home Assistant's Ollama integration, Open WebUI, n8n and the `ollama` clients work unchanged.

As strict as the OpenAI dialect beside it (openai.py): an unknown field or option is a 400 naming it; an option
that would change the output and is not implemented is refused unless it has its neutral value; options about
loading (GPU layers, mmap, threads, context) and `keep_alive` are accepted without effect (the daemon keeps its
one model loaded, sized by its settings). Errors are Ollama's shape, {"error": "..."}, with the same status codes
as the OpenAI routes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from edgellm.daemon.engine.chat import ChatMessage, ToolCall
from edgellm.daemon.engine.constrain.tools import Tool
from edgellm.daemon.engine.manifest import ModelManifest
from edgellm.daemon.engine.model import MODEL_FILE
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sequence import TokenLogprob
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.http.openai import ERROR_CODE_HEADER, STATUS, content_of, edge_error_response, openai_error
from edgellm.daemon.serve.replies import Embedded, Generated, logprob_entries
from edgellm.daemon.serve.requests import ChatRequest, GenerateRequest, refuse_unknown

OLLAMA_VERSION = "0.12.0"  # the API generation these routes follow; clients only read it
LATEST = ":latest"  # Ollama's default tag: "smollm2:latest" is the model "smollm2"
UNLIMITED = GenerationParams.model_fields["max_tokens"].metadata[-1].le  # the largest max_tokens

# options -> the GenerationParams field they set
OPTION_PARAMS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# options about loading the model: the daemon's settings decide these, so they are accepted without effect
LOAD_OPTIONS = frozenset({"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                          "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
                          "num_keep"})
# sampling options not implemented: accepted only at the value that means "off"
NEUTRAL_OPTIONS = {"mirostat": 0, "mirostat_tau": None, "mirostat_eta": None, "tfs_z": 1.0, "typical_p": 1.0,
                   "repeat_last_n": 64, "penalize_newline": None}


def ollama_error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers={ERROR_CODE_HEADER: code})


def error_for(path: str, status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    """An error in the dialect of the route asked: Ollama's under /api/, OpenAI's elsewhere."""
    if path.startswith("/api/"):
        return ollama_error(status, message, code)
    return openai_error(status, message, code, param)


def edge_error_for(path: str, error: EdgeError) -> JSONResponse:
    if path.startswith("/api/"):
        return ollama_error(STATUS[error.code], error.message, error.code)
    return edge_error_response(error)


def params_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """Ollama's options as GenerationParams fields; the worker checks their ranges."""
    params: dict[str, Any] = {}
    for name, value in options.items():
        if name in OPTION_PARAMS:
            if name == "num_predict" and isinstance(value, int) and value < 0:
                value = UNLIMITED  # -1 (no limit), -2 (fill the context): the context bounds the budget
            params[OPTION_PARAMS[name]] = value
        elif name in NEUTRAL_OPTIONS:
            neutral = NEUTRAL_OPTIONS[name]
            if value is not None and neutral is not None and value != neutral:
                raise EdgeError("bad_request", f"options.{name}: not supported (only {neutral!r}, its neutral value;"
                                " sample with temperature, top_p, top_k or min_p)", param=f"options.{name}")
    refuse_unknown({k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS}, {*OPTION_PARAMS, *LOAD_OPTIONS},
                   prefix="options.")
    if "max_tokens" in params and params["max_tokens"] == 0:
        raise EdgeError("bad_request", "options.num_predict: 0 generates nothing; give a positive number or -1",
                        param="options.num_predict")
    return params


def format_schema(fmt: str | dict | None) -> dict | None:
    """`format`: "json" (any JSON object) or a JSON schema; "" or absent is free text."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, dict):
        return fmt
    raise EdgeError("bad_request", f"format: {fmt!r} is not 'json' or a JSON schema object", param="format")


class _Strict(BaseModel):
    """A body whose fields are checked before validation (dispatch.parse): unknown ones are refused by name, as
    are REFUSED ones (known, not honoured) unless empty."""
    model_config = ConfigDict(extra="ignore", strict=True)
    REFUSED: ClassVar[dict[str, str]] = {}

    @classmethod
    def check_fields(cls, body: dict) -> None:
        refuse_unknown(body, cls.model_fields, cls.REFUSED)


class OllamaBody(_Strict):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] = {}
    keep_alive: float | int | str | None = None  # accepted without effect: the model stays loaded
    logprobs: bool = False
    top_logprobs: int | None = None
    think: bool | str | None = None

    def params(self) -> dict[str, Any]:
        if self.think not in (None, False):
            raise EdgeError("bad_request", "think: this model does not think in hidden tokens; leave think out",
                            param="think")
        if self.top_logprobs is not None and not self.logprobs:
            raise EdgeError("bad_request", "top_logprobs: needs logprobs: true", param="top_logprobs")
        return {**params_from_options(self.options), "stream": self.stream,
                "json_schema": format_schema(self.format),
                "logprobs": (self.top_logprobs or 0) if self.logprobs else None}


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaChat(OllamaBody):
    messages: list[OllamaMessage] = []
    tools: list[Tool] | None = None

    method: ClassVar[str] = "chat"

    def to_request(self) -> ChatRequest:
        history = []
        for i, m in enumerate(self.messages):
            if m.images:
                raise EdgeError("bad_request", f"messages.{i}.images: this model reads text only", param="messages")
            if m.role not in ("system", "user", "assistant", "tool"):
                raise EdgeError("bad_request", f"messages.{i}.role: {m.role!r} is not system, user, assistant or "
                                "tool", param="messages")
            calls = [ToolCall(id=f"call_{i}_{j}", name=c.get("function", {}).get("name", ""),
                              arguments=c.get("function", {}).get("arguments") or {})
                     for j, c in enumerate(m.tool_calls or [])]
            history.append(ChatMessage(role=m.role, content=m.content, tool_calls=calls or None,
                                       name=m.tool_name if m.role == "tool" else None))
        if not history:  # Ollama answers an empty chat by loading the model; here it is always loaded
            raise EdgeError("bad_request", "messages: give at least one message", param="messages")
        return ChatRequest(messages=history, tools=self.tools or [], **self.params())


class OllamaGenerate(OllamaBody):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    REFUSED: ClassVar[dict[str, str]] = {
        "suffix": "no fill-in-the-middle", "images": "this model reads text only",
        "template": "the model's own chat template is used", "context": "send the conversation to /api/chat"}

    method: ClassVar[str] = "generate"

    def to_request(self) -> ChatRequest | GenerateRequest:
        if not self.prompt:
            raise EdgeError("bad_request", "prompt: is empty (Ollama loads the model then; here it is always "
                            "loaded)", param="prompt")
        if self.system is not None and not self.raw:
            return ChatRequest(messages=[ChatMessage(role="system", content=self.system),
                                         ChatMessage(role="user", content=self.prompt)], **self.params())
        return GenerateRequest(prompt=self.prompt, raw=self.raw, **self.params())


class OllamaEmbed(_Strict):
    model: str
    input: str | list[str]
    truncate: bool = True
    options: dict[str, Any] = {}
    keep_alive: float | int | str | None = None
    dimensions: int | None = None


class OllamaLegacyEmbed(OllamaEmbed):
    input: str | list[str] = ""  # unused: the older route sends `prompt`
    prompt: str


class OllamaShow(_Strict):
    model: str
    verbose: bool = False


def model_ref(requested: str) -> str:
    """The model a request names, without Ollama's default tag."""
    return requested.removesuffix(LATEST)


# -- responses -------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class OllamaAnswer:
    """One /api/chat or /api/generate answer: whole, or NDJSON lines (deltas, then the final line with done)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.started = time.perf_counter_ns()

    def _line(self, text: str, tool_calls: list[dict] | None = None, logprobs: list[TokenLogprob] | None = None,
              done: bool = False) -> dict:
        line: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            line["message"] = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls
                                                                           else {})}
        else:
            line["response"] = text
        if logprobs is not None:
            line["logprobs"] = logprob_entries(logprobs)  # Ollama's shape is OpenAI's chat one
        line["done"] = done
        return line

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
        return self._line(text, logprobs=logprobs)

    def final(self, reply: Generated, streamed: bool) -> dict:
        """The last line, or the whole answer: the text unless it was streamed already, and the counts."""
        r = reply.result
        text = "" if streamed and not reply.json_mode else content_of(reply) or ""
        calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
        logprobs = r.logprobs if not streamed or reply.json_mode else None
        line = self._line(text, calls or None, logprobs, done=True)
        total = time.perf_counter_ns() - self.started
        prompt_ns = int(r.timings.ttft_ms * 1e6)
        line.update(done_reason="stop" if r.finish_reason in ("stop", "tool_calls") else r.finish_reason,
                    total_duration=total, load_duration=0, prompt_eval_count=r.usage.prompt_tokens,
                    prompt_eval_duration=prompt_ns, eval_count=r.usage.completion_tokens,
                    eval_duration=max(total - prompt_ns, 0))
        return line


def embed_response(reply: Embedded, model: str) -> dict:
    return {"model": model, "embeddings": reply.vectors.tolist(), "total_duration": 0, "load_duration": 0,
            "prompt_eval_count": 0}


def details(manifest: ModelManifest) -> dict:
    q = manifest.quantization
    return {"parent_model": "", "format": "onnx", "family": manifest.model_type, "families": [manifest.model_type],
            "parameter_size": manifest.parameter_size, "quantization_level": q.scheme.upper()}


def model_entry(manifest: ModelManifest, modified: float, size: int) -> dict:
    """One model as /api/tags and /api/ps list it."""
    name = manifest.name + LATEST
    digest = manifest.files.get(MODEL_FILE)
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(modified, UTC).isoformat(),
            "size": size, "digest": digest.sha256 if digest is not None else "", "details": details(manifest)}


def show_response(manifest: ModelManifest, modified: float, template: str | None) -> dict:
    g = manifest.generation
    info = {"general.architecture": manifest.model_type, "general.name": manifest.name,
            f"{manifest.model_type}.context_length": g.context_length if g else None}
    capabilities = ["completion", "tools"] if manifest.task == "text-generation" else ["embedding"]
    return {"license": manifest.license or "", "modelfile": "", "parameters": "", "template": template or "",
            "details": details(manifest), "model_info": info, "capabilities": capabilities,
            "modified_at": datetime.fromtimestamp(modified, UTC).isoformat()}
