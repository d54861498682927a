"""Chat templates: the model's own Jinja template, rendered in a sandbox (templates ship inside bundles)."""

from __future__ import annotations

from typing import Any, Literal

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from edgellm.daemon.errors import EdgeError


class ToolCall(BaseModel):
    """A call the assistant made (edgellm/daemon/engine/constrain/tools.py): `arguments` is the parsed JSON object."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field("", max_length=1_000_000)
    tool_calls: list[ToolCall] | None = Field(None, max_length=64, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, max_length=128, description="a tool turn: the call it answers")
    name: str | None = Field(None, max_length=64, description="a tool turn: the function that answered")


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self._special = special_tokens

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise EdgeError("bad_request", "messages: give at least one message")
        try:
            return self._template.render(messages=[m.model_dump(exclude_none=True) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self._special)
        except TemplateError as e:
            raise EdgeError("bad_request", f"messages: the model's chat template rejected them: {e}") from None
