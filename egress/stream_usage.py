"""Asking OpenAI-style streams for usage, and hiding the answer from a caller who didn't ask.

Contract:
  `inject_include_usage(body)` returns the request body with `stream_options.include_usage: true`
      added, or None when there is nothing to change (not a streaming request, not JSON, or the
      caller asked for usage already).
  `InjectedUsageFilter.feed(chunk)` / `finish()` turn the provider's stream into the one the
      caller would have had without the option. The usage-only chunk (`"choices":[]` with a
      usage object) is dropped with its blank line, and the `"usage":null` that the option adds
      to every other chunk is removed. Both are done on complete lines: a line split across reads
      waits for its end, so the output is the same however the stream was cut. `answered` is
      true once `data: [DONE]` went out: a caller closing then had its whole answer.
Why: OpenAI streams carry no usage unless asked ("stream_options": {"include_usage": true}), and
then "all other chunks will also include a usage field, but with a null value"
(https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options).
"""

from __future__ import annotations

import re

import orjson

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_NULL_USAGE = (b',"usage":null', b'"usage":null,')
_MAX_CARRY = 1 << 20
_DONE_LINES = (b"data: [DONE]", b"data:[DONE]")  # the stream's end (SSE: one space after the colon is optional)


def inject_include_usage(body: bytes) -> bytes | None:
    if _STREAM_TRUE.search(body) is None:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the provider will say what is wrong with it
    if not isinstance(document, dict) or document.get("stream") is not True:
        return None
    options = document.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return None
    if options.get("include_usage") is True:
        return None
    document["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(document)


class InjectedUsageFilter:
    __slots__ = ("_carry", "_done", "_drop_blank")

    extra_headers: tuple = ()

    def __init__(self) -> None:
        self._carry = bytearray()
        self._drop_blank = False
        self._done = False

    @property
    def answered(self) -> bool:
        """The filter seam's (proxy.Exchange.client_left): `data: [DONE]` went out to the caller, so
        it has its whole answer. The OpenAI SDK closes there (openai/_streaming.py, Stream.__stream__),
        before the provider's terminating chunk: that close ends a complete response, usage included
        (the usage chunk comes before [DONE], and the meter reads the provider's bytes)."""
        return self._done

    def head(self, status: int, content_type: bytes, kept: tuple = ()) -> bool:
        """The response-filter seam (proxy.Exchange.upstream_head): stay on a 2xx SSE stream only."""
        return 200 <= status < 300 and content_type.startswith(b"text/event-stream")

    def feed(self, chunk: bytes) -> bytes:
        carry = self._carry
        head = b""
        if carry:
            newline = chunk.find(b"\n")
            if newline == -1:
                # Still inside one line: grow the carry in place (joining it with every read was
                # quadratic in the line's reads, as the meter's was).
                if len(carry) + len(chunk) > _MAX_CARRY:  # not an SSE line we understand: untouched
                    head = bytes(carry) + chunk
                    carry.clear()
                    return head
                carry += chunk
                return b""
            carry += memoryview(chunk)[: newline + 1]
            head = self._rewrite(bytes(carry))
            carry.clear()
            chunk = chunk[newline + 1 :]
        last_newline = chunk.rfind(b"\n")
        tail = b""
        if last_newline != len(chunk) - 1:
            if len(chunk) - last_newline - 1 > _MAX_CARRY:
                tail = chunk[last_newline + 1 :]  # not an SSE line we understand: untouched
            else:
                carry += memoryview(chunk)[last_newline + 1 :]
            chunk = chunk[: last_newline + 1]
        body = self._rewrite(chunk) if chunk else b""
        return head + body + tail if head or tail else body

    def finish(self) -> bytes:
        carry = bytes(self._carry)
        self._carry.clear()
        return self._rewrite(carry) if carry else b""

    def _rewrite(self, lines: bytes) -> bytes:
        if b"[DONE]" in lines and not self._done:
            self._done = any(line.rstrip() in _DONE_LINES for line in lines.splitlines())
        for pattern in _NULL_USAGE:
            if pattern in lines:
                lines = lines.replace(pattern, b"")
        if not self._drop_blank and b'"usage":{' not in lines:
            return lines
        kept = []
        for line in lines.splitlines(keepends=True):
            if self._drop_blank:
                self._drop_blank = False
                if line.strip() == b"":
                    continue
            if line.startswith(b"data:") and b'"usage":{' in line and b'"choices":[]' in line:
                self._drop_blank = True  # the event's terminating blank line goes too
                continue
            kept.append(line)
        return b"".join(kept)
