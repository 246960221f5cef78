"""A strict, sans-IO validator for an OpenAI Responses API stream (`POST /v1/responses`, `stream: true`).

    events = parse_sse(body_bytes)        # [(sse event name or None, parsed JSON), ...]
    response = validate_stream(events)    # the final `response` object, or AssertionError

Field names and event types are the official openai-python SDK's (`openai/types/responses/`, checked
against openai 3.54.0); each table below names the SDK module it was read from, and
tests/test_responses_events.py checks the tables against the installed SDK. The ordering rules
(created -> in_progress -> items -> terminal, `.added` before what refers to it, exactly one `.done`,
`.done` text == concatenated deltas, `sequence_number` 0, 1, 2, ...) are what OpenAI's recorded
streams in tests/recordings/ do.

Messages name the event (`event #i 'type' (sequence_number n)`) and the rule that failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import NoReturn

Event = tuple[str | None, dict]

# --- Tables read from the SDK ------------------------------------------------------------------

# Every member of the `ResponseStreamEvent` union (openai/types/responses/response_stream_event.py),
# with the fields its model requires besides `type` and `sequence_number` (which every one requires).
# The module each type is defined in is named above its line.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    # response_audio_delta_event.py
    "response.audio.delta": ("delta",),
    # response_audio_done_event.py
    "response.audio.done": (),
    # response_audio_transcript_delta_event.py
    "response.audio.transcript.delta": ("delta",),
    # response_audio_transcript_done_event.py
    "response.audio.transcript.done": (),
    # response_code_interpreter_call_code_delta_event.py
    "response.code_interpreter_call_code.delta": ("delta", "item_id", "output_index"),
    # response_code_interpreter_call_code_done_event.py
    "response.code_interpreter_call_code.done": ("code", "item_id", "output_index"),
    # response_code_interpreter_call_completed_event.py
    "response.code_interpreter_call.completed": ("item_id", "output_index"),
    # response_code_interpreter_call_in_progress_event.py
    "response.code_interpreter_call.in_progress": ("item_id", "output_index"),
    # response_code_interpreter_call_interpreting_event.py
    "response.code_interpreter_call.interpreting": ("item_id", "output_index"),
    # response_compaction_compacting_event.py
    "response.compaction.compacting": ("item_id", "output_index"),
    # response_completed_event.py
    "response.completed": ("response",),
    # response_content_part_added_event.py
    "response.content_part.added": ("content_index", "item_id", "output_index", "part"),
    # response_content_part_done_event.py
    "response.content_part.done": ("content_index", "item_id", "output_index", "part"),
    # response_created_event.py
    "response.created": ("response",),
    # response_error_event.py
    "error": ("message",),
    # response_file_search_call_completed_event.py
    "response.file_search_call.completed": ("item_id", "output_index"),
    # response_file_search_call_in_progress_event.py
    "response.file_search_call.in_progress": ("item_id", "output_index"),
    # response_file_search_call_searching_event.py
    "response.file_search_call.searching": ("item_id", "output_index"),
    # response_function_call_arguments_delta_event.py
    "response.function_call_arguments.delta": ("delta", "item_id", "output_index"),
    # response_function_call_arguments_done_event.py
    "response.function_call_arguments.done": ("arguments", "item_id", "output_index"),
    # response_shell_call_command_added_event.py
    "response.shell_call_command.added": ("command", "command_index", "output_index"),
    # response_shell_call_command_delta_event.py
    "response.shell_call_command.delta": ("command_index", "delta", "output_index"),
    # response_shell_call_command_done_event.py
    "response.shell_call_command.done": ("command", "command_index", "output_index"),
    # response_shell_call_output_content_delta_event.py
    "response.shell_call_output_content.delta": ("command_index", "delta", "item_id", "output_index"),
    # response_shell_call_output_content_done_event.py
    "response.shell_call_output_content.done": ("command_index", "item_id", "output", "output_index"),
    # response_in_progress_event.py
    "response.in_progress": ("response",),
    # response_failed_event.py
    "response.failed": ("response",),
    # response_incomplete_event.py
    "response.incomplete": ("response",),
    # response_output_item_added_event.py
    "response.output_item.added": ("item", "output_index"),
    # response_output_item_done_event.py
    "response.output_item.done": ("item", "output_index"),
    # response_reasoning_summary_part_added_event.py
    "response.reasoning_summary_part.added": ("item_id", "output_index", "part", "summary_index"),
    # response_reasoning_summary_part_done_event.py
    "response.reasoning_summary_part.done": ("item_id", "output_index", "part", "summary_index"),
    # response_reasoning_summary_text_delta_event.py
    "response.reasoning_summary_text.delta": ("delta", "item_id", "output_index", "summary_index"),
    # response_reasoning_summary_text_done_event.py
    "response.reasoning_summary_text.done": ("item_id", "output_index", "summary_index", "text"),
    # response_reasoning_text_delta_event.py
    "response.reasoning_text.delta": ("content_index", "delta", "item_id", "output_index"),
    # response_reasoning_text_done_event.py
    "response.reasoning_text.done": ("content_index", "item_id", "output_index", "text"),
    # response_refusal_delta_event.py
    "response.refusal.delta": ("content_index", "delta", "item_id", "output_index"),
    # response_refusal_done_event.py
    "response.refusal.done": ("content_index", "item_id", "output_index", "refusal"),
    # response_text_delta_event.py
    "response.output_text.delta": ("content_index", "delta", "item_id", "logprobs", "output_index"),
    # response_text_done_event.py
    "response.output_text.done": ("content_index", "item_id", "logprobs", "output_index", "text"),
    # response_web_search_call_completed_event.py
    "response.web_search_call.completed": ("item_id", "output_index"),
    # response_web_search_call_in_progress_event.py
    "response.web_search_call.in_progress": ("item_id", "output_index"),
    # response_web_search_call_searching_event.py
    "response.web_search_call.searching": ("item_id", "output_index"),
    # response_image_gen_call_completed_event.py
    "response.image_generation_call.completed": ("item_id", "output_index"),
    # response_image_gen_call_generating_event.py
    "response.image_generation_call.generating": ("item_id", "output_index"),
    # response_image_gen_call_in_progress_event.py
    "response.image_generation_call.in_progress": ("item_id", "output_index"),
    # response_image_gen_call_partial_image_event.py
    "response.image_generation_call.partial_image": (
        "item_id",
        "output_index",
        "partial_image_b64",
        "partial_image_index",
    ),
    # response_mcp_call_arguments_delta_event.py
    "response.mcp_call_arguments.delta": ("delta", "item_id", "output_index"),
    # response_mcp_call_arguments_done_event.py
    "response.mcp_call_arguments.done": ("arguments", "item_id", "output_index"),
    # response_mcp_call_completed_event.py
    "response.mcp_call.completed": ("item_id", "output_index"),
    # response_mcp_call_failed_event.py
    "response.mcp_call.failed": ("item_id", "output_index"),
    # response_mcp_call_in_progress_event.py
    "response.mcp_call.in_progress": ("item_id", "output_index"),
    # response_mcp_list_tools_completed_event.py
    "response.mcp_list_tools.completed": ("item_id", "output_index"),
    # response_mcp_list_tools_failed_event.py
    "response.mcp_list_tools.failed": ("item_id", "output_index"),
    # response_mcp_list_tools_in_progress_event.py
    "response.mcp_list_tools.in_progress": ("item_id", "output_index"),
    # response_output_text_annotation_added_event.py
    "response.output_text.annotation.added": ("annotation_index", "content_index", "item_id", "output_index"),
    # response_queued_event.py
    "response.queued": ("response",),
    # response_custom_tool_call_input_delta_event.py
    "response.custom_tool_call_input.delta": ("delta", "item_id", "output_index"),
    # response_custom_tool_call_input_done_event.py
    "response.custom_tool_call_input.done": ("input", "item_id", "output_index"),
}

# Terminal events and the `response.status` each carries (response_completed_event.py,
# response_incomplete_event.py, response_failed_event.py; statuses from response_status.py).
TERMINAL_STATUS = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}

# Fields the SDK's `Response` model requires (response.py); `status` is Optional there but every
# streamed response carries it and the rules below need it.
RESPONSE_FIELDS = (
    "id",
    "created_at",
    "model",
    "object",
    "output",
    "parallel_tool_calls",
    "tool_choice",
    "tools",
    "status",
)

# `IncompleteDetails.reason` literals (response.py).
INCOMPLETE_REASONS = {"max_output_tokens", "max_messages", "content_filter", "steered"}

# Every `type` of the `ResponseOutputItem` union (response_output_item.py).
# fmt: off
OUTPUT_ITEM_TYPES = {
    "message", "file_search_call", "function_call", "function_call_output", "web_search_call", "computer_call",
    "computer_call_output", "reasoning", "program", "program_output", "tool_search_call", "tool_search_output",
    "additional_tools", "compaction", "image_generation_call", "code_interpreter_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
    "mcp_call", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "custom_tool_call",
    "custom_tool_call_output",
}
# fmt: on

# Required fields of the item types this validator follows in depth: response_output_message.py,
# response_function_tool_call.py, response_reasoning_item.py. `id` is Optional on a function call in
# the SDK, but stream events point at items by `item_id`, so every streamed item must have one.
ITEM_FIELDS = {
    "message": ("id", "content", "role", "status", "type"),
    "function_call": ("arguments", "call_id", "name", "type", "id"),
    "reasoning": ("id", "summary", "type"),
}

# Which item type an event family may refer to (the item each event module documents).
EVENT_ITEM_TYPE = {
    # response_text_delta_event.py, response_text_done_event.py, response_output_text_annotation_added_event.py
    "response.output_text.": "message",
    "response.refusal.": "message",  # response_refusal_delta_event.py, response_refusal_done_event.py
    "response.function_call_arguments.": "function_call",  # response_function_call_arguments_*_event.py
    "response.reasoning_text.": "reasoning",  # response_reasoning_text_*_event.py
    "response.reasoning_summary_part.": "reasoning",  # response_reasoning_summary_part_*_event.py
    "response.reasoning_summary_text.": "reasoning",  # response_reasoning_summary_text_*_event.py
    "response.web_search_call.": "web_search_call",  # response_web_search_call_*_event.py
    "response.file_search_call.": "file_search_call",  # response_file_search_call_*_event.py
    "response.code_interpreter_call.": "code_interpreter_call",  # response_code_interpreter_call_*_event.py
    "response.code_interpreter_call_code.": "code_interpreter_call",
    "response.image_generation_call.": "image_generation_call",  # response_image_gen_call_*_event.py
    "response.mcp_call.": "mcp_call",  # response_mcp_call_*_event.py
    "response.mcp_call_arguments.": "mcp_call",
    "response.mcp_list_tools.": "mcp_list_tools",  # response_mcp_list_tools_*_event.py
    "response.custom_tool_call_input.": "custom_tool_call",  # response_custom_tool_call_input_*_event.py
}

# Content part kinds (response_content_part_added_event.py: ResponseOutputText | ResponseOutputRefusal |
# PartReasoningText), the item type that holds them, the part's text field, and the `.delta`/`.done`
# events that stream that text (the `.done` event's own text field last).
PART_KINDS = {
    "output_text": ("message", "text", "response.output_text.delta", "response.output_text.done", "text"),
    "refusal": ("message", "refusal", "response.refusal.delta", "response.refusal.done", "refusal"),
    "reasoning_text": ("reasoning", "text", "response.reasoning_text.delta", "response.reasoning_text.done", "text"),
}
TEXT_EVENTS = {delta: kind for kind, (_, _, delta, _, _) in PART_KINDS.items()}
TEXT_DONE_EVENTS = {done: kind for kind, (_, _, _, done, _) in PART_KINDS.items()}

# --- SSE ------------------------------------------------------------------------------------------

_LINE = re.compile(r"\r\n|\r|\n")


def parse_sse(data: bytes) -> list[Event]:
    """Split an SSE byte stream into (event name or None, JSON object of the joined `data:` lines).

    Line ends may be CRLF, CR or LF; comment lines (`:` first) are skipped, and so is a block made of
    comments only. Strict where a client would silently lose or misread an event: a block with
    fields but no `data:`, a repeated `event:`, an unknown field, a last block not closed by a blank
    line (the SSE spec discards it), a payload that is not a JSON object, and `data: [DONE]` (the
    Chat Completions terminator; a Responses stream ends with its terminal event) all fail.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AssertionError(f"SSE stream is not UTF-8: {error}") from None
    *lines, rest = _LINE.split(text)  # `rest`: whatever follows the last line end
    if rest:
        raise AssertionError(f"SSE stream ends inside a line (no line end after it): {_short(rest)}")
    events: list[Event] = []
    name: str | None = None
    payload: list[str] = []
    fields = 0
    for number, line in enumerate(lines, 1):
        if line == "":
            if payload:
                events.append((name, _json_payload(len(events), name, "\n".join(payload))))
            elif fields:
                raise AssertionError(f"SSE block ending at line {number} has no data: line (event {name!r})")
            name, payload, fields = None, [], 0
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields += 1
        if key == "data":
            payload.append(value)
        elif key == "event":
            if name is not None:
                raise AssertionError(f"SSE line {number}: a second event: line in one block ({name!r}, {value!r})")
            name = value
        elif key not in ("id", "retry"):
            raise AssertionError(f"SSE line {number}: unknown field {key!r} in {_short(line)}")
    if fields:
        raise AssertionError(
            f"SSE stream ends inside an event (no blank line after it; the SSE spec discards it): event {name!r}"
        )
    return events


def _json_payload(index: int, name: str | None, payload: str) -> dict:
    if payload.strip() == "[DONE]":
        raise AssertionError(
            f"SSE event #{index}: data: [DONE] is the Chat Completions terminator; "
            "a Responses stream ends with response.completed / .incomplete / .failed"
        )
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as error:
        raise AssertionError(f"SSE event #{index} ({name!r}): data is not JSON ({error}): {_short(payload)}") from None
    if not isinstance(body, dict):
        raise AssertionError(f"SSE event #{index} ({name!r}): data is JSON but not an object: {_short(payload)}")
    return body


# --- Validation ---------------------------------------------------------------------------------


def validate_stream(events: list[Event], *, require_sequence_numbers: bool = True) -> dict:
    """Check a whole Responses stream; return the terminal event's `response` object.

    `require_sequence_numbers=False` also accepts a stream in which *no* event has a
    `sequence_number` (OpenAI's wire format before the field existed, e.g. the March 2025
    recording openai__responses_stream_simple); a stream that has them on some events must
    still have them on all, 0, 1, 2, ... Raises AssertionError naming the broken rule.
    """
    assert isinstance(events, list) and events, "empty stream: no events"
    for index, event in enumerate(events):
        _check_envelope(index, event)
    bodies = [body for _, body in events]
    _check_sequence_numbers(bodies, require_sequence_numbers)
    _check_lifecycle(bodies)
    response = _check_response_objects(bodies)
    items = _Items().run(bodies)
    _check_final_output(bodies[-1], items)
    _check_usage(bodies[-1])
    return response


def _check_envelope(index: int, event: Event) -> None:
    """Each event: `type` in the SDK union, equal to the SSE name, with the fields its model requires."""
    assert isinstance(event, tuple) and len(event) == 2, f"event #{index}: not a (name, body) pair: {event!r}"
    name, body = event
    assert isinstance(body, dict), f"event #{index}: body is not a JSON object: {body!r}"
    kind = body.get("type")
    assert isinstance(kind, str), f"event #{index}: no string `type`: {_short(json.dumps(body))}"
    if kind not in EVENT_FIELDS:
        raise AssertionError(f"event #{index}: type {kind!r} is not in the SDK's ResponseStreamEvent union")
    if name is not None and name != kind:
        raise AssertionError(f"event #{index}: SSE event name {name!r} differs from type {kind!r}")
    missing = [key for key in EVENT_FIELDS[kind] if key not in body]
    if missing:
        _fail(index, body, f"missing required field(s) {missing} (SDK model for {kind})")
    for key, value in body.items():
        if key.endswith("_index") and not _is_int(value):
            _fail(index, body, f"{key} is not an integer: {value!r}")
        if key in ("item_id", "delta", "text", "arguments", "refusal") and not isinstance(value, str):
            _fail(index, body, f"{key} is not a string: {_short(repr(value))}")


def _check_sequence_numbers(bodies: list[dict], required: bool) -> None:
    """`sequence_number` on every event: an integer, 0 on the first event, then +1 each event."""
    if not required and not any("sequence_number" in body for body in bodies):
        return
    for index, body in enumerate(bodies):
        number = body.get("sequence_number")
        if not _is_int(number):
            _fail(index, body, f"sequence_number missing or not an integer: {number!r}")
        if number != index:
            previous = bodies[index - 1]["sequence_number"] if index else None
            _fail(
                index,
                body,
                f"sequence_number {number} breaks the 0, 1, 2, ... order (previous {previous}, expected {index})",
            )


def _check_lifecycle(bodies: list[dict]) -> None:
    """created, in_progress, ..., exactly one terminal event, and nothing after it."""
    kinds = [body["type"] for body in bodies]
    if kinds[0] != "response.created":
        _fail(0, bodies[0], "the first event must be response.created")
    if len(kinds) < 2 or kinds[1] != "response.in_progress":
        got = kinds[1] if len(kinds) > 1 else "end of stream"
        raise AssertionError(f"event #1: the second event must be response.in_progress, got {got}")
    terminals = [index for index, kind in enumerate(kinds) if kind in TERMINAL_STATUS]
    if not terminals:
        raise AssertionError(f"no terminal event (response.completed / .incomplete / .failed); last is {kinds[-1]}")
    first = terminals[0]
    if first != len(kinds) - 1:
        extra = len(kinds) - 1 - first
        _fail(first + 1, bodies[first + 1], f"{extra} event(s) after the terminal {kinds[first]} at #{first}")
    for index in range(2, len(kinds) - 1):
        if kinds[index] in ("response.created", "response.in_progress", "response.queued"):
            _fail(index, bodies[index], "lifecycle event out of place (only #0 created and #1 in_progress)")
        if kinds[index] == "error":
            _fail(index, bodies[index], f"error event in the stream: {_short(json.dumps(bodies[index]))}")


def _check_response_objects(bodies: list[dict]) -> dict:
    """The response object in created, in_progress and the terminal event: same id, right status."""
    created, in_progress, terminal = bodies[0], bodies[1], bodies[-1]
    for index, body in ((0, created), (1, in_progress), (len(bodies) - 1, terminal)):
        response = body.get("response")
        if not isinstance(response, dict):
            _fail(index, body, "response is not an object")
        missing = [key for key in RESPONSE_FIELDS if key not in response]
        if missing:
            _fail(index, body, f"response lacks {missing} (SDK Response, response.py)")
        if response["object"] != "response":
            _fail(index, body, f"response.object is {response['object']!r}, not 'response'")
        if not isinstance(response["id"], str) or not response["id"]:
            _fail(index, body, f"response.id is not a non-empty string: {response['id']!r}")
        if not isinstance(response["output"], list):
            _fail(index, body, "response.output is not a list")
    for index, body in ((0, created), (1, in_progress)):
        if body["response"]["status"] != "in_progress":
            _fail(index, body, f"response.status is {body['response']['status']!r}, expected 'in_progress'")
        if body["response"]["output"]:
            _fail(index, body, "response.output is not empty before any item was streamed")
    final = terminal["response"]
    for key in ("id", "created_at", "model"):
        if not created["response"][key] == in_progress["response"][key] == final[key]:
            _fail(
                len(bodies) - 1,
                terminal,
                f"response {key} changed: created {created['response'][key]!r}, "
                f"in_progress {in_progress['response'][key]!r}, {terminal['type']} {final[key]!r}",
            )
    index, expected = len(bodies) - 1, TERMINAL_STATUS[terminal["type"]]
    if final["status"] != expected:
        _fail(index, terminal, f"response.status is {final['status']!r}, expected {expected!r}")
    details, error = final.get("incomplete_details"), final.get("error")
    if expected == "incomplete":
        if not isinstance(details, dict) or details.get("reason") not in INCOMPLETE_REASONS:
            _fail(
                index, terminal, f"incomplete_details.reason must be one of {sorted(INCOMPLETE_REASONS)}: {details!r}"
            )
    elif details is not None:
        _fail(index, terminal, f"incomplete_details must be null on a {expected} response: {details!r}")
    if expected == "failed":
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("code"), str)
            or not isinstance(error.get("message"), str)
        ):
            _fail(
                index,
                terminal,
                f"a failed response needs error.code and error.message strings (response_error.py): {error!r}",
            )
    elif error is not None:
        _fail(index, terminal, f"error must be null on a {expected} response: {error!r}")
    return final


@dataclass
class _Part:
    """A content part (by content_index) or a reasoning summary part (by summary_index)."""

    kind: str  # output_text | refusal | reasoning_text | summary_text
    deltas: list[str] = field(default_factory=list)
    text: str | None = None  # from the text `.done` event
    closed: bool = False  # part `.done` seen
    annotations: int = 0


@dataclass
class _Item:
    index: int
    id: str
    type: str
    added: dict
    parts: dict[int, _Part] = field(default_factory=dict)
    summary: dict[int, _Part] = field(default_factory=dict)
    arguments: list[str] = field(default_factory=list)
    arguments_done: str | None = None
    done: dict | None = None


class _Items:
    """The output item state machine over the events between in_progress and the terminal event."""

    def __init__(self) -> None:
        self.items: list[_Item] = []

    def run(self, bodies: list[dict]) -> list[_Item]:
        handlers = {
            "response.output_item.added": self.item_added,
            "response.output_item.done": self.item_done,
            "response.content_part.added": self.part_added,
            "response.content_part.done": self.part_done,
            "response.reasoning_summary_part.added": self.summary_added,
            "response.reasoning_summary_part.done": self.summary_done,
            "response.reasoning_summary_text.delta": self.summary_delta,
            "response.reasoning_summary_text.done": self.summary_text_done,
            "response.function_call_arguments.delta": self.arguments_delta,
            "response.function_call_arguments.done": self.arguments_done,
            "response.output_text.annotation.added": self.annotation_added,
        }
        handlers.update(dict.fromkeys(TEXT_EVENTS, self.text_delta))
        handlers.update(dict.fromkeys(TEXT_DONE_EVENTS, self.text_done))
        for index in range(2, len(bodies) - 1):
            body = bodies[index]
            handler = handlers.get(body["type"])
            if handler is not None:
                handler(index, body)
            elif "output_index" in body or "item_id" in body:
                self.open_item(index, body)
        terminal = bodies[-1]
        if terminal["type"] != "response.failed":
            for item in self.items:
                if item.done is None:
                    what = f"output item {item.index} ({item.type} {item.id!r})"
                    _fail(len(bodies) - 1, terminal, f"{what} was never closed by response.output_item.done")
        return self.items

    # -- items

    def open_item(self, index: int, body: dict) -> _Item:
        """The open item an event refers to by output_index (and item_id, when it has one)."""
        position = body.get("output_index")
        if not _is_int(position):
            _fail(index, body, f"output_index missing or not an integer: {position!r}")
        if position >= len(self.items) or position < 0:
            _fail(index, body, f"refers to output_index {position} before its response.output_item.added")
        item = self.items[position]
        if item.done is not None:
            _fail(index, body, f"refers to output_index {position} after its response.output_item.done")
        if "item_id" in body and body["item_id"] != item.id:
            _fail(index, body, f"item_id {body['item_id']!r} is not the id of output item {position} ({item.id!r})")
        for prefix, item_type in EVENT_ITEM_TYPE.items():
            if body["type"].startswith(prefix) and item.type != item_type:
                _fail(
                    index,
                    body,
                    f"refers to output item {position} of type {item.type!r}; this event belongs to a {item_type!r}",
                )
        return item

    def item_added(self, index: int, body: dict) -> None:
        position, item = body["output_index"], body["item"]
        if position != len(self.items):
            _fail(index, body, f"output_index {position} out of order: the next new item must be {len(self.items)}")
        if not isinstance(item, dict):
            _fail(index, body, "item is not an object")
        self.check_item_shape(index, body, item)
        if item["id"] in {other.id for other in self.items}:
            _fail(index, body, f"item id {item['id']!r} was already used by another output item")
        if item["type"] == "message" and item["content"] != []:
            _fail(index, body, "an added message must have empty content (parts stream after it)")
        if item["type"] == "reasoning" and item["summary"] != []:
            _fail(index, body, "an added reasoning item must have an empty summary (summary parts stream after it)")
        if item["type"] == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item[key], str) or not item[key]:
                    _fail(index, body, f"function_call {key} is not a non-empty string: {item[key]!r}")
        self.items.append(_Item(position, item["id"], item["type"], item))

    def item_done(self, index: int, body: dict) -> None:
        position, done = body["output_index"], body["item"]
        if not 0 <= position < len(self.items):
            _fail(
                index,
                body,
                f"response.output_item.done for output_index {position} before its response.output_item.added",
            )
        item = self.items[position]
        if item.done is not None:
            _fail(index, body, f"a second response.output_item.done for output_index {position}")
        if not isinstance(done, dict):
            _fail(index, body, "item is not an object")
        self.check_item_shape(index, body, done)
        if (done["id"], done["type"]) != (item.id, item.type):
            added = f"{item.type} {item.id!r}"
            _fail(
                index, body, f"item is {done['type']} {done['id']!r}, but output_index {position} was added as {added}"
            )
        if done.get("status") == "in_progress":
            _fail(index, body, "a done item still has status 'in_progress'")
        for label, parts in (("content part", item.parts), ("summary part", item.summary)):
            for number, part in parts.items():
                if not part.closed:
                    _fail(
                        index,
                        body,
                        f"{label} {number} of output item {position} was not closed before response.output_item.done",
                    )
        if item.type == "message":
            self.check_message(index, body, item, done)
        elif item.type == "function_call":
            if item.arguments_done is None:
                _fail(index, body, "function_call closed without response.function_call_arguments.done")
            if done.get("status") != "incomplete":
                # A call cut by max_output_tokens has half a JSON value: its item says so (incomplete).
                # Any other call's arguments are a whole JSON value the caller can run.
                try:
                    json.loads(item.arguments_done)
                except json.JSONDecodeError as error:
                    _fail(index, body, f"a {done.get('status')} call's arguments are not valid JSON ({error})")
            for key, expected in (
                ("arguments", item.arguments_done),
                ("call_id", item.added["call_id"]),
                ("name", item.added["name"]),
            ):
                if done[key] != expected:
                    got, streamed = _short(repr(done[key])), _short(repr(expected))
                    _fail(index, body, f"function_call {key} {got} differs from the streamed {streamed}")
        elif item.type == "reasoning":
            self.check_reasoning(index, body, item, done)
        item.done = done

    def check_item_shape(self, index: int, body: dict, item: dict) -> None:
        kind = item.get("type")
        if kind not in OUTPUT_ITEM_TYPES:
            _fail(index, body, f"item type {kind!r} is not an SDK output item type (response_output_item.py)")
        if not isinstance(item.get("id"), str) or not item["id"]:
            _fail(index, body, f"item has no non-empty string id: {item.get('id')!r}")
        missing = [key for key in ITEM_FIELDS.get(kind, ()) if key not in item]
        if missing:
            _fail(index, body, f"{kind} item lacks {missing}")

    def check_message(self, index: int, body: dict, item: _Item, done: dict) -> None:
        content = done["content"]
        if not isinstance(content, list) or len(content) != len(item.parts):
            _fail(index, body, f"message content has {_len(content)} part(s); {len(item.parts)} were streamed")
        for number, entry in enumerate(content):
            part = item.parts[number]
            field_name = PART_KINDS[part.kind][1]
            if not isinstance(entry, dict) or entry.get("type") != part.kind or entry.get(field_name) != part.text:
                problem = _mismatch(entry, part.text, field_name)
                _fail(index, body, f"message content[{number}] differs from the streamed {part.kind}: {problem}")

    def check_reasoning(self, index: int, body: dict, item: _Item, done: dict) -> None:
        """summary == the streamed summary parts; content == the streamed reasoning_text parts (or none)."""
        for key, parts in (("summary", item.summary), ("content", item.parts)):
            given = done.get(key) or []
            if not isinstance(given, list):
                _fail(index, body, f"reasoning {key} is not a list: {_short(repr(given))}")
            texts = [entry.get("text") if isinstance(entry, dict) else entry for entry in given]
            streamed = [part.text for _, part in sorted(parts.items())]
            if texts != streamed:
                _fail(
                    index,
                    body,
                    f"reasoning {key} {_short(repr(texts))} differs from the streamed {_short(repr(streamed))}",
                )

    # -- content parts and their text

    def part_added(self, index: int, body: dict) -> None:
        item, part = self.open_item(index, body), body["part"]
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_KINDS:
            _fail(index, body, f"part type {kind!r} is not output_text, refusal or reasoning_text")
        holder, text_field = PART_KINDS[kind][:2]
        if item.type != holder:
            _fail(index, body, f"a {kind} part on a {item.type} item (belongs to a {holder})")
        if body["content_index"] != len(item.parts):
            _fail(
                index, body, f"content_index {body['content_index']} out of order: the next must be {len(item.parts)}"
            )
        if part.get(text_field) != "":
            _fail(index, body, f"an added {kind} part must have empty {text_field}: {_short(repr(part[text_field]))}")
        item.parts[body["content_index"]] = _Part(kind)

    def find_part(self, index: int, body: dict, kind: str | None) -> _Part:
        item = self.open_item(index, body)
        part = item.parts.get(body["content_index"])
        if part is None:
            _fail(index, body, f"content_index {body['content_index']} before its response.content_part.added")
        if kind is not None and part.kind != kind:
            _fail(index, body, f"content part {body['content_index']} is {part.kind}, not {kind}")
        if part.closed:
            _fail(index, body, f"content_index {body['content_index']} after its response.content_part.done")
        return part

    def text_delta(self, index: int, body: dict) -> None:
        part = self.find_part(index, body, TEXT_EVENTS[body["type"]])
        if part.text is not None:
            _fail(index, body, f"a delta after {PART_KINDS[part.kind][3]}")
        part.deltas.append(body["delta"])

    def text_done(self, index: int, body: dict) -> None:
        kind = TEXT_DONE_EVENTS[body["type"]]
        part = self.find_part(index, body, kind)
        self.close_text(index, body, part, body[PART_KINDS[kind][4]])

    def part_done(self, index: int, body: dict) -> None:
        part = self.find_part(index, body, None)
        given = body["part"]
        text_field = PART_KINDS[part.kind][1]
        text_done = PART_KINDS[part.kind][3]
        if not isinstance(given, dict) or given.get("type") != part.kind:
            _fail(index, body, f"part {_short(repr(given))} is not the added {part.kind}")
        if part.text is None:
            _fail(index, body, f"response.content_part.done before {text_done}")
        if given.get(text_field) != part.text:
            _fail(index, body, f"part {text_field} differs from {text_done}: {_mismatch(given, part.text, text_field)}")
        part.closed = True

    def annotation_added(self, index: int, body: dict) -> None:
        part = self.find_part(index, body, "output_text")
        if body["annotation_index"] != part.annotations:
            _fail(index, body, f"annotation_index {body['annotation_index']} out of order: expected {part.annotations}")
        part.annotations += 1

    @staticmethod
    def close_text(index: int, body: dict, part: _Part, text: str) -> None:
        if part.text is not None:
            _fail(index, body, f"a second {body['type']}")
        joined = "".join(part.deltas)
        if text != joined:
            count = len(part.deltas)
            _fail(index, body, f"text does not equal the concatenation of its {count} delta(s): {_diff(text, joined)}")
        part.text = text

    # -- reasoning summary parts

    def summary_added(self, index: int, body: dict) -> None:
        item, part = self.open_item(index, body), body["part"]
        if body["summary_index"] != len(item.summary):
            _fail(
                index, body, f"summary_index {body['summary_index']} out of order: the next must be {len(item.summary)}"
            )
        if part != {"type": "summary_text", "text": ""}:
            _fail(index, body, f"an added summary part must be {{'type': 'summary_text', 'text': ''}}: {part!r}")
        item.summary[body["summary_index"]] = _Part("summary_text")

    def find_summary(self, index: int, body: dict) -> _Part:
        item = self.open_item(index, body)
        part = item.summary.get(body["summary_index"])
        number = body["summary_index"]
        if part is None:
            _fail(index, body, f"summary_index {number} before its response.reasoning_summary_part.added")
        if part.closed:
            _fail(index, body, f"summary_index {number} after its response.reasoning_summary_part.done")
        return part

    def summary_delta(self, index: int, body: dict) -> None:
        part = self.find_summary(index, body)
        if part.text is not None:
            _fail(index, body, "a delta after response.reasoning_summary_text.done")
        part.deltas.append(body["delta"])

    def summary_text_done(self, index: int, body: dict) -> None:
        self.close_text(index, body, self.find_summary(index, body), body["text"])

    def summary_done(self, index: int, body: dict) -> None:
        part, given = self.find_summary(index, body), body["part"]
        if part.text is None:
            _fail(index, body, "response.reasoning_summary_part.done before response.reasoning_summary_text.done")
        if not isinstance(given, dict) or given.get("type") != "summary_text" or given.get("text") != part.text:
            problem = _mismatch(given, part.text, "text")
            _fail(index, body, f"summary part differs from response.reasoning_summary_text.done: {problem}")
        part.closed = True

    # -- function call arguments

    def arguments_delta(self, index: int, body: dict) -> None:
        item = self.open_item(index, body)
        if item.arguments_done is not None:
            _fail(index, body, "a delta after response.function_call_arguments.done")
        item.arguments.append(body["delta"])

    def arguments_done(self, index: int, body: dict) -> None:
        item = self.open_item(index, body)
        if item.arguments_done is not None:
            _fail(index, body, "a second response.function_call_arguments.done")
        arguments, joined = body["arguments"], "".join(item.arguments)
        if arguments != joined:
            count, problem = len(item.arguments), _diff(arguments, joined)
            _fail(index, body, f"arguments do not equal the concatenation of their {count} delta(s): {problem}")
        item.arguments_done = arguments  # JSON unless the item ends incomplete (checked at its done)


def _check_final_output(terminal: dict, items: list[_Item]) -> None:
    """The terminal response's output is the output_item.done items, in output_index order."""
    if terminal["type"] == "response.failed":
        return
    output, where = terminal["response"]["output"], terminal["type"]
    if terminal["type"] == "response.completed" and not output:
        raise AssertionError("response.completed output is empty")
    if len(output) != len(items):
        raise AssertionError(
            f"{where} output has {len(output)} item(s); {len(items)} were streamed by response.output_item.done"
        )
    for number, (final, item) in enumerate(zip(output, items, strict=True)):
        problem = _item_difference(final, item.done)
        if problem:
            raise AssertionError(f"{where} output[{number}] differs from the response.output_item.done item: {problem}")


def _item_difference(final: object, done: dict) -> str | None:
    if not isinstance(final, dict):
        return f"not an object: {final!r}"
    for key in ("id", "type"):
        if final.get(key) != done.get(key):
            return f"{key} {final.get(key)!r} != {done.get(key)!r}"
    if done["type"] == "message":
        texts = [_content_text(part) for part in final.get("content") or []]
        expected = [_content_text(part) for part in done["content"]]
        if texts != expected:
            return f"content {_short(repr(texts))} != {_short(repr(expected))}"
    elif done["type"] == "function_call":
        for key in ("arguments", "call_id", "name"):
            if final.get(key) != done.get(key):
                return f"{key} {_short(repr(final.get(key)))} != {_short(repr(done.get(key)))}"
    elif done["type"] == "reasoning":
        for key in ("summary", "content"):
            texts = [_content_text(part) for part in final.get(key) or []]
            expected = [_content_text(part) for part in done.get(key) or []]
            if texts != expected:
                return f"{key} {_short(repr(texts))} != {_short(repr(expected))}"
    return None


def _content_text(part: object) -> tuple:
    if not isinstance(part, dict):
        return (None, repr(part))
    return (part.get("type"), part.get("refusal") if part.get("type") == "refusal" else part.get("text"))


def _check_usage(terminal: dict) -> None:
    """Usage (response_usage.py): integers, total = input + output, the two detail counts present.

    Required on response.completed; checked when present on .incomplete / .failed.
    """
    usage = terminal["response"].get("usage")
    if usage is None and terminal["type"] != "response.completed":
        return
    where = f"{terminal['type']} usage"
    if not isinstance(usage, dict):
        raise AssertionError(f"{where} is missing or not an object: {usage!r}")
    counts = {}
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        counts[key] = usage.get(key)
        if not _is_int(counts[key]) or counts[key] < 0:
            raise AssertionError(f"{where}.{key} is not a non-negative integer: {counts[key]!r}")
    if counts["total_tokens"] != counts["input_tokens"] + counts["output_tokens"]:
        total, given, made = counts["total_tokens"], counts["input_tokens"], counts["output_tokens"]
        raise AssertionError(f"{where}: total_tokens {total} != input_tokens {given} + output_tokens {made}")
    for details, key, bound in (
        ("input_tokens_details", "cached_tokens", "input_tokens"),
        ("output_tokens_details", "reasoning_tokens", "output_tokens"),
    ):
        value = usage.get(details, {}).get(key) if isinstance(usage.get(details), dict) else None
        if not _is_int(value) or value < 0:
            raise AssertionError(f"{where}.{details}.{key} is missing or not a non-negative integer: {value!r}")
        if value > counts[bound]:
            raise AssertionError(f"{where}.{details}.{key} {value} exceeds {bound} {counts[bound]}")


# --- Helpers ------------------------------------------------------------------------------------


def _fail(index: int, body: dict, message: str) -> NoReturn:
    raise AssertionError(
        f"event #{index} {body.get('type')!r} (sequence_number {body.get('sequence_number')}): {message}"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _len(value: object) -> object:
    return len(value) if isinstance(value, list) else f"no list ({value!r})"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _diff(got: str, expected: str, label: str = "deltas") -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    lengths = f"(lengths {len(got)} / {len(expected)})"
    return f"first difference at char {at}: {got[at : at + 40]!r} vs {label} {expected[at : at + 40]!r} {lengths}"


def _mismatch(given: object, text: str | None, field_name: str) -> str:
    value = given.get(field_name) if isinstance(given, dict) else given
    if isinstance(value, str) and isinstance(text, str):
        return _diff(value, text, "streamed")
    return f"{_short(repr(value))} vs streamed {_short(repr(text))}"
