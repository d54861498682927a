"""OpenAI's dialect, translated both ways: its request bodies into the worker's requests
(edgellm/daemon/serve/requests.py), and the worker's replies and deltas into its responses and stream chunks.

Nothing here knows about sockets or the event loop (edgellm/daemon/serve/http/app.py does), so another dialect
(Ollama's) can sit beside this one over the same routes' plumbing.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, ClassVar, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, create_model, field_validator

from edgellm.daemon.engine.chat import ChatMessage, ToolCall
from edgellm.daemon.engine.constrain.tools import Tool, ToolChoice
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sequence import TokenLogprob
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.serve.replies import Embedded, Generated, logprob_entries
from edgellm.daemon.serve.requests import ChatRequest, GenerateRequest, refuse_unknown

ERROR_CODE_HEADER = "x-edgellm-error"  # every error response names its code here, whichever dialect's body it has
HTTP_PARAMS = {"json_schema": "response_format"}  # a worker request's field -> the OpenAI parameter it came from
STATUS = {"bad_request": 400, "unknown_method": 404, "too_large": 413, "unsupported_media": 415, "busy": 429,
          "deadline_exceeded": 504, "cancelled": 503, "model_unavailable": 503, "internal": 500}


def openai_error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
            429: "rate_limit_exceeded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers={ERROR_CODE_HEADER: code})


def edge_error_response(error: EdgeError) -> JSONResponse:
    return openai_error(STATUS[error.code], error.message, error.code, HTTP_PARAMS.get(error.param, error.param))


def stream_error(error: EdgeError) -> dict:
    """An error after a stream began: its status line is sent already, so it goes as a chunk."""
    return {"error": {"message": error.message, "type": "server_error", "code": error.code}}


# -- request bodies: OpenAI's, strict as OpenAI is: an unknown field is a 400 naming it --------------------------
# OpenAI fields edgellm knows and cannot honour: refused with the reason rather than silently ignored
UNSUPPORTED = {
    "echo": "the prompt is not returned with the completion",
    "best_of": "one completion is generated per request",
    "suffix": "no fill-in-the-middle: send the text before the gap as the prompt",
    "logit_bias": "per-token biases are not applied; use a json_schema response_format to constrain the output",
    "functions": "the deprecated functions API: send tools",
    "function_call": "the deprecated functions API: send tool_choice",
    "audio": "this model reads and writes text only", "modalities": "this model reads and writes text only",
    "prediction": "predicted outputs come from the prompt here (speculative decoding, on by default)",
    "reasoning_effort": "this model does not reason in hidden tokens",
    "web_search_options": "the device does not reach the internet",
    **{f"mirostat{s}": "mirostat sampling is not implemented; use temperature, top_p, top_k or min_p"
       for s in ("", "_tau", "_eta")},
}
# fields a client may send harmlessly: accepted, with no effect
ACCEPTED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # wrong types are refused

    @classmethod
    def check_fields(cls, body: dict) -> None:
        """Before validation: every top-level field is one this route reads, ACCEPTED or UNSUPPORTED (refused)."""
        refuse_unknown(body, cls.model_fields.keys() | ACCEPTED, UNSUPPORTED)


class FunctionCallIn(OpenAIBody):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(OpenAIBody):
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


class MessageIn(OpenAIBody):  # fields beyond these (refusal, annotations: a reply sent back as it came) pass
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self, where: str) -> str:
        """The message's text; a content part that is not text (an image, audio, a file) is refused."""
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise EdgeError("bad_request", f"{where}.content.{j}: {part.get('type')!r} parts are not "
                                    "supported; this model reads text only (type 'text' with a 'text')",
                                    param="messages")
            return "".join(part["text"] for part in self.content)
        return self.content or ""


# GenerationParams fields OpenAI (or llama-server, for top_k, repetition_penalty and ignore_eos) names alike:
# taken over with their types, optional, so their bounds are checked once, where the worker builds the params
# and edgellm's own speculative (a body may choose the drafting mode, as over MQTT)
SAME_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
              "presence_penalty", "seed", "ignore_eos", "speculative")
_SharedParams = create_model("_SharedParams", __base__=OpenAIBody, **{
    name: (GenerationParams.model_fields[name].annotation | None, None) for name in SAME_NAMES})


class _Sampling(_SharedParams):
    model: str = "default"
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def params(self) -> dict[str, Any]:
        if self.n != 1:
            raise EdgeError("bad_request", "n: only 1 completion per request is supported", param="n")
        out = self.model_dump(include=set(SAME_NAMES), exclude_none=True)
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return {**out, "stream": self.stream}


class ChatCompletionRequest(_Sampling):
    messages: list[MessageIn]
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # 0-20 alternatives per token; needs logprobs

    method: ClassVar[str] = "chat"  # the worker method it becomes

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise EdgeError("bad_request", "top_logprobs: needs logprobs: true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:  # checked here, not as the
            # engine's `logprobs` count, so the error names the field the client sent
            raise EdgeError("bad_request", f"top_logprobs: {self.top_logprobs} is out of range; give 0 to 20",
                            param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_request(self) -> ChatRequest:
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
        return ChatRequest(messages=self.history(), logprobs=self.logprob_count(), **self.params(), **extra)

    def history(self) -> list[ChatMessage]:
        """OpenAI's messages as the engine's: a call's arguments parsed, a tool result named after its call."""
        called: dict[str, str] = {}
        out = []
        for i, m in enumerate(self.messages):
            calls = [c.parsed(f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls or [])]
            called.update((c.id, c.name) for c in calls)
            name = m.name or called.get(m.tool_call_id or "") if m.role == "tool" else None
            out.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text(f"messages.{i}"),
                                   tool_calls=calls or None, tool_call_id=m.tool_call_id if m.role == "tool" else None,
                                   name=name))
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None  # alternatives per token, 0-20 (OpenAI allows 5)

    method: ClassVar[str] = "generate"

    def to_request(self) -> GenerateRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise EdgeError("bad_request", "prompt: give exactly one prompt", param="prompt")
        return GenerateRequest(prompt=prompts[0], raw=True, logprobs=self.logprobs, **self.params())


class EmbeddingRequest(OpenAIBody):
    model: str = "default"
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's own width: its vectors were not trained to be truncated

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


# -- responses -------------------------------------------------------------------------------------------------
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
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            # OpenAI's names for predicted outputs: our guesses come from the prompt (speculative decoding)
            "completion_tokens_details": {"accepted_prediction_tokens": u.accepted_tokens,
                                          "rejected_prediction_tokens": u.drafted_tokens - u.accepted_tokens}}


class ChatCompletion:
    """One /v1/chat/completions answer: the whole response, or its stream of chunks."""

    def __init__(self, request_id: str, model: str):
        self.id, self.created, self.model = f"chatcmpl-{request_id}", int(time.time()), model
        self._first = True

    def whole(self, reply: Generated) -> dict:
        message = {"role": "assistant", "content": content_of(reply),
                   **({"tool_calls": tool_calls_of(reply)} if reply.tool_calls else {})}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": reply.result.finish_reason,
                             "logprobs": chat_logprobs(reply.result.logprobs)}], "usage": usage_of(reply)}

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
        chunk = self._chunk({"content": text})
        if logprobs is not None:
            chunk["choices"][0]["logprobs"] = chat_logprobs(logprobs)
        return chunk

    def final(self, reply: Generated, include_usage: bool) -> list[dict]:
        """The chunks after the last delta: output sent whole (JSON; a tool call, as OpenAI streams one: its id
        and name, then its arguments), the finish reason, the usage if asked for."""
        chunks = []
        if reply.json_mode:  # sent whole: no delta carried its tokens' logprobs
            chunks.append(self.text(content_of(reply), reply.result.logprobs))
        for call in tool_calls_of(reply, streamed=True):
            head = {**call, "function": {**call["function"], "arguments": ""}}
            chunks.append(self._chunk({"tool_calls": [head]}))
            chunks.append(self._chunk({"tool_calls": [{"index": call["index"],
                                                       "function": {"arguments": call["function"]["arguments"]}}]}))
        chunks.append(self._chunk({}, reply.result.finish_reason))
        if include_usage:
            chunks.append({**self._head(), "choices": [], "usage": usage_of(reply)})
        return chunks

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        if self._first and delta:
            delta, self._first = {"role": "assistant", **delta}, False
        return {**self._head(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


class TextCompletion:
    """One /v1/completions answer: the whole response, or its stream of chunks."""

    def __init__(self, request_id: str, model: str):
        self.id, self.created, self.model = f"cmpl-{request_id}", int(time.time()), model

    def whole(self, reply: Generated) -> dict:
        whole = self._chunk(reply.result.text, reply.result.finish_reason, reply.result.logprobs)
        return {**whole, "usage": usage_of(reply)}

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
        return self._chunk(text, logprobs=logprobs)

    def final(self, reply: Generated, include_usage: bool) -> list[dict]:
        return [self._chunk("", reply.result.finish_reason),
                *([{**self._chunk(""), "usage": usage_of(reply)}] if include_usage else [])]

    def _chunk(self, text: str, finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": completion_logprobs(logprobs),
                             "finish_reason": finish_reason}]}


RENDERERS = {ChatCompletionRequest: ChatCompletion, CompletionRequest: TextCompletion}


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    return None if logprobs is None else {"content": logprob_entries(logprobs), "refusal": None}


def completion_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    """The legacy completions shape: parallel lists, the alternatives as {token: logprob}."""
    if logprobs is None:
        return None
    offsets, at = [], 0
    for t in logprobs:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in logprobs], "token_logprobs": [round(t.logprob, 6) for t in logprobs],
            "top_logprobs": [{text: round(lp, 6) for text, lp in t.top} for t in logprobs], "text_offset": offsets}


def check_dimensions(requested: int | None, width: int, model: str) -> None:
    """`dimensions` may only restate the model's width: its vectors are not trained to keep their meaning when
    truncated (a Matryoshka model would be), so a shorter vector is refused, never silently cut."""
    if requested is not None and requested != width:
        raise EdgeError("bad_request", f"dimensions: '{model}' gives {width}-dimensional vectors and cannot "
                        f"shorten them; leave dimensions out or ask for {width}", param="dimensions")


def embeddings(reply: Embedded, encoding_format: str) -> dict:
    data = []
    for i, vector in enumerate(reply.vectors):
        value = (base64.b64encode(vector.astype(np.float32).tobytes()).decode()
                 if encoding_format == "base64" else vector.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": reply.model.name, "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def model_list(model: str, embedder: str | None, adapters: list[str]) -> dict:
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "edgellm"}
            for n in [model] + ([embedder] if embedder else [])]
    data += [{"id": n, "object": "model", "created": 0, "owned_by": "edgellm", "parent": model}
             for n in adapters]  # LoRA adapters, as vLLM lists them
    return {"object": "list", "data": data}


def model_object(name: str, listed: dict) -> dict | None:
    """GET /v1/models/{id}: one entry of the list ('default' is the chat model), or None."""
    if name == "default" and listed["data"]:
        return listed["data"][0]
    return next((m for m in listed["data"] if m["id"] == name), None)
