"""Budget-aware closing: a constrained answer about to run out of max_tokens is closed with the shortest
valid completion instead of failing (edgellm/daemon/engine/constrain/json_close.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edgellm.daemon.engine.constrain.json_close import shortest_completion
from edgellm.daemon.engine.constrain.tools import Tool, ToolUse
from edgellm.daemon.engine.params import GenerationParams

INVOICE = {"type": "object", "additionalProperties": False,
           "required": ["vendor", "invoice_number", "date", "total", "currency"],
           "properties": {"vendor": {"type": "string"}, "invoice_number": {"type": "string"},
                          "date": {"type": "string", "format": "date", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
                          "total": {"type": "number"}, "currency": {"enum": ["EUR", "USD", "GBP"]},
                          "paid": {"type": "boolean"}}}
TOOLS = ToolUse([Tool.model_validate({"function": {"name": "close_valve", "parameters": {
    "type": "object", "properties": {"valve": {"type": "integer", "minimum": 1}}, "required": ["valve"]}}}),
    Tool.model_validate({"function": {"name": "tag", "parameters": {
        "type": "object", "required": ["on", "tags"], "properties": {
            "on": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}}})],
    "auto").schema()
LINES = {"type": "array", "minItems": 2, "items": {"type": "object", "required": ["sku", "qty"], "properties": {
    "sku": {"type": "string", "minLength": 2}, "qty": {"type": "integer", "minimum": 1}}}}


@pytest.mark.parametrize(("schema", "document"), [
    (INVOICE, {"vendor": 'ACME "Tools" Ltd \u00e9', "invoice_number": "A-1", "date": "2024-03-05",
               "total": -1250.5e-1, "currency": "GBP", "paid": True}),
    (TOOLS, {"tool_call": {"name": "tag", "arguments": {"on": False, "tags": ["a", "b"]}}}),
    (TOOLS, {"response": "Valve 3 is shut.\n\\ done"}),
    (LINES, [{"sku": "AB-1", "qty": 12}, {"sku": "CD", "qty": 3}, {"sku": "EF", "qty": 1}]),
])
@pytest.mark.slow
def test_every_prefix_closes_into_a_document_the_schema_accepts(schema, document):
    for text in (json.dumps(document, ensure_ascii=False), json.dumps(document)):  # \\u escapes cut halfway too
        for cut in range(len(text) + 1):
            tail = shortest_completion(text[:cut], schema)
            assert tail is not None, text[:cut]
            jsonschema.validate(json.loads(text[:cut] + tail), schema, format_checker=jsonschema.FormatChecker())
        assert shortest_completion(text, schema) == ""


def test_what_it_cannot_complete_it_leaves_to_the_old_error():
    assert shortest_completion('{"currency": "J', INVOICE) is None  # no enum value starts with J
    assert shortest_completion('{"x": 1}}', INVOICE) is None  # not JSON


@pytest.mark.slow
def test_a_budget_too_small_for_the_answer_gives_shorter_valid_json(smollm2):
    ids = smollm2.prompt_ids("Extract the invoice fields as JSON.\n\nInvoice A-17 from Lakeside Printing Co, "
                             "2026-08-19, total 75.00 USD, paid.")
    full = smollm2.generate(ids, GenerationParams(temperature=0, max_tokens=200, json_schema=INVOICE))
    assert full.finish_reason == "stop"
    n = full.usage.completion_tokens
    for budget in (n - 2, n - 8):  # each of these failed with bad_request before
        short = smollm2.generate(ids, GenerationParams(temperature=0, max_tokens=budget, json_schema=INVOICE))
        assert short.finish_reason == "length" and short.usage.completion_tokens <= budget
        jsonschema.validate(short.json, INVOICE)
        assert short.json == json.loads(short.text)
        assert short.json != full.json
        if budget == n - 2:  # what the model wrote stays, the rest is closed (with less room, it closes sooner)
            assert short.json["vendor"] == full.json["vendor"]
