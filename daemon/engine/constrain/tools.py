"""Tool calls (OpenAI's `tools` and `tool_choice`) for any chat model, by llama.cpp's generic recipe.

A small model has no tool-call format of its own, so the request's functions are described in the system
prompt and the answer is constrained by the grammar engine to one JSON object: `{"tool_call": {"name": ...,
"arguments": {...}}}`, whose arguments validate against that function's `parameters` schema, or, when the
choice allows text, `{"response": "..."}`. The same JSON stands for the call when a conversation's history
is rendered again, and a tool's result becomes a `{"tool_response": ...}` user turn, which every chat
template accepts (some refuse a `tool` role or two user turns in a row).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from edgellm.daemon.engine.chat import ChatMessage, ToolCall
from edgellm.daemon.engine.constrain.schema_refs import has_local_ref, rebase_refs, ref_loop
from edgellm.daemon.errors import EdgeError


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field("", max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"] = "function"
    function: Function


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}, as OpenAI sends it


ToolChoice = Literal["auto", "none", "required"] | NamedChoice


@dataclass
class ToolReply:
    """What a constrained answer said: text for the user, or one call."""

    text: str
    call: ToolCall | None


class ToolUse:
    """One request's tools and choice: the prompt they add, the schema the answer keeps to, and its reading."""

    def __init__(self, tools: list[Tool], choice: ToolChoice | None):
        self.tools = {t.function.name: t.function for t in tools}
        if len(self.tools) != len(tools):
            raise EdgeError("bad_request", "tools: two functions have the same name", param="tools")
        self.choice = choice or ("auto" if tools else "none")
        self.calls = list(self.tools.values())
        if isinstance(self.choice, NamedChoice):
            name = self.choice.function.get("name")
            if name not in self.tools:
                raise EdgeError("bad_request", f"tool_choice.function.name: {name!r} is not one of the tools "
                                f"({', '.join(self.tools) or 'none given'})", param="tool_choice")
            self.calls = [self.tools[name]]
        elif self.choice == "required" and not tools:
            raise EdgeError("bad_request", "tool_choice: 'required' needs at least one tool in tools",
                            param="tool_choice")
        for f in self.calls:
            try:
                jsonschema.validators.validator_for(f.parameters).check_schema(f.parameters)
            except jsonschema.SchemaError as e:
                raise EdgeError("bad_request", f"tools: function {f.name}'s parameters are not a valid JSON "
                                f"Schema: {e.message}", param="tools") from None
            if (loop := ref_loop(f.parameters)) is not None:
                raise EdgeError("bad_request", f"tools: function {f.name}'s parameters cannot be enforced: the $ref "
                                f"{loop!r} only refers to itself (give the arguments' shape)", param="tools")

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def text_allowed(self) -> bool:
        return self.choice == "auto"

    def schema(self) -> dict[str, Any]:
        """The answer's JSON schema. A call's arguments hold only the declared parameters unless the function
        says otherwise (as OpenAI's strict mode does): a small model otherwise pads them with made-up keys."""
        defs: dict[str, Any] = {}
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f.name}, "arguments": self._arguments(f, defs)}}
                 for f in self.calls]
        call = {"type": "object", "additionalProperties": False, "required": ["tool_call"],
                "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}}}
        if self.text_allowed:
            text = {"type": "object", "additionalProperties": False, "required": ["response"],
                    "properties": {"response": {"type": "string"}}}
            call = {"anyOf": [call, text]}
        return {"$defs": defs, **call} if defs else call

    @staticmethod
    def _arguments(f: Function, defs: dict[str, Any]) -> dict[str, Any]:
        """A function's parameters inside the answer's schema. Their local `$ref`s ("#", "#/$defs/x") mean the
        parameters' own root, not the answer's: such parameters move under the answer's $defs, their refs
        rewritten to point there."""
        parameters = closed(f.parameters)
        if not has_local_ref(parameters):
            return parameters
        where = f"#/$defs/parameters_{f.name}"
        defs[f"parameters_{f.name}"] = rebase_refs(parameters, where)
        return {"$ref": where}

    def instructions(self) -> str:
        described = [{"name": f.name, "description": f.description, "parameters": f.parameters} for f in self.calls]
        how = ('{"tool_call": {"name": "<tool name>", "arguments": {...}}} to call a tool'
               + (', or {"response": "<your answer>"} to answer the user directly' if self.text_allowed else ""))
        return (f"You can call these tools:\n{json.dumps(described, ensure_ascii=False)}\n\n"
                f"Reply with one JSON object: {how}.")

    def messages(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """The conversation as the model reads it: tool calls and results as JSON turns, and the tools
        described in the system prompt (added to the caller's own, if there is one)."""
        out = [as_plain_turn(m) for m in history]
        if not self.active:
            return out
        if out and out[0].role == "system":
            return [ChatMessage(role="system", content=f"{out[0].content}\n\n{self.instructions()}"), *out[1:]]
        return [ChatMessage(role="system", content=self.instructions()), *out]

    def read(self, answer: Any) -> ToolReply:
        """The constrained answer, already parsed and schema-checked, as text or a call."""
        if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
            call = answer["tool_call"]
            return ToolReply("", ToolCall(id=f"call_{secrets.token_hex(12)}", name=call["name"],
                                          arguments=call["arguments"]))
        return ToolReply(answer.get("response", "") if isinstance(answer, dict) else "", None)


def closed(parameters: dict[str, Any]) -> dict[str, Any]:
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def as_plain_turn(m: ChatMessage) -> ChatMessage:
    """A message with tool fields as the plain turn every template renders."""
    if m.role == "assistant" and m.tool_calls:
        calls = [{"tool_call": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        return ChatMessage(role="assistant", content="\n".join(json.dumps(c, ensure_ascii=False) for c in calls))
    if m.role == "tool":
        response = {"name": m.name, "tool_call_id": m.tool_call_id, "content": m.content}
        return ChatMessage(role="user", content=json.dumps(
            {"tool_response": {k: v for k, v in response.items() if v is not None}}, ensure_ascii=False))
    return m
