"""Copied fields (`"x-edgellm-copy": true`): a string field whose value must come verbatim from the prompt,
enforced by the grammar while decoding, on the real SmolLM2 tokenizer and model."""

from __future__ import annotations

import json

import llguidance
import pytest

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.constrain.json_constraint import JsonConstraint, compile_json_schema
from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError

DOCUMENT = ('FACTURA\nEmisor: "Talleres Ebro" S.L., Zaragoza\nFactura n.º TE-2024/0871   Presupuesto P-552\n'
            "Fecha: 05/03/2024\nTotal: 1.210,00 EUR")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["vendor", "invoice_number", "total"],
          "properties": {"vendor": {"type": "string", "x-edgellm-copy": True},
                         "invoice_number": {"type": "string", "x-edgellm-copy": True},
                         "total": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}}}


@pytest.fixture(scope="module")
def generator(smollm2_int4):
    return Generator(LoadedModel.load(smollm2_int4, threads=2))


def constraint(generator, schema, document=DOCUMENT) -> JsonConstraint:
    ids = generator.model.encode(document, add_special_tokens=False)
    return generator._constraint(schema, ids)


def accepts(c: JsonConstraint, generator, text: str) -> bool:
    """Whether the grammar lets `text` be produced (fed token by token, as decoding would)."""
    for token in generator.model.encode(text, add_special_tokens=False):
        if not c.matcher.consume_token(token):
            return False
    return not c.matcher.is_error()


@pytest.mark.parametrize(("output", "allowed"), [
    ('{"vendor": "\\"Talleres Ebro\\" S.L.", "invoice_number": "TE-2024/0871", "total": 1210}', True),
    ('{"vendor": "Talleres Ebro", "invoice_number": "P-552", "total": 1210, "currency": "EUR"}', True),
    ('{"vendor": "Talleres Ebro", "invoice_number": "TE-2024/0872", "total": 1210}', False),  # not in the text
    ('{"vendor": "Talleres Ebro SL", "invoice_number": "TE-2024/0871", "total": 1210}', False),
    ('{"vendor": "Ebro", "total": 1210}', False),  # a required field left out
    ('{"vendor": "Ebro", "invoice_number": "TE", "total": 1, "extra": 2}', False),  # no other properties
])
def test_a_copied_field_takes_only_text_of_the_prompt(generator, output, allowed):
    assert accepts(constraint(generator, SCHEMA), generator, output) is allowed
    json.loads(output)  # each case is valid JSON: only the copy rule decides


def test_a_copied_field_is_whole_words_and_other_fields_are_still_json_schema(generator):
    c = constraint(generator, SCHEMA)
    assert not accepts(c, generator, '{"vendor": "alleres')  # starts inside a word
    c = constraint(generator, SCHEMA)
    assert not accepts(c, generator, '{"vendor": "Talleres Ebro", "invoice_number": "P-552", "total": "1210"')


def test_generation_copies_and_the_output_is_checked_again(generator):
    prompt = "Extract vendor, invoice_number and total as JSON.\n\n" + DOCUMENT
    ids = generator.prompt_ids(prompt)
    r = generator.generate(ids, GenerationParams(max_tokens=80, temperature=0, json_schema=SCHEMA))
    value = json.loads(r.text)
    assert value["vendor"] and value["vendor"] in DOCUMENT and value["invoice_number"] in DOCUMENT
    c = constraint(generator, SCHEMA)
    with pytest.raises(EdgeError, match="is not in the prompt"):  # the final check a parsed output passes
        c.parse('{"vendor": "Acme", "invoice_number": "TE", "total": 1}')


@pytest.mark.parametrize(("pattern", "output", "allowed"), [
    ("\\d", "TE-2024/0871", True), ("\\d", "P-552", True),
    ("\\d", "Talleres Ebro", False),  # text of the prompt, but no digit: a vendor's word is not a number
    ("^TE-", "TE-2024/0871", True), ("^TE-", "P-552", False), ("^TE-", "Factura n.º TE-2024/0871", False),
    ("^[A-Z]+-\\d+$", "P-552", True), ("^[A-Z]+-\\d+$", "TE-2024/0871", False),
    ("^TE-", "TE-2024/0872", False),  # matches the pattern, not in the prompt
    ("S", "S.L., Zaragoza", True), ("S", "Ebro\\\" S.L.", False),  # a patterned copy holds no (escaped) quote
    ("\\d", "0871   Presupuesto P-552\\nFecha", False),  # no line break (the pattern sees the value itself)
    ("^[^\\n]*$", "0871   Presupuesto P-552", True),
])
def test_a_copied_field_with_a_pattern_takes_prompt_text_that_matches_it(generator, pattern, output, allowed):
    number = {"type": "string", "pattern": pattern, "x-edgellm-copy": True}
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "invoice_number": number}}
    text = f'{{"vendor": "Talleres Ebro", "invoice_number": "{output}", "total": 1210}}'
    assert accepts(constraint(generator, schema), generator, text) is allowed


def test_generation_honours_a_copied_field_s_pattern(generator):
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"],
                                       "vendor": {"type": "string", "pattern": "\\d", "x-edgellm-copy": True}}}
    ids = generator.prompt_ids("Extract vendor, invoice_number and total as JSON.\n\n" + DOCUMENT)
    value = json.loads(generator.generate(ids, GenerationParams(max_tokens=80, temperature=0, json_schema=schema)).text)
    assert value["vendor"] in DOCUMENT and any(c.isdigit() for c in value["vendor"])  # the pattern, though unnatural
    with pytest.raises(EdgeError) as err:  # a broken regex is the caller's error
        constraint(generator, {**schema, "properties": {"vendor": {"type": "string", "pattern": "(",
                                                                   "x-edgellm-copy": True}}})
    assert err.value.code == "bad_request" and err.value.param == "json_schema"


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "properties": {"n": {"type": "boolean", "x-edgellm-copy": True}}}, "applies to a plain string"),
    ({"type": "object", "properties": {"n": {"type": "string", "format": "email", "x-edgellm-copy": True}}},
     "own enum, const, format"),
    ({"type": "object", "properties": {"n": {"type": "string", "x-edgellm-copy": "yes"}}}, "must be true or false"),
    ({"type": "object", "properties": {"n": {"type": "array", "items": {"type": "string", "x-edgellm-copy": True}}}},
     "only in string fields of objects"),
    ({"$defs": {"v": {"type": "string", "x-edgellm-copy": True}}, "type": "object",
      "properties": {"n": {"$ref": "#/$defs/v"}}}, "definitions reached by"),
])
def test_a_misplaced_copy_mark_is_a_bad_request_naming_the_field(generator, schema, message):
    with pytest.raises(EdgeError, match=message) as err:
        constraint(generator, schema)
    assert err.value.code == "bad_request" and err.value.param == "json_schema"
    assert "json_schema.n" in str(err.value) or "json_schema.$defs" in str(err.value)


def test_definitions_travel_with_the_parts_the_grammar_compiles_alone(generator):
    schema = {"$defs": {"money": {"type": "number"}}, "type": "object", "required": ["vendor", "total"],
              "properties": {"vendor": {"type": "string", "x-edgellm-copy": True}, "total": {"$ref": "#/$defs/money"}}}
    lltok = generator._lltok
    assert llguidance.LLMatcher.validate_grammar(compile_json_schema(schema, lltok, DOCUMENT), lltok) == ""
    assert accepts(constraint(generator, schema), generator, '{"vendor": "Talleres", "total": 3.5}')


@pytest.mark.parametrize(("total", "allowed"), [
    ("1210", True), ("1210.5", True), ("-0.125", True), ("123456.123456", True),
    ("20.00000000000000015315", False),  # a small model's runaway digits, unbounded until max_tokens before
    ("2000000000000000", False),  # more than 15 digits before the point
    ("1e3", False),
])
def test_numbers_are_bounded_unless_the_schema_says(generator, total, allowed):
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"],
              "additionalProperties": False}
    assert accepts(constraint(generator, schema, ""), generator, f'{{"total": {total}}}') is allowed
    wide = {**schema, "properties": {"total": {"type": "number", "maximum": 1e16}}}
    if total == "2000000000000000":  # a schema's own bounds are kept
        assert accepts(constraint(generator, wide, ""), generator, f'{{"total": {total}}}')


def test_a_copied_field_never_copies_the_chat_template_s_own_system_prompt(generator):
    """The template adds "You are a helpful AI assistant named SmolLM..." around the user's text; a copied
    vendor taken from it was a real miss on receipts whose vendor line the model did not find."""
    c = generator._constraint(SCHEMA, generator.prompt_ids("Extract the fields.\n\n" + DOCUMENT))
    assert "helpful AI assistant" not in c.document and DOCUMENT in c.document
    assert not accepts(c, generator, '{"vendor": "You are a helpful AI assistant"')
    own = generator.prompt_ids(messages=[ChatMessage(role="system", content="Vendor: Acme Widgets"),
                                         ChatMessage(role="user", content=DOCUMENT)])
    assert "Acme Widgets" in generator._constraint(SCHEMA, own).document  # a system prompt the caller wrote counts


def test_the_dates_and_amounts_a_document_writes_in_three_languages():
    from edgellm.daemon.engine.constrain.document_values import amounts, dates

    text = ("Receipt 2024/965\n12 September 2026\nDue: March 3, 2027\nAMOUNT DUE £20,268.14\nSales tax 20% £3,378.02\n"
            "con fecha 26 de septiembre de 2026, por 13.310,05 EUR (IVA incluido: 1.210,00 EUR)\n"
            "du 1er mars 2026, net à payer 21\u202f702,65 €, TVA 5,5 % 1 131,85 €\nÉmise le 05/06/2025")
    assert dates(text) == ["2026-09-12", "2027-03-03", "2026-09-26", "2026-03-01", "2025-06-05", "2025-05-06"]
    found = amounts(text)
    assert {20268.14, 3378.02, 13310.05, 1210.0, 21702.65, 1131.85} <= set(found)
    assert not {12.0, 2026.0, 20.0, 5.5, 5.0, 6.0} & set(found)  # dates' parts and rates are no amounts


def test_a_copied_date_or_amount_is_one_the_document_writes(generator):
    schema = {"type": "object", "additionalProperties": False, "required": ["date", "total"],
              "properties": {"date": {"type": "string", "format": "date", "x-edgellm-copy": True},
                             "total": {"type": "number", "x-edgellm-copy": True}}}
    for output, allowed in [('{"date": "2024-03-05", "total": 1210}', True),  # 05/03/2024, day first
                            ('{"date": "2024-05-03", "total": 1210}', True),  # and month first (US)
                            ('{"date": "2024-03-06", "total": 1210}', False),
                            ('{"date": "2024-03-05", "total": 1211}', False),
                            ('{"date": "2024-03-05", "total": 121}', False)]:
        assert accepts(constraint(generator, schema), generator, output) is allowed, output
    # a document that writes no date or amount leaves those fields free, as without the mark
    assert accepts(constraint(generator, schema, "Talleres Ebro"), generator, '{"date": "2024-03-06", "total": 7}')
    c = constraint(generator, schema)
    with pytest.raises(EdgeError, match="is not in the prompt"):
        c.parse('{"date": "2024-03-05", "total": 99}')
