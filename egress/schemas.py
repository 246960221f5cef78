"""JSON Schemas as Anthropic's structured outputs take them (sans-IO: dicts in, dicts out).

Contract: `for_anthropic(schema) -> (schema, moved)` returns a copy of a JSON Schema that Anthropic's
constrained decoding accepts, and the keywords it had to move, by path. The caller's schema is
never changed. What OpenAI's structured outputs and JSON Schema allow but Anthropic refuses with a
400 ("output_format.schema: For 'integer' type, property 'minimum' is not supported") is handled
as Anthropic's own SDKs handle it before sending: the constraint leaves the schema and is written
into the field's description (`{minimum: 1, maximum: 10}`), so the model still reads it, though
the decoder no longer enforces it; the caller is told which (`moved`, a Warning header).

Anthropic's rules (https://platform.claude.com/docs/en/build-with-claude/structured-outputs, "JSON
Schema limitations"):
  - the keywords it takes: type, description, title, enum (of primitives), const, default,
    properties, required, additionalProperties, items, minItems (0 or 1), anyOf, allOf, $ref,
    $defs, definitions, format, pattern. Any other is moved: numeric constraints (minimum,
    maximum, exclusive bounds, multipleOf), string lengths (minLength, maxLength), other array and
    object bounds (maxItems, uniqueItems, minProperties, …), and keywords the docs don't list
    (discriminator, propertyNames, prefixItems and the tuple form of `items`, $schema, …), as
    Anthropic's SDKs keep only what they know;
  - every object has `additionalProperties: false` (anything else is refused): set, and a
    schema or `true` it had is moved into the description;
  - string formats: date-time, time, date, duration, email, hostname, uri, ipv4, ipv6, uuid;
    another format is moved;
  - `oneOf` is not supported, `anyOf` is: a oneOf of the structured outputs a caller asks for
    (disjoint variants, as pydantic writes them) reads the same as an anyOf, so it becomes one;
  - a `pattern` may not use lookahead or lookbehind, backreferences or word boundaries (\\b, \\B):
    such a pattern is moved (pydantic writes a lookahead for every `Decimal`, zod 4 for `z.email()`).
An enum of objects or lists is moved too. Recursive schemas and external `$ref`s have no such
rewrite: they go as given, and Anthropic's 400 names them.
"""

from __future__ import annotations

import json
import re

# What Anthropic's decoder takes (the documented subset); any other keyword is kept for the model as
# text in the description, as Anthropic's SDKs keep only what they know: a bound (`minimum`,
# `maxLength`, …), and a keyword the docs don't list (`discriminator`, `propertyNames`,
# `prefixItems`, `$schema`, …), which would otherwise be a 400 to find out one field at a time.
_KEPT = frozenset(
    (
        "type",
        "description",
        "title",
        "enum",
        "const",
        "default",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "anyOf",
        "allOf",
        "oneOf",
        "$ref",
        "$defs",
        "definitions",
        "format",
        "pattern",
    )
)
_FORMATS = frozenset(("date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"))
# Kept keywords whose value is a list of schemas, or a map of name to schema.
_MANY = ("anyOf", "allOf", "oneOf")
_MAP = ("properties", "$defs", "definitions")
_DEPTH = 64  # deeper than any schema a caller writes: past it, a schema goes as given
# An escape (a backreference \1, \k<name>, a word boundary \b \B) or a lookaround group. Escapes
# are matched whole so that `\\b` (a backslash, then b) is not read as a word boundary; a class's
# `[\b]` (a backspace) is refused too, which only moves a pattern Anthropic might have taken.
_REGEX_PARTS = re.compile(r"\\.|\(\?<?[=!]", re.DOTALL)
_REFUSED_ESCAPES = frozenset("bBk123456789")
_KEY = 60  # a name in `moved` (the caller's property name, in a Warning header) is cut past this


def for_anthropic(schema: dict) -> tuple[dict, list[str]]:
    moved: list[str] = []
    return _schema(schema, "", moved, 0), moved


def _schema(schema: object, at: str, moved: list[str], depth: int) -> object:
    if not isinstance(schema, dict) or depth > _DEPTH:
        return schema
    out = dict(schema)
    notes: dict[str, object] = {}
    for name in [name for name in out if name not in _KEPT]:
        notes[name] = out.pop(name)
    if "items" in out and not isinstance(out["items"], dict):
        notes["items"] = out.pop("items")  # the tuple form, a list: prefixItems's older spelling
    enum = out.get("enum")
    if isinstance(enum, list) and not all(
        value is None or isinstance(value, str | int | float | bool) for value in enum
    ):
        notes["enum"] = out.pop("enum")  # of objects or lists: Anthropic takes primitives only
    if "minItems" in out and out["minItems"] not in (0, 1):
        notes["minItems"] = out.pop("minItems")
    if "pattern" in out and not _pattern_taken(out["pattern"]):
        notes["pattern"] = out.pop("pattern")
    form = out.get("format")
    if isinstance(form, str) and form not in _FORMATS and _is_string(out):
        notes["format"] = out.pop("format")
    if _is_object(out):
        extra = out.get("additionalProperties", False)
        if extra is not False:
            notes["additionalProperties"] = extra
        out["additionalProperties"] = False
    one_of = "oneOf" in out and "anyOf" not in out
    if one_of:
        out["anyOf"] = out.pop("oneOf")
    if "items" in out:
        out["items"] = _schema(out["items"], f"{at}.items", moved, depth + 1)
    for name in _MANY:
        if isinstance(out.get(name), list):
            said = "oneOf" if one_of and name == "anyOf" else name  # a path names what the caller sent
            out[name] = [_schema(item, f"{at}.{said}[{i}]", moved, depth + 1) for i, item in enumerate(out[name])]
    for name in _MAP:
        if isinstance(out.get(name), dict):
            out[name] = {
                key: _schema(value, f"{at}.{name}.{_printable(key)}", moved, depth + 1)
                for key, value in out[name].items()
            }
    if notes:
        moved.extend(f"{at}.{name}".lstrip(".") for name in notes)
        # json, not orjson: a bound past 64 bits (valid JSON, refused by orjson) is written too.
        text = "{" + ", ".join(f"{name}: {_text(value)}" for name, value in notes.items()) + "}"
        description = out.get("description")
        out["description"] = f"{description}\n\n{text}" if isinstance(description, str) and description else text
    return out


def _pattern_taken(pattern: object) -> bool:
    if not isinstance(pattern, str):
        return False
    for part in _REGEX_PARTS.finditer(pattern):
        text = part.group()
        if text[0] == "(" or text[1] in _REFUSED_ESCAPES:
            return False
    return True


def _printable(key: str) -> str:
    """A property's name as a path names it: control characters escaped (`moved` becomes a header,
    where a CR LF would start a header of the caller's choosing), a long name cut."""
    if not key.isprintable():
        key = "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in key)
    return key if len(key) <= _KEY else key[:_KEY] + "..."


def _text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _types(schema: dict) -> tuple:
    kind = schema.get("type")
    return tuple(kind) if isinstance(kind, list) else (kind,)


def _is_object(schema: dict) -> bool:
    return "object" in _types(schema) or ("properties" in schema and "type" not in schema)


def _is_string(schema: dict) -> bool:
    return "string" in _types(schema) or "type" not in schema
