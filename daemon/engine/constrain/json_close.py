"""The shortest text that turns a JSON prefix into a document its schema accepts: budget-aware closing.

When a constrained answer is about to run out of `max_tokens`, the sequence forces this completion instead
of failing (edgellm/daemon/engine/sequence.py): an open string is closed, a half-written number or literal
finished, a half-written key completed to a property the schema declares, missing required properties given
their smallest values, and every open object and array closed. The grammar engine checks the result before
it is forced, so this only has to be good, not perfect: where it cannot tell (a `pattern`, a `$ref`), it
returns None and the request fails as it did before.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

Schema = dict[str, Any]
_HALF_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{0,3})$")
SAMPLES = ("0", "a", "2000-01-01", "2000-01-01T00:00:00Z", "00:00:00")  # tails for pattern and format strings


def _fits(schema: Schema, frame: _Frame) -> bool:
    """Whether an object schema allows the keys and the string values (a const or enum) written so far."""
    declared = schema.get("properties") or {}
    if not all(k in declared for k in frame.keys):
        return False
    return all(declared[k].get("const", v) == v and v in declared[k].get("enum", [v])
               for k, v in frame.strings.items())


def _smallest_number(schema: Schema) -> int:
    """0 if the bounds allow it, else the whole number nearest to 0 inside them."""
    low, above = schema.get("minimum"), schema.get("exclusiveMinimum")
    high, below = schema.get("maximum"), schema.get("exclusiveMaximum")
    if low is not None and low > 0:
        return math.ceil(low)
    if above is not None and above >= 0:
        return math.floor(above) + 1
    if high is not None and high < 0:
        return math.floor(high)
    if below is not None and below <= 0:
        return math.ceil(below) - 1
    return 0


def _formatted(value: str, schema: Schema) -> bool:
    checker = jsonschema.FormatChecker()
    return "format" not in schema or checker.conforms(value, schema["format"])


class _CannotClose(Exception):
    pass


@dataclass
class _Frame:
    """An open object or array, and where the prefix stands inside it."""

    kind: str  # "object" | "array"
    source: Schema  # as written: an anyOf is resolved by the keys seen so far (see _Closer.schema)
    keys: list[str] = field(default_factory=list)
    strings: dict[str, str] = field(default_factory=dict)  # string values by key: they pick an anyOf's branch
    state: str = "start"  # object: start (a key or the end next) | colon | value | after; array: start | after
    items: int = 0


def shortest_completion(prefix: str, schema: Schema, item_sep: str = ", ", key_sep: str = ": ") -> str | None:
    """The text to append to `prefix` (a JSON document cut anywhere) so that the whole is valid under
    `schema`, kept short; None where it cannot be worked out. The separators are the ones the grammar
    writes (edgellm/daemon/engine/constrain/json_constraint.py JSON_OPTIONS)."""
    try:
        return _Closer(schema, item_sep, key_sep).close(prefix)
    except (_CannotClose, IndexError, ValueError):  # ValueError: also a prefix that is not JSON at all
        return None


class _Closer:
    def __init__(self, root: Schema, item_sep: str, key_sep: str):
        self.root, self.item_sep, self.key_sep = root, item_sep, key_sep
        self.prefix = ""

    def close(self, prefix: str) -> str:
        self.prefix = prefix
        stack: list[_Frame] = []
        expecting: Schema | None = self.root  # the schema of the value that comes next, if one does
        scalar = ""  # a number or literal being written
        in_string = escaped = False
        text = ""  # the string being written
        for c in prefix:
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
                    self._ended_string(stack, text)
                    expecting, text = None, ""
                    continue
                text += c
                continue
            if c.isspace():
                if scalar:
                    self._ended_value(stack)
                    expecting, scalar = None, ""
                continue
            if scalar and c in ",}]":
                self._ended_value(stack)
                expecting, scalar = None, ""
            if c == '"':
                in_string = True
            elif c == "{":
                stack.append(_Frame("object", expecting or {}))
                expecting = None
            elif c == "[":
                frame = _Frame("array", expecting or {})
                stack.append(frame)
                expecting = self._items(frame)
            elif c == ":":
                stack[-1].state = "value"
                expecting = self._property(stack[-1], stack[-1].keys[-1])
            elif c == ",":
                top = stack[-1]
                top.state = "start"
                expecting = self._items(top) if top.kind == "array" else None
            elif c in "}]":
                stack.pop()
                self._ended_value(stack)
                expecting = None
            else:
                scalar += c
        return self._completion(stack, expecting, scalar, text if in_string else None, escaped)

    # -- reading --------------------------------------------------------------------------------------
    def _ended_string(self, stack: list[_Frame], text: str) -> None:
        top = stack[-1] if stack else None
        text = json.loads(f'"{text}"') if "\\" in text else text
        if top is not None and top.kind == "object" and top.state == "start":
            top.keys.append(text)
            top.state = "colon"
            return
        if top is not None and top.kind == "object":
            top.strings[top.keys[-1]] = text
        self._ended_value(stack)

    @staticmethod
    def _ended_value(stack: list[_Frame]) -> None:
        if stack:
            stack[-1].state = "after"
            stack[-1].items += 1

    # -- schemas --------------------------------------------------------------------------------------
    def _resolve(self, schema: Schema, frame: _Frame | None = None) -> Schema:
        """The schema itself, or the first branch of its anyOf/oneOf that fits what `frame` holds so far."""
        if "$ref" in schema:
            raise _CannotClose
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                options = self._options(schema)
                fitting = [s for s in options if frame is None or _fits(s, frame)]
                return fitting[0] if fitting else options[0]
        if "allOf" in schema:
            merged: Schema = {}
            for part in schema["allOf"]:
                merged.update(self._resolve(part))
            return merged
        return schema

    def _options(self, schema: Schema) -> list[Schema]:
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                return [o for part in schema[combinator] for o in self._options(part)]
        return [self._resolve(schema)]

    def schema(self, frame: _Frame) -> Schema:
        return self._resolve(frame.source, frame)

    def _property(self, frame: _Frame, key: str) -> Schema:
        schema = self.schema(frame)
        declared = schema.get("properties") or {}
        if key in declared:
            return declared[key]
        extra = schema.get("additionalProperties", True)
        return extra if isinstance(extra, dict) else {}

    def _items(self, frame: _Frame) -> Schema:
        items = self.schema(frame).get("items", {})
        return items if isinstance(items, dict) else {}

    def smallest(self, schema: Schema) -> str:
        """The shortest JSON value `schema` accepts, as far as it can tell."""
        schema = self._resolve(schema)
        if "const" in schema:
            return json.dumps(schema["const"], ensure_ascii=False)
        if "enum" in schema:
            return min((json.dumps(v, ensure_ascii=False) for v in schema["enum"]), key=len)
        types = schema.get("type")
        types = types if isinstance(types, list) else [types] if types else ["null"]
        if "null" in types:
            return "null"
        kind = types[0]
        if kind == "string":
            return json.dumps(self._string_from(schema, ""), ensure_ascii=False)
        if kind in ("number", "integer"):
            return str(_smallest_number(schema))
        if kind == "boolean":
            return "false"
        if kind == "array":
            item = self.smallest(schema["items"]) if isinstance(schema.get("items"), dict) else "0"
            return "[" + self.item_sep.join([item] * schema.get("minItems", 0)) + "]"
        if kind == "object":
            return "{" + self._missing(_Frame("object", schema)) + "}"
        raise _CannotClose

    # -- writing --------------------------------------------------------------------------------------
    def _completion(self, stack: list[_Frame], expecting: Schema | None, scalar: str, string: str | None,
                    escaped: bool) -> str:
        out = ""
        top = stack[-1] if stack else None
        writing_key = top is not None and top.kind == "object" and top.state == "start"
        if string is not None:
            fix = "\\" if escaped else "0" * (4 - len(m.group(1))) if (m := _HALF_ESCAPE.search(string)) else ""
            string = json.loads(f'"{string}{fix}"')
            out += fix
            if writing_key:
                name = self._key_from(top, string)
                top.keys.append(name)
                out += json.dumps(name[len(string):], ensure_ascii=False)[1:]
                out += self.key_sep + self.smallest(self._property(top, name))
            else:
                value = self._string_value(top, expecting, string)
                if top is not None and top.kind == "object":
                    top.strings[top.keys[-1]] = value
                out += json.dumps(value[len(string):], ensure_ascii=False)[1:]
            self._ended_value(stack)
        elif scalar:
            out += self._finish_scalar(scalar)
            self._ended_value(stack)
        elif top is None:
            out += self.smallest(self.root) if expecting is not None else ""
        elif top.kind == "object" and top.state == "colon":
            out += self.key_sep + self.smallest(self._property(top, top.keys[-1]))
            self._ended_value(stack)
        elif top.kind == "object" and top.state == "value":  # after a colon: a value must follow
            out += self._rest_of(self.key_sep) + self.smallest(expecting or {})
            self._ended_value(stack)
        elif top.kind == "array" and top.state == "start" and top.items:  # after a comma: a value must follow
            out += self._rest_of(self.item_sep) + self.smallest(expecting or {})
            self._ended_value(stack)
        elif writing_key and top.keys:  # after a comma in an object: a property must follow
            name = self._key_from(top, "")
            top.keys.append(name)
            out += self._rest_of(self.item_sep) + self._member(top, name)
            self._ended_value(stack)
        while stack:
            frame = stack.pop()
            out += self._missing(frame) + ("}" if frame.kind == "object" else "]")
            self._ended_value(stack)
        return out

    def _string_value(self, top: _Frame | None, expecting: Schema | None, begun: str) -> str:
        """A string value begun as `begun`, completed; in an object with alternatives (anyOf), by the first
        alternative whose property can still take it (a tool's name picks its tool)."""
        if top is None or top.kind != "object":
            return self._string_from(self._resolve(expecting or {}), begun)
        key = top.keys[-1]
        for option in [o for o in self._options(top.source) if _fits(o, top)]:
            try:
                return self._string_from(self._resolve((option.get("properties") or {}).get(key, {})), begun)
            except _CannotClose:
                continue
        return self._string_from(self._resolve(expecting or {}), begun)

    @staticmethod
    def _string_from(schema: Schema, begun: str) -> str:
        """The shortest string the schema accepts that starts with `begun` (the part already written)."""
        if "const" in schema:
            if not (isinstance(schema["const"], str) and schema["const"].startswith(begun)):
                raise _CannotClose
            return schema["const"]
        enum = [v for v in schema.get("enum", []) if isinstance(v, str) and v.startswith(begun)]
        if "enum" in schema:
            if not enum:
                raise _CannotClose
            return min(enum, key=len)
        if "pattern" not in schema and "format" not in schema:
            return begun + "a" * max(0, schema.get("minLength", 0) - len(begun))
        candidates = [begun] + [begun + s[len(begun):] for s in SAMPLES if len(s) > len(begun)]
        for value in candidates:
            if ("pattern" not in schema or re.search(schema["pattern"], value)) and _formatted(value, schema):
                return value
        raise _CannotClose

    def _member(self, frame: _Frame, key: str) -> str:
        return f"{json.dumps(key, ensure_ascii=False)}{self.key_sep}{self.smallest(self._property(frame, key))}"

    def _rest_of(self, separator: str) -> str:
        """What the grammar's separator still needs after the prefix's end (": " after a bare ":")."""
        core = separator.strip()
        written = self.prefix[self.prefix.rindex(core) + 1:] if core in self.prefix else ""
        after = separator[separator.index(core) + 1:]
        return after[len(written):] if after.startswith(written) else ""

    def _key_from(self, frame: _Frame, begun: str) -> str:
        """The property a key begun as `begun` can still become: a missing required one, else a declared one."""
        options = self._options(frame.source)
        fit = [o for o in options if _fits(o, frame)] or options
        for schema in fit:  # the first alternative that has such a property
            declared = list(schema.get("properties") or {})
            required = [k for k in schema.get("required", []) if k not in frame.keys]
            for names in (required, declared):
                fitting = [k for k in names if k.startswith(begun) and k not in frame.keys]
                if fitting:
                    return min(fitting, key=len)
        schema = self.schema(frame)
        if schema.get("additionalProperties", True) is False or not begun:
            raise _CannotClose
        return begun

    @staticmethod
    def _finish_scalar(scalar: str) -> str:
        for literal in ("true", "false", "null"):
            if literal.startswith(scalar):
                return literal[len(scalar):]
        return "0" if scalar[-1] in ".-+eE" else ""

    def _missing(self, frame: _Frame) -> str:
        """What an open object or array still needs before it closes: required properties, minItems."""
        schema = self.schema(frame)
        if frame.kind == "object":
            missing = [k for k in schema.get("required", []) if k not in frame.keys]
            parts = [self._member(frame, k) for k in missing]
        else:
            parts = [self.smallest(self._items(frame))] * max(0, schema.get("minItems", 0) - frame.items)
        return (self.item_sep if frame.items and parts else "") + self.item_sep.join(parts)
