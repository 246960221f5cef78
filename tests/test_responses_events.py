"""The Responses stream validator (tests/responses_events.py) against real recordings and broken copies.

Every recorded Responses stream in tests/recordings/ must validate fed whole, except where a
provider departs from what OpenAI's own recordings do (EXPECTED_FAILURES names the rule). Each
mutation takes a valid stream, breaks one rule, renumbers `sequence_number` where events were
added, removed or moved (so that only the intended rule can trip), and must fail with that rule's
message. The validator's tables are checked against the installed openai SDK's type definitions.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.responses_events import (
    EVENT_FIELDS,
    INCOMPLETE_REASONS,
    ITEM_FIELDS,
    OUTPUT_ITEM_TYPES,
    RESPONSE_FIELDS,
    TERMINAL_STATUS,
    parse_sse,
    validate_stream,
)

RECORDINGS = Path(__file__).parent / "recordings"
STREAMS = sorted(path.parent.name for path in RECORDINGS.glob("*responses_stream*/body"))

# OpenAI's own stream from March 2025 predates `sequence_number`: no event carries one. It is
# validated with require_sequence_numbers=False (all other rules apply); the default stays strict.
LEGACY_NO_SEQUENCE = {"openai__responses_stream_simple"}

# Provider quirks that OpenAI's recordings never show, so the rule stays strict and the recording
# is expected to fail with it (test_openrouter_quirks shows each quirk separately).
EXPECTED_FAILURES = {
    # `data: [DONE]` after response.completed (parse_sse), and response.completed output[0] carries a
    # different id (rs_tmp_ku4i7pagjwn) from the reasoning item it streamed (rs_tmp_2kbe7x16sax).
    "openrouter__responses_stream_cost": r"data: \[DONE\] is the Chat Completions terminator",
}


def body_of(name: str) -> bytes:
    return (RECORDINGS / name / "body").read_bytes()


def options(name: str) -> dict:
    return {"require_sequence_numbers": name not in LEGACY_NO_SEQUENCE}


# --- The recordings ---------------------------------------------------------------------------


def test_recordings_found():
    assert set(STREAMS) >= {
        "deepseek__responses_stream_tools_cached",
        "openai__responses_stream_simple",
        "openai__responses_stream_web_search_cached_reasoning",
        "openrouter__responses_stream_cost",
    }


@pytest.mark.parametrize("name", STREAMS)
def test_recording_validates(name):
    if name in EXPECTED_FAILURES:
        with pytest.raises(AssertionError, match=EXPECTED_FAILURES[name]):
            validate_stream(parse_sse(body_of(name)), **options(name))
        return
    response = validate_stream(parse_sse(body_of(name)), **options(name))
    # The returned object is the terminal response: its usage is the one meta.json records.
    expected = json.loads((RECORDINGS / name / "meta.json").read_bytes())["expected"]
    usage = response["usage"]
    assert response["status"] == "completed" and response["model"] == expected["model"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (expected["input_tokens"], expected["output_tokens"])
    assert usage["input_tokens_details"]["cached_tokens"] == expected["cache_read_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == expected["reasoning_tokens"]


def test_legacy_recording_fails_the_default_sequence_rule():
    with pytest.raises(AssertionError, match=r"event #0 'response.created' .*sequence_number missing"):
        validate_stream(parse_sse(body_of("openai__responses_stream_simple")))


def test_openrouter_quirks():
    body = body_of("openrouter__responses_stream_cost")
    with pytest.raises(AssertionError, match=r"SSE event #40: data: \[DONE\]"):
        parse_sse(body)
    without_done = body.replace(b"data: [DONE]\n\n", b"")
    with pytest.raises(
        AssertionError,
        match=r"response.completed output\[0\] differs .*: id 'rs_tmp_ku4i7pagjwn' != 'rs_tmp_2kbe7x16sax'",
    ):
        validate_stream(parse_sse(without_done))
    # With both quirks undone the rest holds, including its interleaved items (the reasoning item
    # is closed after the message item that was added while it was open).
    response = validate_stream(parse_sse(without_done.replace(b"rs_tmp_ku4i7pagjwn", b"rs_tmp_2kbe7x16sax")))
    assert response["usage"]["cost"] == 1.13e-05


# --- Editing event lists ----------------------------------------------------------------------

Events = list[tuple[str | None, dict]]


def renumber(events: Events) -> Events:
    """Sequence numbers 0, 1, 2, ... again after events were added, removed or moved (none if none)."""
    if any("sequence_number" in body for _, body in events):
        for number, (_, body) in enumerate(events):
            body["sequence_number"] = number
    return events


def insert(events: Events, at: int, *bodies: dict) -> Events:
    """`bodies` inserted at `at` (under their own type as SSE name), then renumbered."""
    return renumber([*events[:at], *((body["type"], body) for body in bodies), *events[at:]])


def find(events: Events, kind: str, after: int = 0, **where) -> int | None:
    for index in range(after, len(events)):
        body = events[index][1]
        if body["type"] == kind and all(body.get(key) == value for key, value in where.items()):
            return index
    return None


# --- A synthetic stream for what no recording has: summaries, refusals, annotations, other ends --


class Emitter:
    def __init__(self) -> None:
        self.events: Events = []

    def __call__(self, kind: str, **fields) -> dict:
        body = {"type": kind, "sequence_number": len(self.events), **copy.deepcopy(fields)}
        self.events.append((kind, body))
        return body


def response_object(status: str, output: list, **extra) -> dict:
    return {
        "id": "resp_synthetic",
        "object": "response",
        "created_at": 1700000000,
        "model": "gpt-test",
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "usage": None,
        **extra,
    }


def stream_text(
    emit: Emitter, kind: str, index: int, item_id: str, pieces: list[str], *, content: int = 0, annotations=()
) -> str:
    """One content part (output_text / refusal / reasoning_text) streamed in `pieces`.

    `annotations` are sent after the deltas and before the text's `.done`, as OpenAI sends them.
    """
    field, delta, done = {
        "output_text": ("text", "response.output_text.delta", "response.output_text.done"),
        "refusal": ("refusal", "response.refusal.delta", "response.refusal.done"),
        "reasoning_text": ("text", "response.reasoning_text.delta", "response.reasoning_text.done"),
    }[kind]
    where = {"item_id": item_id, "output_index": index, "content_index": content}
    part = {"type": kind, field: ""} | ({"annotations": []} if kind == "output_text" else {})
    emit("response.content_part.added", **where, part=part)
    extra = {"logprobs": []} if kind == "output_text" else {}
    for piece in pieces:
        emit(delta, **where, delta=piece, **extra)
    for number, annotation in enumerate(annotations):
        emit("response.output_text.annotation.added", **where, annotation_index=number, annotation=annotation)
    text = "".join(pieces)
    emit(done, **where, **{field: text}, **extra)
    emit("response.content_part.done", **where, part=part | {field: text})
    return text


def synthetic_events(terminal: str = "response.completed") -> Events:
    emit, output = Emitter(), []
    emit("response.created", response=response_object("in_progress", []))
    emit("response.in_progress", response=response_object("in_progress", []))

    # 0: reasoning with two summary parts
    reasoning = {"id": "rs_1", "type": "reasoning", "summary": []}
    emit("response.output_item.added", output_index=0, item=reasoning)
    summary = []
    for number, pieces in enumerate((["Think", "ing"], ["Done", " thinking"])):
        where = {"item_id": "rs_1", "output_index": 0, "summary_index": number}
        emit("response.reasoning_summary_part.added", **where, part={"type": "summary_text", "text": ""})
        for piece in pieces:
            emit("response.reasoning_summary_text.delta", **where, delta=piece)
        text = "".join(pieces)
        emit("response.reasoning_summary_text.done", **where, text=text)
        emit("response.reasoning_summary_part.done", **where, part={"type": "summary_text", "text": text})
        summary.append({"type": "summary_text", "text": text})
    output.append(reasoning | {"summary": summary})
    emit("response.output_item.done", output_index=0, item=output[-1])

    # 1: message with an annotated output_text part and a refusal part
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    emit("response.output_item.added", output_index=1, item=message)
    annotation = {"type": "url_citation", "start_index": 0, "end_index": 5, "title": "t", "url": "https://example.com"}
    text = stream_text(emit, "output_text", 1, "msg_1", ["Hello", ", ", "world"], annotations=[annotation])
    refusal = stream_text(emit, "refusal", 1, "msg_1", ["I can", "not"], content=1)
    content = [
        {"type": "output_text", "text": text, "annotations": [annotation]},
        {"type": "refusal", "refusal": refusal},
    ]
    output.append(message | {"status": "completed", "content": content})
    emit("response.output_item.done", output_index=1, item=output[-1])

    # 2: function call
    call = {
        "id": "fc_1",
        "type": "function_call",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": "",
        "status": "in_progress",
    }
    emit("response.output_item.added", output_index=2, item=call)
    for piece in ('{"q"', ': "x"}'):
        emit("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta=piece)
    emit("response.function_call_arguments.done", item_id="fc_1", output_index=2, arguments='{"q": "x"}')
    output.append(call | {"arguments": '{"q": "x"}', "status": "completed"})
    emit("response.output_item.done", output_index=2, item=output[-1])

    usage = {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 10},
        "total_tokens": 50,
    }
    extra: dict = {"usage": usage}
    if terminal == "response.incomplete":
        extra["incomplete_details"] = {"reason": "max_output_tokens"}
    if terminal == "response.failed":
        extra["error"] = {"code": "server_error", "message": "boom"}
    emit(terminal, response=response_object(TERMINAL_STATUS[terminal], output, **extra))
    return emit.events


def test_synthetic_stream_validates():
    response = validate_stream(synthetic_events())
    assert [item["type"] for item in response["output"]] == ["reasoning", "message", "function_call"]


@pytest.mark.parametrize("terminal", ["response.incomplete", "response.failed"])
def test_other_terminal_events_validate(terminal):
    assert validate_stream(synthetic_events(terminal))["status"] == TERMINAL_STATUS[terminal]


def test_incomplete_needs_a_reason():
    events = synthetic_events("response.incomplete")
    events[-1][1]["response"]["incomplete_details"] = None
    with pytest.raises(AssertionError, match=r"incomplete_details.reason must be one of"):
        validate_stream(events)


def test_failed_needs_an_error():
    events = synthetic_events("response.failed")
    events[-1][1]["response"]["error"] = None
    with pytest.raises(AssertionError, match=r"a failed response needs error.code and error.message"):
        validate_stream(events)


def test_failed_may_leave_items_open():
    events = synthetic_events("response.failed")
    last_done = max(i for i, (_, body) in enumerate(events) if body["type"] == "response.output_item.done")
    validate_stream(renumber(events[:last_done] + events[last_done + 1 :]))


def test_sdk_event_outside_the_core_is_accepted():
    """response.output_text.annotation.added (in the SDK union) inside a real OpenAI stream."""
    events = parse_sse(body_of("openai__responses_stream_web_search_cached_reasoning"))
    at = find(events, "response.output_text.done")
    annotation = {
        "type": "response.output_text.annotation.added",
        "item_id": events[at][1]["item_id"],
        "output_index": 3,
        "content_index": 0,
        "annotation_index": 0,
        "annotation": None,
    }
    validate_stream(insert(events, at, annotation))
    annotation["annotation_index"] = 1
    with pytest.raises(AssertionError, match=r"annotation_index 1 out of order: expected 0"):
        validate_stream(insert(events, at, annotation))


# --- Mutations ------------------------------------------------------------------------------------


def has_sequence(events: Events) -> bool:
    return "sequence_number" in events[0][1]


def remove(kind: str) -> Callable[[Events], Events | None]:
    def mutate(events: Events) -> Events | None:
        at = find(events, kind)
        return None if at is None else renumber(events[:at] + events[at + 1 :])

    return mutate


def delta_before_its_opener(delta: str, opener: str, key: str) -> Callable[[Events], Events | None]:
    """Move the first `delta` event to just before the `opener` it depends on."""

    def mutate(events: Events) -> Events | None:
        at = find(events, delta)
        if at is None:
            return None
        body = events[at][1]
        where = {"output_index": body["output_index"]} | ({key: body[key]} if key != "output_index" else {})
        opened = find(events, opener, **where)
        moved = events[:at] + events[at + 1 :]
        return insert(moved, opened, events[at][1])

    return mutate


def alter_delta(kind: str) -> Callable[[Events], Events | None]:
    def mutate(events: Events) -> Events | None:
        at = find(events, kind)
        if at is None:
            return None
        events[at][1]["delta"] += "X"
        return events

    return mutate


def repeat_sequence_number(events: Events) -> Events | None:
    if not has_sequence(events):
        return None
    middle = len(events) // 2
    events[middle][1]["sequence_number"] = events[middle - 1][1]["sequence_number"]
    return events


def skip_sequence_number(events: Events) -> Events | None:
    if not has_sequence(events):
        return None
    for _, body in events[len(events) // 2 :]:
        body["sequence_number"] += 1
    return events


def sequence_from_one(events: Events) -> Events | None:
    if not has_sequence(events):
        return None
    for _, body in events:
        body["sequence_number"] += 1
    return events


def drop_one_sequence_number(events: Events) -> Events | None:
    if not has_sequence(events):
        return None
    del events[len(events) // 2][1]["sequence_number"]
    return events


def empty_completed_output(events: Events) -> Events:
    events[-1][1]["response"]["output"] = []
    return events


def completed_id_changed(events: Events) -> Events:
    events[-1][1]["response"]["id"] += "-other"
    return events


def completed_status_wrong(events: Events) -> Events:
    events[-1][1]["response"]["status"] = "in_progress"
    return events


def completed_output_item_id_changed(events: Events) -> Events:
    events[-1][1]["response"]["output"][0]["id"] += "-other"
    return events


def event_after_terminal(events: Events) -> Events:
    at = find(events, "response.output_item.done")
    return insert(events, len(events), copy.deepcopy(events[at][1]))


def second_terminal(events: Events) -> Events:
    return insert(events, len(events), copy.deepcopy(events[-1][1]))


def duplicate_output_item_done(events: Events) -> Events:
    at = find(events, "response.output_item.done")
    return insert(events, at + 1, copy.deepcopy(events[at][1]))


def shift_output_indexes(events: Events) -> Events:
    for _, body in events:
        if "output_index" in body:
            body["output_index"] += 1
    return events


def done_message_text_changed(events: Events) -> Events | None:
    for _, body in events:
        if body["type"] == "response.output_item.done" and body["item"]["type"] == "message":
            body["item"]["content"][0]["text"] += "X"
            return events
    return None


def done_function_name_changed(events: Events) -> Events | None:
    for _, body in events:
        if body["type"] == "response.output_item.done" and body["item"]["type"] == "function_call":
            body["item"]["name"] += "X"
            return events
    return None


def arguments_not_json(events: Events) -> Events | None:
    done = find(events, "response.function_call_arguments.done")
    if done is None:
        return None
    last_delta = max(i for i in range(done) if events[i][1]["type"] == "response.function_call_arguments.delta")
    events[last_delta][1]["delta"] += "}"
    events[done][1]["arguments"] += "}"
    return events


def item_id_changed(events: Events) -> Events | None:
    for _, body in events:
        if body["type"].endswith(".delta") and "item_id" in body:
            body["item_id"] += "-other"
            return events
    return None


def required_field_dropped(events: Events) -> Events:
    at = find(events, "response.output_item.added")
    del events[at][1]["output_index"]
    return events


def unknown_event_type(events: Events) -> Events:
    body = {"type": "response.output_text.bogus", "sequence_number": 0}
    return insert(events, 2, body)


def sse_name_differs(events: Events) -> Events:
    body = events[2][1]
    events[2] = (
        "response.output_item.done" if body["type"] != "response.output_item.done" else "response.created",
        body,
    )
    return events


def error_event_inside(events: Events) -> Events:
    body = {"type": "error", "sequence_number": 0, "message": "boom", "code": None, "param": None}
    return insert(events, 2, body)


def usage_total_wrong(events: Events) -> Events:
    events[-1][1]["response"]["usage"]["total_tokens"] += 1
    return events


def usage_without_cached_tokens(events: Events) -> Events:
    del events[-1][1]["response"]["usage"]["input_tokens_details"]["cached_tokens"]
    return events


MUTATIONS: dict[str, tuple[Callable[[Events], Events | None], str]] = {
    # lifecycle
    "drop_created": (
        remove("response.created"),
        r"event #0 'response.in_progress' .*the first event must be response.created",
    ),
    "drop_in_progress": (remove("response.in_progress"), r"the second event must be response.in_progress"),
    "event_after_terminal": (
        event_after_terminal,
        r"1 event\(s\) after the terminal response\.(completed|incomplete|failed)",
    ),
    "second_terminal": (second_terminal, r"1 event\(s\) after the terminal response\.completed"),
    "unknown_event_type": (
        unknown_event_type,
        r"type 'response.output_text.bogus' is not in the SDK's ResponseStreamEvent union",
    ),
    "sse_name_differs": (sse_name_differs, r"event #2: SSE event name .* differs from type"),
    "error_event_inside": (error_event_inside, r"event #2 'error' .*error event in the stream"),
    "required_field_dropped": (required_field_dropped, r"missing required field\(s\) \['output_index'\]"),
    # sequence numbers
    "repeat_sequence_number": (repeat_sequence_number, r"sequence_number \d+ breaks the 0, 1, 2, \.\.\. order"),
    "skip_sequence_number": (skip_sequence_number, r"sequence_number \d+ breaks the 0, 1, 2, \.\.\. order"),
    "sequence_from_one": (sequence_from_one, r"event #0 .*sequence_number 1 breaks .*expected 0"),
    "drop_one_sequence_number": (drop_one_sequence_number, r"sequence_number missing or not an integer"),
    # response objects
    "completed_id_changed": (
        completed_id_changed,
        r"response id changed: created '[^']+', in_progress '[^']+', response.completed '[^']+-other'",
    ),
    "completed_status_wrong": (completed_status_wrong, r"response.status is 'in_progress', expected 'completed'"),
    # output items
    "drop_output_item_added": (
        remove("response.output_item.added"),
        r"output_index 0 before its response.output_item.added",
    ),
    "drop_output_item_done": (
        remove("response.output_item.done"),
        r"output item 0 .* was never closed by response.output_item.done",
    ),
    "duplicate_output_item_done": (
        duplicate_output_item_done,
        r"a second response.output_item.done for output_index 0",
    ),
    "shift_output_indexes": (shift_output_indexes, r"output_index 1 out of order: the next new item must be 0"),
    "item_id_changed": (item_id_changed, r"item_id '[^']+-other' is not the id of output item \d"),
    "done_message_text_changed": (
        done_message_text_changed,
        r"message content\[0\] differs from the streamed output_text",
    ),
    "done_function_name_changed": (
        done_function_name_changed,
        r"function_call name '[^']+X' differs from the streamed",
    ),
    # content parts, text and arguments
    "drop_content_part_added": (
        remove("response.content_part.added"),
        r"content_index 0 before its response.content_part.added",
    ),
    "drop_content_part_done": (
        remove("response.content_part.done"),
        r"content part 0 of output item \d was not closed before response.output_item.done",
    ),
    "drop_output_text_done": (
        remove("response.output_text.done"),
        r"response.content_part.done before response.output_text.done",
    ),
    "drop_reasoning_text_done": (
        remove("response.reasoning_text.done"),
        r"response.content_part.done before response.reasoning_text.done",
    ),
    "drop_refusal_done": (remove("response.refusal.done"), r"response.content_part.done before response.refusal.done"),
    "drop_arguments_done": (
        remove("response.function_call_arguments.done"),
        r"function_call closed without response.function_call_arguments.done",
    ),
    "text_delta_before_part_added": (
        delta_before_its_opener("response.output_text.delta", "response.content_part.added", "content_index"),
        r"'response.output_text.delta' .*content_index 0 before its response.content_part.added",
    ),
    "reasoning_delta_before_part_added": (
        delta_before_its_opener("response.reasoning_text.delta", "response.content_part.added", "content_index"),
        r"'response.reasoning_text.delta' .*content_index 0 before its response.content_part.added",
    ),
    "arguments_delta_before_item_added": (
        delta_before_its_opener("response.function_call_arguments.delta", "response.output_item.added", "output_index"),
        r"'response.function_call_arguments.delta' .*output_index \d before its response.output_item.added",
    ),
    "alter_text_delta": (
        alter_delta("response.output_text.delta"),
        r"'response.output_text.done' .*text does not equal the concatenation of its \d+ delta\(s\)",
    ),
    "alter_refusal_delta": (
        alter_delta("response.refusal.delta"),
        r"'response.refusal.done' .*text does not equal the concatenation",
    ),
    "alter_reasoning_delta": (
        alter_delta("response.reasoning_text.delta"),
        r"'response.reasoning_text.done' .*text does not equal the concatenation",
    ),
    "alter_arguments_delta": (
        alter_delta("response.function_call_arguments.delta"),
        r"arguments do not equal the concatenation of their \d+ delta\(s\)",
    ),
    "arguments_not_json": (arguments_not_json, r"arguments are not valid JSON"),
    # reasoning summaries
    "drop_summary_part_added": (
        remove("response.reasoning_summary_part.added"),
        r"summary_index 0 before its response.reasoning_summary_part.added",
    ),
    "drop_summary_part_done": (
        remove("response.reasoning_summary_part.done"),
        r"summary part 0 of output item 0 was not closed",
    ),
    "drop_summary_text_done": (
        remove("response.reasoning_summary_text.done"),
        r"reasoning_summary_part.done before response.reasoning_summary_text.done",
    ),
    "summary_delta_before_part_added": (
        delta_before_its_opener(
            "response.reasoning_summary_text.delta", "response.reasoning_summary_part.added", "summary_index"
        ),
        r"summary_index 0 before its response.reasoning_summary_part.added",
    ),
    "alter_summary_delta": (
        alter_delta("response.reasoning_summary_text.delta"),
        r"'response.reasoning_summary_text.done' .*text does not equal the concatenation",
    ),
    # the final response
    "empty_completed_output": (empty_completed_output, r"response.completed output is empty"),
    "completed_output_item_id_changed": (
        completed_output_item_id_changed,
        r"response.completed output\[0\] differs from the response.output_item.done item: id",
    ),
    "usage_total_wrong": (
        usage_total_wrong,
        r"response.completed usage: total_tokens \d+ != input_tokens \d+ \+ output_tokens \d+",
    ),
    "usage_without_cached_tokens": (
        usage_without_cached_tokens,
        r"usage.input_tokens_details.cached_tokens is missing",
    ),
}

BASES: dict[str, Callable[[], Events]] = {
    name: (lambda name=name: parse_sse(body_of(name))) for name in STREAMS if name not in EXPECTED_FAILURES
}
BASES["synthetic"] = synthetic_events


def base_options(base: str) -> dict:
    return options(base) if base != "synthetic" else {}


def mutation_cases() -> list:
    cases = []
    for base, make in BASES.items():
        for mutation, (mutate, _) in MUTATIONS.items():
            if mutate(make()) is not None:
                cases.append(pytest.param(base, mutation, id=f"{base}-{mutation}"))
    return cases


MUTATION_CASES = mutation_cases()


def test_every_mutation_applies_somewhere():
    applied = {case.values[1] for case in MUTATION_CASES}
    assert applied == set(MUTATIONS), f"never applied: {set(MUTATIONS) - applied}"


@pytest.mark.parametrize("base", BASES)
def test_base_is_valid(base):
    validate_stream(BASES[base](), **base_options(base))


@pytest.mark.parametrize(("base", "mutation"), MUTATION_CASES)
def test_mutation_fails(base, mutation):
    mutate, message = MUTATIONS[mutation]
    events = mutate(BASES[base]())
    with pytest.raises(AssertionError, match=message):
        validate_stream(events, **base_options(base))


# --- parse_sse ----------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_parse_sse_line_ends(newline):
    body = body_of("openai__responses_stream_web_search_cached_reasoning")
    assert parse_sse(body.replace(b"\n", newline)) == parse_sse(body)


def test_parse_sse_comments_and_multiline_data():
    stream = (
        b": keep-alive\n\n"
        b'event: response.created\n: a comment inside a block\nid: 7\ndata: {"type":\ndata:  "x"}\n\n'
        b'data: {"a": 1}\n\n'
    )
    assert parse_sse(stream) == [("response.created", {"type": "x"}), (None, {"a": 1})]
    assert parse_sse(b"") == []


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"event: response.created\ndata: {not json}\n\n", r"SSE event #0 \('response.created'\): data is not JSON"),
        (b"data: [1, 2]\n\n", r"data is JSON but not an object"),
        (
            b'data: {"type": "response.completed"}\n\ndata: [DONE]\n\n',
            r"SSE event #1: data: \[DONE\] is the Chat Completions terminator",
        ),
        (b'data: {"type": "response.created"}\n', r"SSE stream ends inside an event"),
        (b'data: {"type": "response.created"}', r"SSE stream ends inside a line"),
        (b"event: response.created\n\n", r"has no data: line \(event 'response.created'\)"),
        (b"event: a\nevent: b\ndata: {}\n\n", r"a second event: line in one block"),
        (b"evnt: response.created\ndata: {}\n\n", r"unknown field 'evnt'"),
        (b'data: {"t": "\xff"}\n\n', r"SSE stream is not UTF-8"),
    ],
    ids=[
        "not_json",
        "not_object",
        "done_sentinel",
        "unterminated",
        "no_line_end",
        "no_data",
        "two_event_lines",
        "unknown_field",
        "not_utf8",
    ],
)
def test_parse_sse_rejects(stream, message):
    with pytest.raises(AssertionError, match=message):
        parse_sse(stream)


# --- The tables against the installed SDK -------------------------------------------------------


def union_members(alias: object) -> tuple:
    if typing.get_origin(alias) is typing.Annotated:
        return union_members(typing.get_args(alias)[0])
    return typing.get_args(alias)


def literal(model: type, name: str = "type") -> str:
    return typing.get_args(model.model_fields[name].annotation)[0]


def required(model: type) -> set[str]:
    return {name for name, info in model.model_fields.items() if info.is_required()}


def test_event_table_is_the_sdk_union():
    stream_event = pytest.importorskip("openai.types.responses.response_stream_event")
    sdk = {
        literal(model): required(model) - {"type", "sequence_number"}
        for model in union_members(stream_event.ResponseStreamEvent)
    }
    assert set(EVENT_FIELDS) == set(sdk), (
        f"only ours: {set(EVENT_FIELDS) - set(sdk)}; only the SDK's: {set(sdk) - set(EVENT_FIELDS)}"
    )
    assert {kind: set(fields) for kind, fields in EVENT_FIELDS.items()} == sdk
    assert all("sequence_number" in required(model) for model in union_members(stream_event.ResponseStreamEvent))


def test_response_and_item_tables_are_the_sdk():
    responses = pytest.importorskip("openai.types.responses")
    output_item = pytest.importorskip("openai.types.responses.response_output_item")
    status = pytest.importorskip("openai.types.responses.response_status")
    response_module = pytest.importorskip("openai.types.responses.response")
    assert set(RESPONSE_FIELDS) - {"status"} == required(responses.Response)
    assert set(TERMINAL_STATUS.values()) <= set(typing.get_args(status.ResponseStatus))
    reason = response_module.IncompleteDetails.model_fields["reason"].annotation
    assert {value for member in typing.get_args(reason) for value in typing.get_args(member)} == INCOMPLETE_REASONS
    items = {literal(model): model for model in union_members(output_item.ResponseOutputItem)}
    assert set(items) == OUTPUT_ITEM_TYPES
    for kind, fields in ITEM_FIELDS.items():
        assert required(items[kind]) <= set(fields) <= set(items[kind].model_fields), kind
