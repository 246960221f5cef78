"""The usage meter (sans-IO): token counts read off a response as it streams past.

Contract: `UsageMeter.start(api, content_type, content_encoding)` after the response head, with
`api` from `api_of(path, dialect)`. `feed(chunk)` for every body chunk: it looks at the bytes (or
at a decoded copy of a compressed body) and never changes what the client receives.
`result(complete)` once, in the log phase, returns a `Usage`. A missing or unparseable usage is
recorded as such, with a reason; it never raises.

One reducer for every dialect: `reduce_usage(state, document, api)` folds one provider document
(a JSON body, or one SSE event) into the running state. Each field takes the latest value the
provider reported, never a sum, so a cumulative `message_delta`, a usage repeated on several
chunks, or a `response.completed` after `response.created` all give the provider's own numbers.

Which API a body speaks is decided by the path (and the content type), not by the provider: a
provider can serve several (Anthropic serves an OpenAI-compatible /chat/completions too).
  openai     chat completions, completions, embeddings: `usage.prompt_tokens` (cached included,
             also in `prompt_tokens_details.cached_tokens`), `completion_tokens` (reasoning
             included, also in `completion_tokens_details.reasoning_tokens`).
             https://platform.openai.com/docs/api-reference/chat/object
             Streams: usage on one chunk near the end when asked (`stream_options.include_usage`),
             with empty `choices` on OpenAI but beside non-empty ones on some providers; the last
             non-null usage wins. https://platform.openai.com/docs/api-reference/chat-streaming
             Groq puts it in `x_groq.usage` (https://console.groq.com/docs/api-reference);
             DeepSeek counts cache hits in `prompt_cache_hit_tokens`
             (https://api-docs.deepseek.com/api/create-chat-completion); OpenRouter reports the
             provider's `cost` (https://openrouter.ai/docs/use-cases/usage-accounting).
  responses  OpenAI Responses: `usage.input_tokens` (`input_tokens_details.cached_tokens`),
             `output_tokens` (`output_tokens_details.reasoning_tokens`) on the Response object:
             top level in JSON, under `response` in the `response.completed`,
             `response.incomplete` and `response.failed` events of a stream.
             https://platform.openai.com/docs/api-reference/responses-streaming
  anthropic  Messages: `message_start` carries the input side (`input_tokens` excludes cached
             tokens; `cache_read_input_tokens` and `cache_creation_input_tokens` are separate, the
             latter split by `cache_creation.ephemeral_5m_input_tokens` / `_1h_`), and
             `message_delta.usage` is cumulative.
             https://docs.anthropic.com/en/docs/build-with-claude/streaming
  batch      OpenAI's Batch object (`/v1/batches`): its `usage` (the Responses API's names) once
             the batch is done (`completed`, `failed`, `expired`, `cancelled`), on batches created
             since September 2025; every read of it repeats them, so each fact carries the batch's
             id and the report bills it once. https://platform.openai.com/docs/api-reference/batch/object
  anthropic_batch, anthropic_batch_results
             Anthropic's Message Batch object (no usage: its id only), and its results
             (`/v1/messages/batches/{id}/results`): JSONL, a line per request, whose succeeded
             ones carry a Message with its usage; `BatchResultsMeter` reads each line with this
             reducer and sums them. https://docs.anthropic.com/en/api/retrieving-message-batch-results
Normalised: `input_tokens` counts every input token once (cached ones included); the cache
fields say how many of those were read from or written to the cache.

SSE: a chunk is searched for `"usage":`, the way the key is spelled in JSON and never inside an
escaped string; only the lines around a match are decoded. Bytes after the last newline are carried
over, so an event split across reads (at any byte boundary) is read whole.

Compressed bodies (`Content-Encoding: gzip` or `deflate`, the codings egress lets upstream): the
meter decodes a copy incrementally with zlib, bounded (`_MAX_DECODED`); a body it can't decode is
`unparseable`, and the client's bytes are never touched.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import orjson

from egress.http1 import grow

_USAGE_KEY = b'"usage":'
_NULL = b"null"
# What one output delta looks like, per API: counted as an estimate when a stream is cut short.
# Every kind of output counts, not only text: reasoning (`reasoning_content`, OpenRouter's
# `reasoning`) and tool-call arguments are output tokens too. OpenAI: every chunk whose delta is not
# empty (one more than the tokens, for the role chunk). Anthropic: every content_block_delta (text,
# thinking, input_json). Responses: every `*.delta` event type (output_text, reasoning_text,
# reasoning_summary_text, function_call_arguments, refusal, ...), matched in the JSON `type` only:
# the `event:` line carries no quotes, and a quote inside a string is escaped.
_DELTA = {
    "openai": b'"delta":{"',
    "anthropic": b'"content_block_delta"',
    "responses": b'.delta"',
    # No batch endpoint streams; a provider that did would be read as chat's is.
    "batch": b'"delta":{"',
    "anthropic_batch": b'"content_block_delta"',
    "anthropic_batch_results": b'"content_block_delta"',
}
# An SSE line longer than this is kept as its head and its tail only: a Responses stream's
# `response.completed` carries the whole Response, so an image_generation_call's base64 result makes
# it megabytes long, and its `usage` sits near the end (after `output` and `tools`), its `model`
# near the start (usually known already from `response.created`).
_MAX_CARRY = 1 << 20
_BIG_HEAD = 64 << 10
_BIG_TAIL = 256 << 10
# A `"model": "..."` field found without parsing (the head of a huge event here; a request body's
# model for its usage fact in proxy.requested_model): one pattern for both.
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
# Token counts past this are not counts: refused like a negative one. It also keeps every sum of
# them (Anthropic's input is three fields) far inside the 64-bit integers orjson writes.
_MAX_TOKENS = 1 << 40  # spelled out in _int
_MAX_JSON = 8 << 20
_MAX_DECODED = 64 << 20  # a decoded stream past this is not metered further (a compression bomb)
# A raw deflate body (no zlib header) fails at its first bytes, before any output: what came until
# then is kept to be fed again, whatever the size of the first read (at most this, plus one read).
_MAX_CODED_HEAD = 1 << 20


class _Ignore:
    """Stands in for the decoder once a body can't be metered: every chunk decodes to nothing."""

    __slots__ = ()
    eof = True

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        return b""


_IGNORE = _Ignore()

_NO_RAW: dict[str, int] = {}
_media: dict[bytes, bytes] = {}  # Content-Type value -> its media type, lower-case

# Usage states
COMPLETE, PARTIAL, MISSING, UNPARSEABLE = "complete", "partial", "missing", "unparseable"

# The APIs a body can speak, as far as usage goes.
OPENAI, ANTHROPIC, RESPONSES = "openai", "anthropic", "responses"
BATCH, ANTHROPIC_BATCH, ANTHROPIC_BATCH_RESULTS = "batch", "anthropic_batch", "anthropic_batch_results"
# The APIs whose GETs are metered: those that carry tokens no POST reported (a background response
# polled, a batch found done, a batch's results read), billed once per id (the report) however often
# read, and an Anthropic batch object's, whose fact carries the batch's id and no tokens.
READ_BACK = frozenset((RESPONSES, BATCH, ANTHROPIC_BATCH, ANTHROPIC_BATCH_RESULTS))
# A batch whose tokens are all counted: its status then, on OpenAI's Batch object.
_BATCH_DONE = frozenset(("completed", "failed", "expired", "cancelled"))


def _as_routed(path: bytes) -> bytes:
    """The path as a provider routes it: a %-escaped byte decoded (`/results` may come as
    `/result%73`, `/batches` as `/batche%73`), as servers decode a path before routing it. A form
    the provider does not route that way fails there, and a failed answer is not metered: reading
    the path as the provider may is the safe side. `%2f` never gets here (providers.py refuses it).
    Cached on the Route: once per path, not per request."""
    return unquote_to_bytes(path) if b"%" in path else path


def api_of(path: bytes, dialect: str) -> str:
    """The API a response body speaks, from the request path; the provider's dialect otherwise."""
    path = _as_routed(path)
    if b"/messages" in path:
        if b"/messages/batches" in path:
            return ANTHROPIC_BATCH_RESULTS if path.rstrip(b"/").endswith(b"/results") else ANTHROPIC_BATCH
        return ANTHROPIC
    if b"/responses" in path:
        return RESPONSES
    if b"/chat/completions" in path or b"/embeddings" in path or b"/completions" in path:
        return OPENAI
    if b"/batches" in path:
        return BATCH
    return ANTHROPIC if dialect == "anthropic" else OPENAI


def batch_id_of(path: bytes) -> str | None:
    """The batch a `/v1/messages/batches/{id}/results` path names: its results don't say. As the
    provider reads it (`msgbatch_%31` is `msgbatch_1`): the id the batch object gave its POST and
    GETs, which the report bills once."""
    rest = _as_routed(path).partition(b"/messages/batches/")[2]
    batch_id = rest.split(b"/", 1)[0][:200].decode("latin-1")
    return batch_id or None


@dataclass(slots=True)
class Usage:
    state: str = MISSING
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    cache_creation_5m_tokens: int | None = None
    cache_creation_1h_tokens: int | None = None
    reasoning_tokens: int | None = None
    # What the provider says the request cost (OpenRouter's `usage.cost`, in its credits/USD).
    provider_cost: float | None = None
    # Web searches the provider ran for the request, billed per search beside the tokens: Anthropic's
    # `usage.server_tool_use.web_search_requests`, the Responses API's `web_search_call` output items.
    web_search_requests: int | None = None
    # For a stream cut short with no usage: content deltas seen, standing in for output tokens.
    estimated_output_tokens: int | None = None
    # Why usage is missing, partial or unparseable, when egress knows: a stable word.
    reason: str | None = None
    # A Responses API response's id, and whether it runs in the background (`background: true`):
    # its tokens then come in the GETs that poll it (and a stream resumed by GET), billed once per id.
    # For a batch (`batch`), the batch's id: its tokens come in the GET that finds it done (OpenAI),
    # or in its results (Anthropic), billed once per id too.
    response_id: str | None = None
    background: bool = False
    batch: bool = False

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or self.estimated_output_tokens or 0)


class UsageMeter:
    __slots__ = (
        "_api",
        "_big_head",
        "_carry",
        "_coded_head",
        "_decoded",
        "_decoder",
        "_delta",
        "_delta_edge",
        "_deltas",
        "_json",
        "_json_size",
        "_raw",
        "_sse",
        "_usage",
        "active",
    )

    def __init__(self) -> None:
        self.active = False

    @property
    def streaming(self) -> bool:
        return self._sse

    @property
    def api(self) -> str:
        return self._api

    def start(self, api: str, content_type: bytes, content_encoding: bytes = b"") -> None:
        media = _media.get(content_type)
        if media is None:
            media = content_type.split(b";", 1)[0].strip().lower()
            if len(_media) < 64:  # a provider sends one or two spellings: one look-up instead of three calls
                _media[content_type] = media
        self._sse = media == b"text/event-stream"
        if not self._sse and media != b"application/json":
            return
        self.active = True
        self._api = api
        if self._sse:
            self._delta = _DELTA[api]
            self._carry = bytearray()
            self._deltas = 0
            self._delta_edge = b""
            self._big_head: bytes | None = None  # the head of an SSE line over _MAX_CARRY, being read
        else:
            self._json: bytes | bytearray = b""
            self._json_size = 0
        # Anthropic's fields as reported, latest wins; other APIs never write to it.
        self._raw: dict[str, int] = {} if api == ANTHROPIC else _NO_RAW
        self._usage = Usage()
        self._decoder = None
        if content_encoding:
            self._decode_as(content_encoding)

    def _decode_as(self, content_encoding: bytes) -> None:
        self._decoded = 0
        self._coded_head = b""
        coding = content_encoding.strip().lower()
        if coding in (b"gzip", b"x-gzip", b"deflate"):
            # 32 + 15: zlib or gzip, told apart by the header. A raw deflate stream (what some
            # servers send for `deflate`) is caught on the first error and retried.
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)
        elif coding != b"identity":
            self._fail(UNPARSEABLE, "content_encoding")
            self._decoder = _IGNORE

    def feed(self, chunk: bytes) -> None:
        if self._decoder is not None:
            chunk = self._decode(chunk)
            if not chunk:
                return
        if not self._sse:
            # JSON usage sits anywhere in the document: parse it once, at the end. A reference per
            # piece cost ~40 bytes per byte when an upstream sent 1-byte chunks: one buffer instead.
            self._json_size += len(chunk)
            if self._json_size <= _MAX_JSON:
                self._json = grow(self._json, chunk)
            return
        delta = self._delta
        self._deltas += chunk.count(delta)
        # A delta's marker split across two reads is counted too, so the estimate is the same however
        # the stream is cut (once it ends in this read, never twice): the last bytes of the reads before.
        edge = self._delta_edge
        if edge:
            self._deltas += (edge + chunk[: len(delta) - 1]).count(delta)
        self._delta_edge = chunk[1 - len(delta) :] if len(chunk) >= len(delta) - 1 else (edge + chunk)[1 - len(delta) :]
        carry = self._carry
        if carry:
            newline = chunk.find(b"\n")
            if newline == -1:
                # Still inside one line: grow the carry in place. Joining carry and chunk for every
                # piece was quadratic in the line's pieces (seconds for 150 KB in 1-byte chunks).
                if self._big_head is None and len(carry) + len(chunk) <= _MAX_CARRY:
                    carry += chunk
                else:
                    self._keep_ends(chunk)
                return
            if self._big_head is not None:
                self._big_line(bytes(carry) + chunk[:newline])
                carry.clear()
                chunk = chunk[newline + 1 :]
            else:
                chunk = bytes(carry) + chunk
                carry.clear()
        if chunk.find(_USAGE_KEY) != -1:
            self._scan_lines(chunk)
        last_newline = chunk.rfind(b"\n")
        if last_newline != len(chunk) - 1:
            if len(chunk) - last_newline - 1 <= _MAX_CARRY:
                carry += memoryview(chunk)[last_newline + 1 :]
            else:
                self._keep_ends(chunk[last_newline + 1 :])

    @property
    def done_sent(self) -> bool:
        """A chat stream whose bytes so far end with its `data: [DONE]` event: the answer is whole,
        and the OpenAI SDK closes there, before the provider's terminating chunk. Read off the last
        bytes the estimate keeps (`_delta_edge`), so a read pays nothing for it. A data line of JSON
        ends in `}`: only [DONE]'s ends in `DONE]` before its blank line."""
        return self._sse and self._delta_edge.endswith((b"DONE]\n\n", b"DONE]\r\n\r\n"))

    def result(self, complete: bool) -> Usage:
        if not self.active:
            return Usage(MISSING)
        usage = self._usage
        if self._decoder is not None:
            if self._decoder is _IGNORE:
                return usage  # unparseable, and why, already said
            if complete and not self._decoder.eof:
                return self._fail(UNPARSEABLE, "content_encoding")  # a compressed body that never ended
            self._decoder = None
        if not self._sse:
            if self._json_size > _MAX_JSON:
                return self._fail(UNPARSEABLE, "too_large")
            try:
                document = orjson.loads(self._json)
            except orjson.JSONDecodeError:
                # A body the provider cut short is not a provider's bad JSON: its usage is missing.
                return self._fail(UNPARSEABLE, "not_json") if complete else self._fail(MISSING, "cut")
            if isinstance(document, dict):
                reduce_usage(usage, self._raw, document, self._api)
        elif self._big_head is not None:
            self._big_line(bytes(self._carry))  # a last event without its newline
        elif self._carry and self._carry.find(_USAGE_KEY) != -1:
            # A last event without its newline. In a stream cut short it is most likely cut too: a
            # truncated line is no provider's bad JSON (an incomplete event is not dispatched, WHATWG
            # HTML §9.2.6), and calling it unparseable hid Anthropic's cut below, billing
            # message_start's placeholder output_tokens.
            self._scan_lines(bytes(self._carry) + b"\n", strict=complete)
        if (
            self._sse
            and self._raw is not _NO_RAW
            and "final" not in self._raw
            and usage.state != UNPARSEABLE
            and (usage.input_tokens is not None or not complete)
        ):
            # An Anthropic stream that never sent its message_delta: message_start's output_tokens
            # is a placeholder (1 to 7 in the recordings), not a count. A cut stream, or one ended
            # by an `event: error` with clean framing, is partial, its output estimated.
            usage.output_tokens = None
            usage.state = PARTIAL
            usage.reason = "cut" if not complete else "ended_early"
            usage.estimated_output_tokens = self._deltas
            return usage
        if usage.output_tokens is not None or usage.input_tokens is not None:
            if not complete:
                usage.state = PARTIAL
                usage.reason = "cut"
            elif usage.state == MISSING:
                usage.state = COMPLETE
        elif not complete and self._sse:
            usage.state = PARTIAL
            usage.reason = "cut"
            usage.estimated_output_tokens = self._deltas
        elif usage.state == MISSING and usage.reason is None:  # a batch not done has said why
            usage.reason = "not_reported"
        return usage

    # -- internals -------------------------------------------------------------------------
    def _decode(self, chunk: bytes) -> bytes:
        if self._decoded == 0 and len(self._coded_head) < _MAX_CODED_HEAD:
            self._coded_head += chunk  # what to feed again if this turns out to be raw deflate
        try:
            data = self._decoder.decompress(chunk, _MAX_DECODED - self._decoded + 1)
        except zlib.error:
            return self._retry_raw_deflate()
        self._decoded += len(data)
        if self._decoded > _MAX_DECODED:
            self._fail(UNPARSEABLE, "too_large")
            self._decoder = _IGNORE
            return b""
        return data

    def _retry_raw_deflate(self) -> bytes:
        """`Content-Encoding: deflate` sent as raw deflate (no zlib header), as some servers do."""
        if self._decoded == 0 and len(self._coded_head) < _MAX_CODED_HEAD + 65536:
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                data = self._decoder.decompress(self._coded_head, _MAX_DECODED + 1)
            except zlib.error:
                pass
            else:
                self._decoded += len(data)
                return data
        self._fail(UNPARSEABLE, "content_encoding")
        self._decoder = _IGNORE
        return b""

    def _fail(self, state: str, reason: str) -> Usage:
        usage = self._usage
        usage.state = state
        usage.reason = reason
        return usage

    def _keep_ends(self, piece: bytes) -> None:
        """More of an SSE line over _MAX_CARRY: its head is kept once, the carry holds its tail."""
        carry = self._carry
        if self._big_head is None:
            self._big_head = bytes(carry[:_BIG_HEAD]) if len(carry) >= _BIG_HEAD else bytes(carry) + piece[:_BIG_HEAD]
        if len(piece) >= _BIG_TAIL:
            carry[:] = piece[-_BIG_TAIL:]
        else:
            carry += piece
            if len(carry) > 2 * _BIG_TAIL:  # trimmed in steps, not per piece: amortised copies
                del carry[: len(carry) - _BIG_TAIL]

    def _big_line(self, tail: bytes) -> None:
        """An SSE line over _MAX_CARRY ended; `tail` is its end. Its usage object is read from the
        tail (the last `"usage":` there followed by an object), its model from the head."""
        head, self._big_head = self._big_head, None
        start = tail.rfind(_USAGE_KEY)
        while start != -1:
            text = tail[start + len(_USAGE_KEY) :].decode("utf-8", "replace").lstrip()
            if text.startswith("{"):
                try:
                    counts, _ = json.JSONDecoder().raw_decode(text)
                except ValueError:
                    break
                document = {"usage": counts}
                found = MODEL_FIELD.search(head)
                if found is not None:
                    document["model"] = found.group(1).decode("utf-8", "replace")
                if self._api == ANTHROPIC:
                    document["type"] = "message_delta"  # the only Anthropic event with usage at its top
                reduce_usage(self._usage, self._raw, document, self._api)
                return
            start = tail.rfind(_USAGE_KEY, 0, start)

    def _scan_lines(self, buffer: bytes, strict: bool = True) -> None:
        position = buffer.find(_USAGE_KEY)
        end = len(buffer)
        while position != -1:
            if self._usage.model is not None and buffer.startswith(_NULL, position + len(_USAGE_KEY)):
                # OpenAI's include_usage puts `"usage":null` on every chunk but the last: once the
                # model is known, such a chunk has nothing to say, and is not parsed.
                position = buffer.find(_USAGE_KEY, position + len(_USAGE_KEY), end)
                continue
            line_start = buffer.rfind(b"\n", 0, position) + 1
            line_end = buffer.find(b"\n", position)
            if line_end == -1:
                return  # incomplete: the carry brings it back whole
            line = buffer[line_start:line_end].rstrip(b"\r")
            if line.startswith(b"data:"):
                try:
                    document = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    if strict:
                        self._fail(UNPARSEABLE, "not_json")
                else:
                    if isinstance(document, dict):
                        reduce_usage(self._usage, self._raw, document, self._api)
            position = buffer.find(_USAGE_KEY, line_end, end)


# A batch result line longer than this is not read (its request's tokens are then missing from
# the sum, and the fact says so): the longest Message a request can produce is far shorter.
_MAX_RESULT_LINE = 8 << 20
# A compressed results body is decoded this much at a time, the rest of a read left in zlib's
# `unconsumed_tail` for the next step: memory stays bounded whatever the ratio.
_RESULTS_STEP = 1 << 20
# A batch's results are not one JSON document held whole but lines read as they pass, so
# _MAX_DECODED (64 MiB, a body's bound) would cut a real one short: a batch holds up to 100,000
# requests (https://docs.anthropic.com/en/docs/build-with-claude/batch-processing), a few KiB of
# JSONL each, and one whose output is long runs to gigabytes. Gzip gives no way to tell a bomb from
# a body (a degenerate answer repeated compresses 300 to 1; deflate's most is 1032), so the bound
# is on the work: past 4 GiB decoded (seconds of CPU, spread over the reads) the reading stops, and
# the fact is partial with the requests read so far.
_MAX_RESULTS_DECODED = 4 << 30
# The Usage fields a batch's results add up, request by request.
_SUMMED = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "cache_creation_5m_tokens",
    "cache_creation_1h_tokens",
    "reasoning_tokens",
    "web_search_requests",
)


class BatchResultsMeter(UsageMeter):
    """Anthropic's Message Batch results (`GET /v1/messages/batches/{id}/results`), summed into one
    Usage: a line per request, in any order; a `succeeded` one carries its Message, whose usage
    `reduce_usage` reads as it reads any Message; `errored`, `canceled` and `expired` ones cost
    nothing. The body is JSONL whatever its Content-Type, relayed untouched like any other.

    The fact bills the whole batch; every read of the results repeats it, so it carries the batch's
    id and the report bills one complete read per id. A read cut short is `partial` (the requests
    read so far), and a line that can't be read (not JSON, or over _MAX_RESULT_LINE) makes it
    `partial` too, with the reason, its request's tokens left out; so does a compressed body that
    can't be decoded to its end (`content_encoding`, or `too_large` past _MAX_RESULTS_DECODED), or
    `unparseable` when not one line was read. Every such fact keeps the batch's id: a gap in the bill
    is one the facts name. `model` is the batch's when every request names the same one, else null
    (billing by model needs a fact per model). Memory is bounded: a line, a decoding step, a model."""

    __slots__ = ("_bad", "_batch_id", "_lines", "_mixed", "_model", "_skipping", "_sum")

    def __init__(self, batch_id: str | None) -> None:
        super().__init__()
        self._batch_id = batch_id

    def start(self, api: str, content_type: bytes, content_encoding: bytes = b"") -> None:
        self.active = True
        self._api = api
        self._sse = False
        self._carry = bytearray()
        self._usage = Usage()
        self._sum = Usage()
        self._model: str | None = None  # the model every Message read so far named
        self._mixed = False  # two Messages named different models
        self._lines = 0  # result lines read
        self._bad: str | None = None  # why a line went unread, if one did
        self._skipping = False  # inside a line over _MAX_RESULT_LINE, until its newline
        self._decoder = None
        if content_encoding:
            self._decode_as(content_encoding)

    def feed(self, chunk: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            self._feed_lines(chunk)
            return
        if decoder is _IGNORE:
            return
        if self._decoded == 0 and len(self._coded_head) < _MAX_CODED_HEAD:
            self._coded_head += chunk  # what to feed again if this turns out to be raw deflate
        try:
            data = decoder.decompress(chunk, _RESULTS_STEP)
            while True:
                if data:
                    self._feed_lines(data)
                    self._decoded += len(data)
                    if self._decoded > _MAX_RESULTS_DECODED:  # one step past it at most
                        self._fail(UNPARSEABLE, "too_large")
                        self._decoder = _IGNORE
                        return
                tail = decoder.unconsumed_tail
                if not tail:
                    return
                data = decoder.decompress(tail, _RESULTS_STEP)
        except zlib.error:
            if self._decoded:
                self._fail(UNPARSEABLE, "content_encoding")
                self._decoder = _IGNORE
                return
        # Not zlib nor gzip from its first bytes: raw deflate, as some servers send `deflate`.
        data = self._retry_raw_deflate()
        if data:
            self._feed_lines(data)

    def _feed_lines(self, chunk: bytes) -> None:
        carry = self._carry
        start = 0
        newline = chunk.find(b"\n")
        while newline != -1:
            if self._skipping:
                self._skipping = False
            elif len(carry) + newline - start > _MAX_RESULT_LINE:
                carry.clear()  # the same line judged alike however the body was cut
                self._bad = "too_large"
                self._lines += 1
            elif carry:
                carry += memoryview(chunk)[start:newline]
                self._line(bytes(carry))
                carry.clear()
            else:
                self._line(chunk[start:newline])
            start = newline + 1
            newline = chunk.find(b"\n", start)
        if start < len(chunk) and not self._skipping:
            if len(carry) + len(chunk) - start > _MAX_RESULT_LINE:
                carry.clear()
                self._skipping = True
                self._bad = "too_large"
                self._lines += 1
            else:
                carry += memoryview(chunk)[start:]

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        self._lines += 1
        if line.find(b'"usage"') == -1:
            return  # errored, canceled, expired: no Message, nothing billed
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._bad = "not_json"
            return
        result = document.get("result") if document.__class__ is dict else None
        message = result.get("message") if result.__class__ is dict and result.get("type") == "succeeded" else None
        if message.__class__ is not dict:
            return
        one = Usage()
        reduce_usage(one, {}, message, ANTHROPIC)
        if one.model is not None and not self._mixed:
            if self._model is None:
                self._model = one.model
            elif one.model != self._model:
                self._mixed = True  # one flag, not a set: 100,000 models named would be held
                self._model = None
        total = self._sum
        for name in _SUMMED:
            value = getattr(one, name)
            if value is not None:
                before = getattr(total, name)
                setattr(total, name, value if before is None else before + value)

    def result(self, complete: bool) -> Usage:
        failed = None  # why the body could not be decoded to its end
        decoder = self._decoder
        if decoder is _IGNORE:
            failed = self._usage.reason  # content_encoding, too_large
        elif decoder is not None and complete and not decoder.eof:
            failed = "content_encoding"  # a compressed body that never ended
        if self._carry and not self._skipping and complete and failed is None:
            self._line(bytes(self._carry))  # a last line without its newline
        total = self._sum
        total.response_id = self._batch_id
        total.batch = self._batch_id is not None
        total.model = self._model
        if failed is not None:
            total.state, total.reason = (PARTIAL if self._lines else UNPARSEABLE), failed
        elif not complete:
            total.state, total.reason = PARTIAL, "cut"
        elif self._bad is not None:
            total.state, total.reason = PARTIAL, self._bad
        elif self._lines:
            total.state = COMPLETE  # every request read: the ones that failed cost nothing
            for name in ("input_tokens", "output_tokens"):
                if getattr(total, name) is None:
                    setattr(total, name, 0)
        else:
            total.reason = "not_reported"
        return total


def reduce_usage(usage: Usage, raw: dict[str, int], document: dict, api: str) -> None:
    """Fold one provider document into `usage`: every field takes the latest value, never a sum.

    `raw` keeps Anthropic's fields as reported, because its normalised `input_tokens` is a sum of
    three fields that may arrive in different events.
    """
    if api == ANTHROPIC:
        kind = document.get("type")
        if kind == "message_start":
            document = document.get("message")  # the input side sits inside the message
            if not isinstance(document, dict):
                return
        elif kind == "message_delta" or kind == "message":
            # The final counts: a stream's message_delta, or a JSON body. Without one, a stream's
            # output_tokens is message_start's placeholder (UsageMeter.result).
            raw["final"] = 1
    elif api == RESPONSES:
        inner = document.get("response")  # the stream's events wrap the Response object
        if isinstance(inner, dict):
            document = inner
        response_id = document.get("id")
        if response_id.__class__ is str:
            usage.response_id = response_id
        if document.get("background") is True:
            usage.background = True
        output = document.get("output")
        if output.__class__ is list:  # the whole Response: its web_search_call items, each billed
            usage.web_search_requests = sum(
                1 for item in output if item.__class__ is dict and item.get("type") == "web_search_call"
            )
    elif api in (BATCH, ANTHROPIC_BATCH):
        # A batch object (its POST, each GET, a cancel): its id on each of its facts. OpenAI's carries
        # the batch's tokens once it is done; Anthropic's never does (its results do).
        if api == BATCH:
            if document.get("object") != "batch":
                return  # a list of batches: each one's tokens are billed from its own GET
        elif document.get("type") != "message_batch":
            return
        batch_id = document.get("id")
        if batch_id.__class__ is str:
            usage.response_id = batch_id[:200]
            usage.batch = True
        status = document.get("status")
        # A status that is not a string is no state of a batch: not done (and never hashed: a list
        # in a frozenset raised, and the fact was lost).
        if api == ANTHROPIC_BATCH or status.__class__ is not str or status not in _BATCH_DONE:
            usage.reason = "batch"  # queued or running: the tokens come later
            return
    model = document.get("model")
    if isinstance(model, str):
        # At most MODEL_FIELD's 200 characters: a server that echoes the caller's model (llama.cpp)
        # would otherwise put megabytes of it in every fact.
        usage.model = model[:200]
    counts = document.get("usage")
    if not isinstance(counts, dict):
        x_groq = document.get("x_groq")  # Groq's streams report it here
        if not isinstance(x_groq, dict):
            return
        counts = x_groq.get("usage")
        if not isinstance(counts, dict):
            return
    if api == ANTHROPIC:
        _anthropic_counts(usage, raw, counts)
    else:
        _openai_counts(usage, counts)


def _int(value: object) -> int | None:
    # `__class__ is int` and not isinstance: a bool is an int too, and one check is cheaper than two.
    # The bound written out (_MAX_TOKENS, 2^40): a constant costs one opcode less than a global.
    return value if value.__class__ is int and 0 <= value < 1099511627776 else None


def _openai_counts(usage: Usage, counts: dict) -> None:
    # A usage object is whole: the last one replaces what came before. Chat names first, then the
    # Responses API's; each `get` only when the first is absent (this runs once per response).
    get = counts.get
    value = get("prompt_tokens")
    usage.input_tokens = _int(get("input_tokens") if value is None else value)
    value = get("completion_tokens")
    usage.output_tokens = _int(get("output_tokens") if value is None else value)
    cached = None
    details = get("prompt_tokens_details") or get("input_tokens_details")
    if details.__class__ is dict:
        cached = _int(details.get("cached_tokens"))
    if cached is None and "prompt_cache_hit_tokens" in counts:
        cached = _int(counts["prompt_cache_hit_tokens"])  # DeepSeek
    usage.cache_read_tokens = cached
    reasoning = None
    details = get("completion_tokens_details") or get("output_tokens_details")
    if details.__class__ is dict:
        reasoning = _int(details.get("reasoning_tokens"))
    usage.reasoning_tokens = reasoning
    if (
        reasoning
        and usage.input_tokens is not None
        and usage.output_tokens is not None
        and _int(counts.get("total_tokens")) == usage.input_tokens + usage.output_tokens + reasoning
    ):
        # xAI counts reasoning beside completion_tokens, not inside (its total_tokens is the sum of
        # all three), and bills it as output: output_tokens includes reasoning for every provider.
        usage.output_tokens += reasoning
    if "cost" in counts:  # OpenRouter
        cost = counts["cost"]
        if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
            usage.provider_cost = float(cost)
    elif "cost_in_usd_ticks" in counts:  # xAI: 1 tick = 1e-10 USD (https://docs.x.ai/docs/api-reference)
        ticks = _int(counts["cost_in_usd_ticks"])
        if ticks is not None:
            usage.provider_cost = ticks / 1e10


_ANTHROPIC_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _anthropic_counts(usage: Usage, raw: dict[str, int], counts: dict) -> None:
    # message_delta repeats the running totals: each field present replaces its last value.
    iterations = counts.get("iterations")
    if iterations.__class__ is list and iterations:
        # With compaction the top-level fields cover the final pass only: the compaction pass is in
        # `iterations` alone, and billed, so it is added. Other passes there (an advisor tool's,
        # run by another model) are left out: the top level already counts the request's model.
        # https://docs.anthropic.com/en/docs/build-with-claude/compaction
        counts = _with_compaction(counts, iterations)
    for name in _ANTHROPIC_FIELDS:
        value = _int(counts.get(name))
        if value is not None:
            raw[name] = value
    server_tools = counts.get("server_tool_use")
    if server_tools.__class__ is dict:  # cumulative in message_delta, like the token counts
        value = _int(server_tools.get("web_search_requests"))
        if value is not None:
            raw["web_search"] = value
    usage.web_search_requests = raw.get("web_search")
    split = counts.get("cache_creation")
    if isinstance(split, dict):
        for name, key in (("5m", "ephemeral_5m_input_tokens"), ("1h", "ephemeral_1h_input_tokens")):
            value = _int(split.get(key))
            if value is not None:
                raw[name] = value
    cache_read = raw.get("cache_read_input_tokens")
    cache_creation = raw.get("cache_creation_input_tokens")
    usage.cache_read_tokens = cache_read
    usage.cache_creation_tokens = cache_creation
    usage.cache_creation_5m_tokens = raw.get("5m")
    usage.cache_creation_1h_tokens = raw.get("1h")
    uncached = raw.get("input_tokens")
    if uncached is not None:
        # Anthropic's input_tokens leaves the cached ones out: count every input token once.
        usage.input_tokens = uncached + (cache_read or 0) + (cache_creation or 0)
    usage.output_tokens = raw.get("output_tokens")


def _with_compaction(counts: dict, iterations: list) -> dict:
    compactions = [it for it in iterations if it.__class__ is dict and it.get("type") == "compaction"]
    if not compactions:
        return counts
    return _sum_iterations([counts, *compactions])


def _sum_iterations(iterations: list) -> dict:
    summed: dict = {}
    split: dict = {}
    for iteration in iterations:
        for name in _ANTHROPIC_FIELDS:
            value = _int(iteration.get(name))
            if value is not None:
                summed[name] = summed.get(name, 0) + value
        creation = iteration.get("cache_creation")
        if creation.__class__ is dict:
            for key in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"):
                value = _int(creation.get(key))
                if value is not None:
                    split[key] = split.get(key, 0) + value
    if split:
        summed["cache_creation"] = split
    return summed
