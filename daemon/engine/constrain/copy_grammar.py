"""Copied fields: a JSON schema's fields marked `"x-edgellm-copy": true` take their values from the prompt,
enforced while decoding: a plain string verbatim (a vendor name, an invoice number), a `format: date` string
as one of the dates the prompt writes (ISO), a number as one of its amounts
(daemon/engine/constrain/document_values.py).
A copied string may also have a `pattern`: the value is then a substring of the prompt that matches it (an
invoice number "has a digit", so no word of the vendor's name), as JSON Schema reads a pattern: anywhere in the
value unless anchored with `^` and `$`.

llguidance's Lark grammars can say "a substring of this text" (`%regex {"substring_chunks": [...]}`), but its
JSON-schema compiler cannot, so a schema with copied fields becomes a Lark grammar: the objects that hold a
copied field are written out property by property (in the schema's order, required ones always, optional
ones optionally, no others), a copied string is a run of whole chunks of the prompt (words, and each other
character alone, JSON-escaped), intersected with its pattern's regex if it has one (`&`, which llguidance
allows between terminals), and every other value is llguidance's own `%json` of its sub-schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance

from edgellm.daemon.engine.constrain.document_values import amounts, dates, json_number
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


def copied_values(schema: Any, value: Any) -> list[tuple[str, Any]]:
    """(kind, value) for each copied field of an output (to check them again once it is parsed)."""
    if not isinstance(schema, dict):
        return []
    if schema.get(COPY) is True:
        return [(copy_kind(schema, "json_schema"), value)]
    found = []
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                found += copied_values(sub, value[name])
    return found


def is_copied(kind: str, value: Any, document: str) -> bool:
    if kind == "text":
        return isinstance(value, str) and value in document
    if kind == "date":
        found = dates(document)
        return not found or value in found  # a document without dates leaves the field free
    found = amounts(document)
    return not found or (isinstance(value, int | float) and float(value) in found)


def copy_kind(schema: dict[str, Any], where: str) -> str:
    """What a field marked x-edgellm-copy copies: 'text', 'date' or 'amount'."""
    kind, bounds = schema.get("type"), [k for k in ("enum", "const", "minLength", "maxLength") if k in schema]
    if kind == "string" and not bounds and schema.get("format") == "date":
        return "date"
    if kind == "string" and not bounds and "format" not in schema:
        return "text"
    if kind in ("number", "integer") and "enum" not in schema and "const" not in schema:
        return "amount"
    raise _bad(f"{where}: {COPY} applies to a plain string ({{\"type\": \"string\"}}), a date string "
               "({\"type\": \"string\", \"format\": \"date\"}) or a number; this one has another type or its "
               "own enum, const, format or length")


class _LarkWriter:
    def __init__(self, schema: dict[str, Any], document: str, json_options: dict[str, Any]):
        self.root = schema
        self.defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        self.options = json_options
        self.document = document
        chunks = [json.dumps(c, ensure_ascii=False)[1:-1] for c in _CHUNK.findall(document)]
        self.rules = [f"COPIED: %regex {json.dumps({'substring_chunks': chunks})}", 'empty: ""']
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
            free = {k: v for k, v in schema.items() if k != COPY}
            if schema[COPY] is False:
                return self.value(free, where)
            kind = copy_kind(schema, where)
            if kind == "text":
                return f'"\\"" {self.copied(schema.get("pattern"))} "\\""'
            if kind == "date":
                literals = [json.dumps(d) for d in dates(self.document)]
            else:
                literals = [json_number(a) for a in amounts(self.document)
                            if schema.get("type") == "number" or a.is_integer()]
            if not literals:  # the document writes none: the field is free, as without the mark
                return self.value(free, where)
            return self.rule(" | ".join(json.dumps(lit) for lit in literals))
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
            raise _bad(f"{where}: {COPY} may sit only in string fields of objects given by their "
                       "`properties` (not inside arrays, anyOf, $ref or additionalProperties)")
        return self.object(schema, where)

    def copied(self, pattern: str | None) -> str:
        """The terminal for a copied string: any run of the prompt's chunks, or those that match `pattern`
        (a string: the schema was checked against its metaschema; a broken regex fails to compile). The regex
        sees the value as JSON writes it, so a patterned copy holds no character JSON escapes (no line break,
        quote or backslash): there the written value is the value, and the pattern means what it says."""
        if pattern is None:
            return "COPIED"
        start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
        inner = llguidance.regex_to_lark(pattern[1 if start else 0: len(pattern) - 1 if end else len(pattern)],
                                         "dw")  # \d and \w are ASCII in JSON Schema (ECMAScript), as here
        name = f"COPIED{self.new_rule_number()}"
        matches = f"{'' if start else '.*'}(?:{inner}){'' if end else '.*'}"
        self.rules.append(f"{name}: COPIED & /[^\\\\]*/ & /{matches}/")
        return name

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
