"""The usage meter (sans-IO): token counts read off a response as it streams past.

Contract: `UsageMeter.start(dialect, content_type)` after the response head. `feed(chunk)` for
every body chunk: it looks at the bytes and never copies or changes what the client receives.
`result(complete)` once, in the log phase, returns a `Usage`. A missing or unparseable usage is
recorded as such; it never raises.

Only events that can carry usage are parsed. A chunk is searched for `"usage":`, the way the key
is spelled in JSON and never inside an escaped string. Only the lines around a match are decoded.
Bytes after the last newline are carried over, so an event split across reads (at any byte
boundary) is read whole.

Wire formats, and the traps other gateways fell into:
- OpenAI JSON: `usage.prompt_tokens` (cached ones included, also in
  `prompt_tokens_details.cached_tokens`), `completion_tokens` (reasoning ones included, also in
  `completion_tokens_details.reasoning_tokens`).
  https://platform.openai.com/docs/api-reference/chat/object
- OpenAI SSE: usage comes in one chunk near the end (with `stream_options.include_usage`), with an
  empty `choices` on OpenAI but beside a non-empty one on some compatible providers. Every other
  chunk says `"usage": null`. The last non-null usage wins.
  https://platform.openai.com/docs/api-reference/chat-streaming
- Anthropic JSON and SSE: `message_start` carries the input side (`input_tokens` excludes cached
  tokens; `cache_read_input_tokens` and `cache_creation_input_tokens` are separate), and
  `message_delta.usage` is cumulative. The last value is taken, never a sum.
  https://docs.anthropic.com/en/docs/build-with-claude/streaming
Normalised: `input_tokens` counts every input token once (cached ones included); the cache
fields say how many of those were read from or written to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from egress.http1 import grow

_USAGE_KEY = b'"usage":'
_OPENAI_DELTA = b'"delta":{"content":'
_ANTHROPIC_DELTA = b'"content_block_delta"'
_MAX_CARRY = 1 << 20  # an "event" longer than this without a newline is not one we can meter
_MAX_JSON = 8 << 20

# Usage states
COMPLETE, PARTIAL, MISSING, UNPARSEABLE = "complete", "partial", "missing", "unparseable"


@dataclass(slots=True)
class Usage:
    state: str = MISSING
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    # For a stream cut short with no usage: content deltas seen, standing in for output tokens.
    estimated_output_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or self.estimated_output_tokens or 0)


class UsageMeter:
    __slots__ = ("_anthropic", "_carry", "_deltas", "_json", "_json_size", "_sse", "_usage", "active")

    def __init__(self) -> None:
        self.active = False

    @property
    def streaming(self) -> bool:
        return self._sse

    def start(self, dialect: str, content_type: bytes) -> None:
        media = content_type.split(b";", 1)[0].strip().lower()
        self._sse = media == b"text/event-stream"
        if not self._sse and media != b"application/json":
            return
        self.active = True
        self._anthropic = dialect == "anthropic"
        self._carry = bytearray()
        self._deltas = 0
        self._json: bytes | bytearray = b""
        self._json_size = 0
        self._usage = Usage()

    def feed(self, chunk: bytes) -> None:
        if not self._sse:
            # JSON usage sits anywhere in the document: parse it once, at the end. A reference per
            # piece cost ~40 bytes per byte when an upstream sent 1-byte chunks: one buffer instead.
            self._json_size += len(chunk)
            if self._json_size <= _MAX_JSON:
                self._json = grow(self._json, chunk)
            return
        self._deltas += chunk.count(_ANTHROPIC_DELTA if self._anthropic else _OPENAI_DELTA)
        carry = self._carry
        if carry:
            if chunk.find(b"\n") == -1:
                # Still inside one line: grow the carry in place. Joining carry and chunk for every
                # piece was quadratic in the line's pieces (seconds for 150 KB in 1-byte chunks).
                if len(carry) + len(chunk) <= _MAX_CARRY:
                    carry += chunk
                else:
                    carry.clear()  # not an event egress can meter
                return
            chunk = bytes(carry) + chunk
            carry.clear()
        if chunk.find(_USAGE_KEY) != -1:
            self._scan_lines(chunk)
        last_newline = chunk.rfind(b"\n")
        if last_newline != len(chunk) - 1 and len(chunk) - last_newline - 1 <= _MAX_CARRY:
            carry += memoryview(chunk)[last_newline + 1 :]

    def result(self, complete: bool) -> Usage:
        if not self.active:
            return Usage(MISSING)
        usage = self._usage
        if not self._sse:
            if self._json_size > _MAX_JSON:
                usage.state = UNPARSEABLE
                return usage
            try:
                document = orjson.loads(self._json)
            except orjson.JSONDecodeError:
                usage.state = UNPARSEABLE
                return usage
            if isinstance(document, dict):
                self._apply(document)
        elif self._carry and self._carry.find(_USAGE_KEY) != -1:
            self._scan_lines(self._carry + b"\n")  # a last event without its newline
        if usage.output_tokens is not None or usage.input_tokens is not None:
            if not complete:
                usage.state = PARTIAL
            elif usage.state == MISSING:
                usage.state = COMPLETE
        elif not complete and self._sse:
            usage.state = PARTIAL
            usage.estimated_output_tokens = self._deltas
        return usage

    # -- internals -------------------------------------------------------------------------
    def _scan_lines(self, buffer: bytes) -> None:
        position = buffer.find(_USAGE_KEY)
        end = len(buffer)
        while position != -1:
            line_start = buffer.rfind(b"\n", 0, position) + 1
            line_end = buffer.find(b"\n", position)
            if line_end == -1:
                return  # incomplete: the carry brings it back whole
            line = buffer[line_start:line_end].rstrip(b"\r")
            if line.startswith(b"data:"):
                try:
                    document = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    self._usage.state = UNPARSEABLE
                else:
                    if isinstance(document, dict):
                        self._apply(document)
            position = buffer.find(_USAGE_KEY, line_end, end)

    def _apply(self, document: dict) -> None:
        if self._anthropic and document.get("type") == "message_start":
            document = document.get("message")  # the input side sits inside the message
            if not isinstance(document, dict):
                return
        usage = self._usage
        if isinstance(document.get("model"), str):
            usage.model = document["model"]
        counts = document.get("usage")
        if isinstance(counts, dict):
            (_anthropic_counts if self._anthropic else _openai_counts)(usage, counts)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _openai_counts(usage: Usage, counts: dict) -> None:
    # The last non-null usage wins: providers differ on which chunk carries it.
    usage.input_tokens = _int(counts.get("prompt_tokens", counts.get("input_tokens")))
    usage.output_tokens = _int(counts.get("completion_tokens", counts.get("output_tokens")))
    prompt_details = counts.get("prompt_tokens_details") or counts.get("input_tokens_details")
    if isinstance(prompt_details, dict):
        usage.cache_read_tokens = _int(prompt_details.get("cached_tokens"))
    completion_details = counts.get("completion_tokens_details") or counts.get("output_tokens_details")
    if isinstance(completion_details, dict):
        usage.reasoning_tokens = _int(completion_details.get("reasoning_tokens"))


def _anthropic_counts(usage: Usage, counts: dict) -> None:
    # message_delta repeats the running totals: assign, never add.
    uncached = _int(counts.get("input_tokens"))
    cache_read = _int(counts.get("cache_read_input_tokens"))
    cache_creation = _int(counts.get("cache_creation_input_tokens"))
    if cache_read is not None:
        usage.cache_read_tokens = cache_read
    if cache_creation is not None:
        usage.cache_creation_tokens = cache_creation
    if uncached is not None:
        # Anthropic's input_tokens leaves the cached ones out: count every input token once.
        usage.input_tokens = uncached + (usage.cache_read_tokens or 0) + (usage.cache_creation_tokens or 0)
    output = _int(counts.get("output_tokens"))
    if output is not None:
        usage.output_tokens = output
