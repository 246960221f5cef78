"""JSON Schemas for Anthropic's structured outputs (egress/schemas.py)."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.schemas import for_anthropic

# What pydantic writes for a model with bounds (Field(ge=0, le=150), constr(max_length=40),
# conlist(min_length=2), an email, a nested model, a union): the schemas OpenAI clients send.
PERSON = {
    "title": "Person",
    "type": "object",
    "properties": {
        "name": {"title": "Name", "type": "string", "maxLength": 40},
        "age": {"title": "Age", "type": "integer", "minimum": 0, "maximum": 150, "description": "Years."},
        "email": {"title": "Email", "type": "string", "format": "email"},
        "site": {"type": "string", "format": "iri-reference"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 5},
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "pet": {"$ref": "#/$defs/Pet"},
        "id": {"oneOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string", "minLength": 1}]},
        "extra": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name", "age"],
    "$defs": {"Pet": {"type": "object", "properties": {"legs": {"type": "integer", "multipleOf": 2}}}},
}


def test_unsupported_constraints_move_into_descriptions_and_objects_close():
    original = copy.deepcopy(PERSON)
    schema, moved = for_anthropic(PERSON)
    assert original == PERSON  # the caller's schema is never changed
    properties = schema["properties"]
    assert properties["name"] == {"title": "Name", "type": "string", "description": "{maxLength: 40}"}
    assert properties["age"] == {
        "title": "Age",
        "type": "integer",
        "description": "Years.\n\n{minimum: 0, maximum: 150}",
    }
    assert properties["email"] == {"title": "Email", "type": "string", "format": "email"}  # a format Anthropic has
    assert properties["site"] == {"type": "string", "description": '{format: "iri-reference"}'}
    assert properties["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "{maxItems: 5, minItems: 2}",
    }
    assert properties["notes"]["minItems"] == 1  # 0 and 1 are supported
    assert properties["id"] == {
        "anyOf": [
            {"type": "integer", "description": "{exclusiveMinimum: 0}"},
            {"type": "string", "description": "{minLength: 1}"},
        ]
    }
    assert properties["extra"] == {
        "type": "object",
        "additionalProperties": False,
        "description": '{additionalProperties: {"type":"string"}}',
    }
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Pet"] == {
        "type": "object",
        "properties": {"legs": {"type": "integer", "description": "{multipleOf: 2}"}},
        "additionalProperties": False,
    }
    assert sorted(moved) == sorted(
        [
            "properties.name.maxLength",
            "properties.age.minimum",
            "properties.age.maximum",
            "properties.site.format",
            "properties.tags.maxItems",
            "properties.tags.minItems",
            "properties.id.oneOf[0].exclusiveMinimum",  # named as the caller wrote it, sent as anyOf
            "properties.id.oneOf[1].minLength",
            "properties.extra.additionalProperties",
            "$defs.Pet.properties.legs.multipleOf",
        ]
    )


def test_a_schema_anthropic_takes_comes_back_the_same():
    plain = {
        "type": "object",
        "properties": {"a": {"type": "string", "enum": ["x", "y"]}, "b": {"type": ["integer", "null"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    assert for_anthropic(plain) == (plain, [])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


_KEYWORDS = [
    *("type", "properties", "items", "anyOf", "oneOf", "minimum", "format", "additionalProperties", "$defs", "pattern")
]


@given(st.dictionaries(st.sampled_from([*_KEYWORDS, "description", "minItems"]), _JSON))
@settings(max_examples=300, deadline=None)
def test_any_json_never_raises_and_a_second_pass_changes_nothing(schema):
    once, _ = for_anthropic(schema)
    assert for_anthropic(once) == (once, [])


@pytest.mark.parametrize("depth", [10, 200])
def test_a_deep_schema_is_bounded(depth):
    schema: dict = {"type": "string", "maxLength": 3}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    for_anthropic(schema)  # no RecursionError


# -- through the real egress, with the OpenAI SDK and a fake Anthropic as strict as the API ----------

from tests.test_responses import gateway, last_anthropic_body  # noqa: E402, F401  (the fixture)


def _client(gateway):  # noqa: F811
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-ant-byo", max_retries=0)


def _structured(gateway, name: str, schema: dict):  # noqa: F811
    """A strict json_schema chat request for a Claude model through egress: the raw response."""
    return _client(gateway).chat.completions.with_raw_response.create(
        model="claude-fake",
        messages=[{"role": "user", "content": f"a {name}"}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )


def test_a_pydantic_schema_with_bounds_answers_on_claude_and_says_what_is_not_enforced(gateway, fake_provider):  # noqa: F811
    """A pydantic model with `Field(ge=0, le=150)` and `max_length=40` (what OpenAI clients send as
    strict structured outputs) was refused by Anthropic with a 400 ("For 'integer' type, property
    'minimum' is not supported"). Now it answers: the bounds go into the descriptions, as Anthropic's
    SDK sends them, and a Warning says they are not enforced."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    raw = _structured(gateway, "person", schema)
    assert raw.http_response.status_code == 200
    sent = last_anthropic_body(fake_provider)["output_config"]["format"]["schema"]
    assert sent["properties"]["age"] == {"type": "integer", "description": "{minimum: 0}"}
    assert sent["properties"]["name"] == {"type": "string", "description": "{maxLength: 40}"}
    warning = raw.http_response.headers["warning"]
    assert "properties.name.maxLength, properties.age.minimum not enforced" in warning
    responses = _client(gateway).responses.with_raw_response.create(
        model="claude-fake",
        input="a person",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )
    assert responses.http_response.status_code == 200
    assert responses.http_response.headers["warning"].startswith('299 egress "text.format:')


# What pydantic writes for a `Decimal` field and zod 4 for `z.email()`: a `pattern` with a lookahead,
# which Anthropic's regex subset refuses (structured-outputs docs, "JSON Schema limitations": no
# lookahead/lookbehind, backreferences or word boundaries).
DECIMAL = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$"}]}
ZOD_EMAIL = {
    "type": "string",
    "format": "email",
    "pattern": "^(?!\\.)(?!.*\\.\\.)([A-Za-z0-9_'+\\-\\.]*)[A-Za-z0-9_+-]@"
    "([A-Za-z0-9][A-Za-z0-9\\-]*\\.)+[A-Za-z]{2,}$",
}


@pytest.mark.parametrize(
    "pattern",
    [
        DECIMAL["anyOf"][1]["pattern"],
        ZOD_EMAIL["pattern"],
        "(?<=a)b",
        "(?<!a)b",
        "(?=x)",
        "^(a)\\1$",
        "\\bword\\b",
        "\\Bx",
        "(?<n>a)\\k<n>",
    ],
)
def test_a_pattern_anthropic_refuses_moves_into_the_description(pattern):
    schema, moved = for_anthropic({"type": "string", "pattern": pattern})
    assert schema == {"type": "string", "description": "{pattern: " + json.dumps(pattern, ensure_ascii=False) + "}"}
    assert moved == ["pattern"]


@pytest.mark.parametrize("pattern", ["^[A-Z]{3}$", "^\\d+(\\.\\d+)?$", "a\\\\b", "^(?:ab)+$", "(?<x>a)", "\\(?=\\)"])
def test_a_pattern_anthropic_takes_stays(pattern):
    schema = {"type": "string", "pattern": pattern}
    assert for_anthropic(schema) == (schema, [])


@pytest.mark.parametrize("key", ["a\r\nx-injected: 1", "a\x00b", "k" * 10_000], ids=["crlf", "nul", "long"])
def test_a_moved_name_is_printable_and_short(key):
    """A property's name is the caller's text and ends up in a Warning header: a CR LF in it was a
    header of egress's response, and a 10 kB name a 10 kB header line."""
    _, moved = for_anthropic({"type": "object", "properties": {key: {"type": "string", "maxLength": 3}}})
    (name,) = moved
    assert name.isprintable() and len(name) < 200
    assert name.startswith("properties.") and name.endswith(".maxLength")


def test_a_property_name_with_crlf_starts_no_header_of_the_response(gateway):  # noqa: F811
    """Through the real egress: the Warning header names the property, and its CR LF was written
    into egress's response head as is, a header (`x-injected`) of the caller's choosing."""
    import orjson

    from tests.support import RawClient, request_bytes

    schema = {"type": "object", "properties": {"a\r\nx-injected: yes": {"type": "string", "maxLength": 3}}}
    body = orjson.dumps(
        {
            "model": "claude-fake",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
    )
    headers = {"authorization": "Bearer sk-ant-byo", "content-type": "application/json"}
    with RawClient(gateway.port) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
        response = client.read_response("POST")
    assert response.status == 200
    assert "x-injected" not in response.headers
    assert "nx-injected: yes.maxLength not enforced" in response.headers["warning"]  # named, escaped


def test_a_warning_value_never_breaks_its_header():
    """Whatever text a warning quotes (a caller's names), its value is one quoted-string on one line,
    bounded: a control byte is `?`, and the cut comes before quoting, so no escape is left half."""
    from egress.surface import _warning

    value = _warning('a\r\nx-injected: yes "q" \\ \x00\x7f')
    assert value == b'299 egress "a??x-injected: yes \\"q\\" \\\\ ??"'
    long = _warning("\\" * 5000)
    assert long.startswith(b'299 egress "') and long.endswith(b'"') and long.count(b"\\") == 2048


def test_a_lookahead_pattern_answers_on_claude(gateway, fake_provider):  # noqa: F811
    """pydantic writes a lookahead `pattern` for every Decimal field; Anthropic's decoder refuses
    lookaround (the fake too): the pattern goes into the description, and the request answers."""
    decimal = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$"}]}
    schema = {"type": "object", "properties": {"price": decimal}, "required": ["price"], "additionalProperties": False}
    raw = _structured(gateway, "price", schema)
    assert raw.http_response.status_code == 200
    sent = last_anthropic_body(fake_provider)["output_config"]["format"]["schema"]
    assert "pattern" not in sent["properties"]["price"]["anyOf"][1]
    assert "properties.price.anyOf[1].pattern" in raw.http_response.headers["warning"]


def test_keywords_anthropic_does_not_list_are_moved_as_its_sdks_keep_only_what_they_know():
    """zod 4 writes `$schema` at the root and `propertyNames` for records, pydantic `discriminator`
    for tagged unions, tuples as `prefixItems`: none is in Anthropic's documented subset, and each
    was a 400 to find one at a time. The tuple form of `items` and an enum of objects likewise."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "pet": {"oneOf": [{"type": "string"}, {"type": "integer"}], "discriminator": {"propertyName": "kind"}},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            "old": {"type": "array", "items": [{"type": "string"}]},
            "tags": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
            "shape": {"enum": [{"x": 1}, {"y": 2}]},
            "color": {"enum": ["red", None, 3]},
        },
    }
    shaped, moved = for_anthropic(schema)
    assert "$schema" not in shaped and shaped["description"].startswith('{$schema: "https://')
    properties = shaped["properties"]
    assert properties["pet"] == {
        "anyOf": [{"type": "string"}, {"type": "integer"}],
        "description": '{discriminator: {"propertyName":"kind"}}',
    }
    assert "prefixItems" not in properties["pair"] and "items" not in properties["old"]
    assert "propertyNames" not in properties["tags"] and properties["tags"]["additionalProperties"] is False
    assert "enum" not in properties["shape"] and properties["color"]["enum"] == ["red", None, 3]
    assert set(moved) == {
        "$schema",
        "properties.pet.discriminator",
        "properties.pair.prefixItems",
        "properties.old.items",
        "properties.tags.propertyNames",
        "properties.shape.enum",
    }


def test_many_strict_tools_give_a_bounded_number_of_warnings(gateway, fake_provider):  # noqa: F811
    """A Warning a strict schema: 128 strict tools with bounds gave 128 headers, about 57 KB, past
    the 16 KiB Node's and h11's parsers take. At most eight now, the last counting the rest."""
    client = _client(gateway)
    parameters = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1}},
        "additionalProperties": False,
    }
    tools = [
        {"type": "function", "function": {"name": f"t{i}", "parameters": parameters, "strict": True}} for i in range(40)
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="claude-fake", messages=[{"role": "user", "content": "hi"}], tools=tools
    )
    assert raw.http_response.status_code == 200
    warnings = raw.http_response.headers.get_list("warning")
    assert len(warnings) == 8 and "33 more schemas" in warnings[-1]
