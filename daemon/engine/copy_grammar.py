"""Copied fields: a JSON schema whose string fields marked `"x-edgellm-copy": true` must take their value
verbatim from the prompt (a vendor name, an invoice number), enforced while decoding.

llguidance's Lark grammars can say "a substring of this text" (`%regex {"substring_chunks": [...]}`), but its
JSON-schema compiler cannot, so a schema with copied fields becomes a Lark grammar: the objects that hold a
copied field are written out property by property (in the schema's order, required ones always, optional
ones optionally, no others), a copied string is a run of whole chunks of the prompt (words, and each other
character alone, JSON-escaped), and every other value is llguidance's own `%json` of its sub-schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgellm.daemon.errors import EdgeError

COPY = "x-edgellm-copy"
_CHUNK = re.compile(r"\w+|\W", re.UNICODE)


def has_copied_fields(schema: Any) -> bool:
    if isinstance(schema, dict):
        return COPY in schema or any(has_copied_fields(v) for v in schema.values())
    if isinstance(schema, list):
        return any(has_copied_fields(v) for v in schema)
    return False


def copy_grammar(schema: dict[str, Any], document: str, json_options: dict[str, Any]) -> str:
    """The Lark grammar for `schema` in which every copied field is a substring of `document`."""
    return _LarkWriter(schema, document, json_options).grammar()


def copied_values(schema: Any, value: Any) -> list[str]:
    """The values an output holds in copied fields (to check them again once it is parsed)."""
    if not isinstance(schema, dict):
        return []
    if schema.get(COPY) is True:
        return [value] if isinstance(value, str) else []
    found = []
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                found += copied_values(sub, value[name])
    return found


class _LarkWriter:
    def __init__(self, schema: dict[str, Any], document: str, json_options: dict[str, Any]):
        self.root = schema
        self.defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        self.options = json_options
        chunks = [json.dumps(c, ensure_ascii=False)[1:-1] for c in _CHUNK.findall(document)]
        self.rules = [f"copied: %regex {json.dumps({'substring_chunks': chunks})}", 'empty: ""']
        self.count = 0

    def grammar(self) -> str:
        if has_copied_fields(self.defs):  # a $ref'd part is compiled by llguidance alone, which ignores the mark
            raise _bad(f"json_schema.$defs: {COPY} may not sit in definitions reached by $ref; put the field "
                       "in the object's own properties")
        start = self.value(self.root, "json_schema")
        return "%llguidance {}\n" + f"start: {start}\n" + "\n".join(self.rules) + "\n"

    def value(self, schema: Any, where: str) -> str:
        """A Lark expression for one value of `schema` (`where` names it in errors)."""
        if not isinstance(schema, dict) or not has_copied_fields(schema):
            return self.rule(f"%json {json.dumps(self.fragment(schema))}")
        if COPY in schema:
            if schema[COPY] is not True and schema[COPY] is not False:
                raise _bad(f"{where}: {COPY} must be true or false")
            if schema[COPY] is False:
                return self.value({k: v for k, v in schema.items() if k != COPY}, where)
            bounds = ("enum", "const", "pattern", "format", "minLength", "maxLength")
            if schema.get("type") != "string" or any(k in schema for k in bounds):
                raise _bad(f"{where}: {COPY} applies to a plain string field ({{\"type\": \"string\"}}); "
                           "this one has another type or its own pattern, enum, format or length")
            return '"\\"" copied "\\""'
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
            raise _bad(f"{where}: {COPY} may sit only in string fields of objects given by their "
                       "`properties` (not inside arrays, anyOf, $ref or additionalProperties)")
        return self.object(schema, where)

    def object(self, schema: dict[str, Any], where: str) -> str:
        """`{"a": .., "b": ..}` in property order; optional properties may be left out."""
        key_sep, item_sep = self.options["key_separator"], self.options["item_separator"]
        required = set(schema.get("required") or [])
        items = [(f"{json.dumps(json.dumps(name) + key_sep)} {self.value(sub, f'{where}.{name}')}",
                  name in required) for name, sub in schema["properties"].items()]
        if not items:
            return '"{}"'
        # first_i: the first present property is i or later; rest_i: properties i.. after a present one
        n = self.new_rule_number()
        sep = json.dumps(item_sep)
        for i in range(len(items) - 1, -1, -1):
            item, needed = items[i]
            rest_next = f"obj{n}_rest{i + 1}" if i + 1 < len(items) else "empty"
            first_next = f"obj{n}_first{i + 1}" if i + 1 < len(items) else "empty"
            self.rules.append(f"obj{n}_rest{i}: {sep} {item} {rest_next}" + ("" if needed else f" | {rest_next}"))
            self.rules.append(f"obj{n}_first{i}: {item} {rest_next}" + ("" if needed else f" | {first_next}"))
        return f'"{{" obj{n}_first0 "}}"'

    def fragment(self, schema: Any) -> Any:
        """A sub-schema llguidance compiles on its own: the root's $defs go with it, and the JSON options."""
        if not isinstance(schema, dict):
            return schema
        return {**self.defs, **schema, "x-guidance": self.options}

    def rule(self, body: str) -> str:
        name = f"v{self.new_rule_number()}"
        self.rules.append(f"{name}: {body}")
        return name

    def new_rule_number(self) -> int:
        self.count += 1
        return self.count


def _bad(message: str) -> EdgeError:
    return EdgeError("bad_request", f"json_schema: {message}", param="json_schema")
