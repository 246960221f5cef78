"""Asking OpenAI-style streams for usage, and hiding the answer from a caller who didn't ask.

Contract:
  `inject_include_usage(body)` returns the request body with `stream_options.include_usage: true`
      added, or None when there is nothing to change (not a streaming request, not JSON, or the
      caller asked for usage already).
  `InjectedUsageFilter.feed(chunk)` / `finish()` turn the provider's stream into the one the
      caller would have had without the option. The usage-only chunk (`"choices":[]` with a
      usage object) is dropped with its blank line, and the `"usage":null` that the option adds
      to every other chunk is removed. Both are done on complete lines: a line split across reads
      waits for its end, so the output is the same however the stream was cut.
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
    __slots__ = ("_carry", "_drop_blank")

    extra_headers: tuple = ()
    answered = False  # the filter seam's (proxy.Exchange.client_left): only a translation knows

    def __init__(self) -> None:
        self._carry = b""
        self._drop_blank = False

    def head(self, status: int, content_type: bytes) -> bool:
        """The response-filter seam (proxy.Exchange.upstream_head): stay on a 2xx SSE stream only."""
        return 200 <= status < 300 and content_type.startswith(b"text/event-stream")

    def feed(self, chunk: bytes) -> bytes:
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        last_newline = chunk.rfind(b"\n")
        if last_newline != len(chunk) - 1:
            tail = chunk[last_newline + 1 :]
            if len(tail) > _MAX_CARRY:  # not an SSE line we understand: let it through untouched
                return chunk
            self._carry = tail
            chunk = chunk[: last_newline + 1]
        return self._rewrite(chunk) if chunk else b""

    def finish(self) -> bytes:
        carry, self._carry = self._carry, b""
        return self._rewrite(carry) if carry else b""

    def _rewrite(self, lines: bytes) -> bytes:
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
