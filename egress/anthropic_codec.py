"""OpenAI Chat Completions <-> Anthropic Messages (sans-IO): dicts and bytes in, dicts and bytes out.

Contract
  chat_to_messages(body, default_max_tokens=, drop_params=) -> (messages_body, dropped_names)
      An OpenAI chat request becomes an Anthropic Messages request body, without `model` (the
      caller sets the upstream model). A malformed request raises EgressError("invalid_request");
      a parameter Anthropic can't honour raises EgressError("unsupported_parameter") naming it,
      unless `drop_params`, when it is left out and its name returned. Either error's `param` is the
      field at fault as OpenAI spells it ("seed", "messages[0].content[1]"), when one field is.
      Nothing is dropped silently: every top-level field is mapped, consumed, neutral (accepted, its
      value changes nothing), left out with a Warning (`left_out`: leaving it out breaks nothing), or
      refused (`_NEUTRAL`, `_LEFT_OUT` and `_MAPPED` below are the whole policy); within a message, an
      image's `detail` Anthropic does not apply is said too (`image_detail`). `warnings` receives
      those, for the caller's Warning header; the Responses codec calls the same two functions.
  message_to_chat(message, model=, created=) -> an OpenAI `chat.completion` dict; a message whose fields
      are not of Anthropic's types raises EgressError("upstream_protocol_error") (`provider_answer`).
  StreamTranscoder(model=, created=, include_usage=): `feed(bytes) -> bytes` turns Anthropic SSE,
      cut anywhere, into OpenAI SSE chunks as soon as each event is whole; `finish()` at the end of
      the upstream body. One handler per upstream event type (`_EVENTS`); an unknown type is
      ignored, as Anthropic asks ("handle unknown event types gracefully",
      https://docs.anthropic.com/en/docs/build-with-claude/streaming#other-events).
  error_to_openai(status, body) -> OpenAI error JSON bytes for an Anthropic error body.

Thinking blocks (the convention of LiteLLM and the OpenAI-compatible peers that follow it:
litellm/llms/anthropic/chat/transformation.py, .../chat/handler.py, and
litellm/litellm_core_utils/prompt_templates/factory.py on the way back)
  Response  the assistant message carries `reasoning_content` (every thinking text, joined) and
            `thinking_blocks`, Anthropic's blocks in upstream order, verbatim:
              {"type": "thinking", "thinking": str, "signature": str}
              {"type": "redacted_thinking", "data": str}
  Stream    `delta.thinking_blocks` is a list of one entry per chunk, each with a dense `index`
            of its own (0, 1, ... per thinking or redacted block, whatever the content-block index):
              thinking_delta      {"index": i, "type": "thinking", "thinking": piece}
                                  (beside `reasoning_content`: piece, as before)
              signature_delta     {"index": i, "type": "thinking", "thinking": "", "signature": sig}
              redacted_thinking   {"index": i, "type": "redacted_thinking", "data": data}, at its start
            Concatenating the strings of entries with the same index (what the openai SDK's stream
            accumulator does with any indexed list, as it does for tool_calls) gives the blocks
            back, `index` included; LiteLLM's own combiner, which ignores the index (text appends
            to the open block, a signature closes it, a redacted block stands alone), gives the same.
            The index is what lets the openai SDK accumulate the list at all: it refuses list
            entries without one.
  Request   an assistant message's `thinking_blocks` open its Anthropic content, before its text
            and tool_use blocks, as given (an `index` from the stream dropped). Anthropic checks the
            signature, so nothing in them may change; a malformed entry is an invalid request
            naming the field.

Docs this follows
  Messages API        https://docs.anthropic.com/en/api/messages
  OpenAI chat         https://platform.openai.com/docs/api-reference/chat/create
                      https://platform.openai.com/docs/api-reference/chat-streaming
  Streaming events    https://docs.anthropic.com/en/docs/build-with-claude/streaming
  Stop reasons        https://docs.anthropic.com/en/api/handling-stop-reasons
  Tool use            https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use
  Extended thinking   https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking
  Structured outputs  https://docs.claude.com/en/docs/build-with-claude/structured-outputs
  Vision              https://docs.anthropic.com/en/docs/build-with-claude/vision
  Errors              https://docs.anthropic.com/en/api/errors

Usage goes through egress.usage.reduce_usage, the meter's own reducer (latest value wins, compaction
passes added), so what the client is told and what the meter records agree by construction.

Known limits: a client that keeps only `reasoning_content` (not `thinking_blocks`) can't carry a
tool loop with thinking on: Anthropic answers its next request with 400, and that error is passed
on; thinking blocks of two consecutive assistant messages, merged into one Anthropic turn, follow
the first message's tool_use blocks rather than opening the turn; server tools (web search, code
execution) run at Anthropic and their blocks are not shown to the client, only the text the model
writes about them; citations are dropped with their deltas.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import secrets
from collections.abc import Callable

import orjson

from egress.errors import EgressError
from egress.schemas import for_anthropic
from egress.usage import ANTHROPIC, Usage, reduce_usage

# -- request ---------------------------------------------------------------------------------

# reasoning_effort -> thinking.budget_tokens. Anthropic's floor is 1024 ("Must be >=1024 and less
# than max_tokens", extended-thinking docs); each step up roughly quadruples, as OpenAI's efforts
# are described (more reasoning tokens per step). "none" (gpt-5.1) asks for no reasoning at all.
THINKING_BUDGETS: dict[str, int | None] = {
    "none": None,
    "minimal": 1024,
    "low": 2048,
    "medium": 4096,
    "high": 16384,
    "xhigh": 32768,
}

# The forced tool that carries `response_format: json_object` (no schema to give structured outputs).
# Its input comes back as the message content, never as a tool call, so the name is reserved.
JSON_TOOL = "json_response"


def _number(value: object) -> bool:
    return value.__class__ in (int, float)


# Fields accepted only with a value that changes nothing; any other value is refused. Not sent.
#   store: OpenAI keeps the completion for its distillation and evals products; off, nothing is kept.
#   metadata, verbosity: see left_out; `{}` tags nothing, medium is the default.
#   prompt_cache_key: a routing hint for OpenAI's automatic cache; Anthropic's cache is keyed by
#     the `cache_control` marks, which pass through.
#   service_tier auto/default: the provider's ordinary capacity, which is what Anthropic gives.
_NEUTRAL: dict[str, Callable[[object], bool]] = {
    "n": lambda v: v.__class__ is int and v == 1,
    "presence_penalty": lambda v: _number(v) and v == 0,
    "frequency_penalty": lambda v: _number(v) and v == 0,
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v.__class__ is int and v == 0,
    "logit_bias": lambda v: v == {},
    "modalities": lambda v: v == ["text"],
    "store": lambda v: v is False,
    "metadata": lambda v: v == {},
    "verbosity": lambda v: v == "medium",
    "prompt_cache_key": lambda v: isinstance(v, str),
    "service_tier": lambda v: v in ("auto", "default"),
}


def left_out(name: str, value: object, warnings: list[str]) -> None:
    """A field whose other values ask for what Anthropic does not do, though leaving it out breaks
    nothing: accepted, not sent, and said in a Warning naming it (`name`: as the caller spelled it,
    `text.verbosity` on the Responses API). Its neutral value (`_NEUTRAL`) is accepted silently; a
    value of the wrong type is an invalid request. The one rule for both surfaces.
      verbosity: low, medium (the default) or high, how long an answer to write (openai-python
        types/chat/completion_create_params.py, types/responses/response_text_config_param.py);
        Claude has no such setting, and an answer of another length is still the answer.
      metadata: up to 16 tags kept with a stored completion for OpenAI's dashboard, allowed only with
        `store: true` (OpenAI refuses them otherwise: "The 'metadata' parameter is only allowed when
        'store' is enabled", tmc/langchaingo#1484), which chat refuses here. Anthropic's `metadata`
        takes only `user_id`, which comes from safety_identifier or user, as LiteLLM maps it
        (litellm/llms/anthropic/chat/transformation.py: `user` -> metadata.user_id; OpenAI's tags go
        nowhere)."""
    if value is None or _NEUTRAL[name.rpartition(".")[2]](value):
        return
    if name.endswith("verbosity"):
        if value not in ("low", "high"):
            raise _invalid(f"{name} must be low, medium or high", name)
        warnings.append(f"{name} has no Anthropic equivalent and was not applied")
    elif not isinstance(value, dict):
        raise _invalid(f"{name} must be an object of string tags", name)
    else:
        warnings.append(
            f"{name}: OpenAI's stored-completion tags have no Anthropic equivalent and were left out "
            "(an end user's id goes as safety_identifier)"
        )


_LEFT_OUT = frozenset(("verbosity", "metadata"))
# Read by the caller or by this module's steps, never sent as is.
_CONSUMED = frozenset({"model", "stream_options"})
# Translated below, one step each. `top_k` is Anthropic's own sampling field, sent as given.
_MAPPED = frozenset(("messages", "max_tokens", "max_completion_tokens", "stop", "temperature", "top_p", "top_k"))
_MAPPED |= {"user", "safety_identifier", "reasoning_effort", "response_format", "stream"}
_MAPPED |= {"tools", "tool_choice", "parallel_tool_calls", "web_search_options"}


def _invalid(message: str, param: str | None = None) -> EgressError:
    # `param`: the field at fault as OpenAI names it ("temperature", "messages[0].content[1]"), so
    # a client can point at it, as the Responses codec's refusals do.
    return EgressError("invalid_request", message, param=param)


class _Refusals:
    """Refuses a parameter, or with drop_params records it as dropped."""

    __slots__ = ("drop", "dropped")

    def __init__(self, drop: bool) -> None:
        self.drop = drop
        self.dropped: list[str] = []

    def __call__(self, name: str, why: str) -> None:
        if not self.drop:
            raise EgressError(
                "unsupported_parameter", f"'{name}' is not supported by Anthropic models: {why}", param=name
            )
        self.dropped.append(name)


def chat_to_messages(
    body: dict, *, default_max_tokens: int, drop_params: bool = False, warnings: list[str] | None = None
) -> tuple[dict, list[str]]:
    """`warnings`, when given, receives what was honoured only in part or left out (a structured-output
    schema's constraints Anthropic does not enforce, schemas.py; `verbosity`, `metadata` tags, an
    image's `detail`, prompt_cache_breakpoint past Anthropic's four marks or after a 5m one: _breakpoints),
    for the caller's Warning header."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    refuse = _Refusals(drop_params)
    if warnings is None:
        warnings = []
    for name, value in body.items():
        if value is None or name in _MAPPED or name in _CONSUMED:
            continue  # null means "not given" to OpenAI's API as well
        if name in _LEFT_OUT:
            left_out(name, value, warnings)
            continue
        neutral = _NEUTRAL.get(name)
        if neutral is None:
            refuse(name, "Anthropic's Messages API has no equivalent")
        elif not neutral(value):
            refuse(name, f"only the neutral value is accepted, got {orjson.dumps(value).decode()[:100]}")

    out: dict = {}
    system, messages = _messages(body.get("messages"), refuse, warnings)
    if system:
        out["system"] = system
    out["messages"] = messages

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens.__class__ is not int or max_tokens < 1:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise _invalid("max_completion_tokens / max_tokens must be a positive integer", param)

    budget = _thinking_budget(body.get("reasoning_effort"))
    if budget is not None:
        if max_tokens <= budget:
            # budget_tokens must be below max_tokens. OpenAI's limit counts reasoning too, but a
            # budget that ate the caller's whole allowance would leave no answer: thinking goes on top.
            max_tokens += budget
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    out["max_tokens"] = max_tokens

    _sampling(body, out, thinking=budget is not None, refuse=refuse)
    _stop(body.get("stop"), out, refuse)
    user = body.get("safety_identifier") or body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _invalid("user must be a string", "safety_identifier" if body.get("safety_identifier") else "user")
        if user:
            out["metadata"] = {"user_id": _user_id(user)}
    stream = body.get("stream")
    if stream is not None:
        if stream.__class__ is not bool:
            raise _invalid("stream must be a boolean", "stream")
        out["stream"] = stream
    _tools(body, out, thinking=budget is not None, refuse=refuse, warnings=warnings)
    _breakpoints(out.get("tools") or [], system, messages, warnings)
    return out, refuse.dropped


# An email address anywhere in the id (_has_email), or an id that is a phone number, as LiteLLM's
# _valid_user_id (litellm/llms/anthropic/chat/transformation.py) takes them; a phone here is written
# as one (a leading + or a separator), so a plain numeric account id goes as it is.
_PHONE = re.compile(r"\+[\d\s().-]{7,}|(?=.*[\s().-])[\d\s().-]{7,}")


def _user_id(user: str) -> str:
    """The caller's end-user id as Anthropic's metadata.user_id, "a uuid, hash value, or other opaque
    identifier ... Do not include any identifying information such as name, email address, or phone
    number" (https://docs.anthropic.com/en/api/messages, metadata.user_id). Anthropic refuses an
    email there (400 "metadata.user_id: user_id appears to contain an email address. Please send a
    uuid or hash value", BerriAI/litellm#10106), where OpenAI takes one in `user`. Such an id goes as
    a digest of itself, what OpenAI asks callers to send ("We recommend hashing their username or
    email address", openai-python safety_identifier): the same person is the same id, so per-user
    abuse detection still works, and nothing identifying leaves. LiteLLM drops it instead."""
    if not _has_email(user) and _PHONE.fullmatch(user.strip()) is None:
        return user
    return "user-" + hashlib.blake2b(user.encode(), digest_size=16).hexdigest()


def _has_email(text: str) -> bool:
    """Whether `text` holds `name@domain.tld` anywhere: what the regular expression
    `[^\\s@]+@[^\\s@]+\\.[^\\s@]+` finds, found in one pass. Searched with that expression, an id of
    40,000 characters with no email in it took 5 s of the worker's loop (each start position scanned
    to the end for an "@"), and a caller's `user` may be as long as the body."""
    for word in text.split():
        parts = word.split("@")
        for before, after in itertools.pairwise(parts):  # around each "@": a name, a domain with a dot inside
            if before and "." in after[1:-1]:
                return True
    return False


def _thinking_budget(effort: object) -> int | None:
    if effort is None:
        return None
    if effort.__class__ is not str or effort not in THINKING_BUDGETS:  # a list or object can't be looked up
        raise _invalid(f"reasoning_effort must be one of {', '.join(THINKING_BUDGETS)}", "reasoning_effort")
    return THINKING_BUDGETS[effort]


def _sampling(body: dict, out: dict, *, thinking: bool, refuse: _Refusals) -> None:
    # Thinking "isn't compatible with temperature or top_k modifications"; top_p may be set "to
    # values between 1 and 0.95" (extended-thinking docs, feature compatibility).
    temperature = body.get("temperature")
    if temperature is not None:
        if not _number(temperature) or temperature < 0:
            raise _invalid("temperature must be a non-negative number", "temperature")
        if temperature > 1:
            refuse("temperature", "Anthropic's temperature ranges from 0 to 1")
        elif thinking and temperature != 1:
            refuse("temperature", "it can't be changed with reasoning_effort (extended thinking)")
        elif not thinking:
            out["temperature"] = temperature
        # else 1 with thinking: Anthropic's default, so not sent rather than risk the refusal.
    top_p = body.get("top_p")
    if top_p is not None:
        if not _number(top_p) or not 0 <= top_p <= 1:
            raise _invalid("top_p must be a number between 0 and 1", "top_p")
        if thinking and top_p < 0.95:
            refuse("top_p", "with reasoning_effort (extended thinking) it must be between 0.95 and 1")
        else:
            out["top_p"] = top_p
    if "temperature" in out and "top_p" in out:
        # Anthropic: "You should either alter temperature or top_p, but not both"
        # (https://docs.anthropic.com/en/api/messages, top_p), and Claude Sonnet 4.5, Haiku 4.5, Opus 4.1
        # and later refuse the pair ("`temperature` and `top_p` cannot both be specified for this
        # model", BerriAI/litellm#15097). OpenAI's playground exports both (temperature=..., top_p=1).
        # top_p 1 keeps the whole distribution and temperature 1 is both APIs' default: either, beside
        # the other, changes nothing, so it is not sent. Two chosen values go as given.
        if out["top_p"] == 1:
            del out["top_p"]
        elif out["temperature"] == 1:
            del out["temperature"]
    top_k = body.get("top_k")
    if top_k is not None:
        if top_k.__class__ is not int or top_k < 1:
            raise _invalid("top_k must be a positive integer", "top_k")
        if thinking:
            refuse("top_k", "it can't be changed with reasoning_effort (extended thinking)")
        else:
            out["top_k"] = top_k


def _stop(stop: object, out: dict, refuse: _Refusals) -> None:
    if stop is None:
        return
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop must be a string or a list of strings", "stop")
    # Anthropic answers 400 to a stop sequence that is empty ("each stop sequence must be non-empty")
    # or only whitespace ("stop_sequences: each stop sequence must contain non-whitespace", quoted in
    # BerriAI/litellm#3286), while OpenAI honours "\n" (a common one-line stop). Such an entry can't
    # be honoured: it is refused, or with drop_params left out and "stop" listed.
    sequences = [s for s in stop if s.strip()]
    if len(sequences) < len(stop):
        refuse("stop", "Anthropic refuses whitespace-only stop sequences")
    if sequences:
        out["stop_sequences"] = sequences


# -- tools, tool_choice, response_format -------------------------------------------------------


def _tools(body: dict, out: dict, *, thinking: bool, refuse: _Refusals, warnings: list[str]) -> None:
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise _invalid("tools must be a list", "tools")
    tools = []
    for position, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict):
            raise _invalid(f"tools[{position}] must be an object", f"tools[{position}]")
        if tool.get("type") != "function":
            refuse(f"tools[{position}]", f"only function tools translate, not {tool.get('type')!r}")
            continue
        tools.append(_tool(tool, position, warnings))

    raw_choice = body.get("tool_choice")
    if isinstance(raw_choice, dict) and raw_choice.get("type") == "allowed_tools":
        tools, raw_choice = _allowed_tools(raw_choice.get("allowed_tools"), tools)
    search = body.get("web_search_options")
    if search is not None:
        tools.append(web_search_tool(search, refuse))
    choice = _tool_choice(raw_choice, tools)
    if choice is not None and choice["type"] in ("any", "tool") and thinking:
        # "Tool use with thinking only supports tool_choice auto or none" (extended-thinking docs).
        refuse("tool_choice", "a forced tool can't be combined with reasoning_effort (extended thinking)")
        choice = None

    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise _invalid("response_format must be an object", "response_format")
    kind = response_format.get("type") if response_format is not None else None
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        spec = response_format["json_schema"]
        schema = spec.get("schema")
        if schema is not None:
            if not isinstance(schema, dict):
                raise _invalid(
                    "response_format.json_schema.schema must be an object", "response_format.json_schema.schema"
                )
            description = spec.get("description")
            if isinstance(description, str) and description.strip() and "description" not in schema:
                # "A description of what the response format is for, used by the model to determine
                # how to respond in the format" (openai-python shared_params/response_format_json_schema.py):
                # output_config.format has the schema alone, whose own description the model reads.
                schema = {**schema, "description": description}
            # Structured outputs: output_config.format constrains the text itself (GA; the beta's
            # top-level `output_format` is deprecated). Works with thinking, unlike a forced tool.
            schema = _structured(schema, "response_format.json_schema.schema", warnings)
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        else:
            kind = "json_object"  # a schema-less json_schema asks for any JSON object
    elif kind == "json_schema":
        raise _invalid("response_format json_schema needs a json_schema object", "response_format.json_schema")
    if kind == "json_object":
        if thinking:
            refuse("response_format", "JSON mode forces a tool, which extended thinking does not allow")
        else:
            # No schema for structured outputs: force a tool whose input is the answer (the
            # documented JSON-mode recipe, tool-use docs "JSON mode").
            description = "Reply with the answer as a JSON object."
            tools.append({"name": JSON_TOOL, "description": description, "input_schema": {"type": "object"}})
            if choice is None or choice["type"] == "auto":
                choice = {"type": "tool", "name": JSON_TOOL} if len(tools) == 1 else {"type": "any"}
            elif choice["type"] == "none":
                choice = {"type": "tool", "name": JSON_TOOL}
    elif kind not in (None, "text", "json_schema"):
        raise _invalid(f"unknown response_format type {kind!r}", "response_format.type")

    parallel = body.get("parallel_tool_calls")
    if parallel is not None and parallel.__class__ is not bool:
        raise _invalid("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools:
        out["tools"] = tools
        if parallel is False:
            # Anthropic puts the switch inside tool_choice (tool-use docs, "Parallel tool use").
            choice = dict(choice) if choice is not None else {"type": "auto"}
            if choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
        if choice is not None:
            out["tool_choice"] = choice


# OpenAI's search_context_size as Anthropic's max_uses (searches a request may run), as LiteLLM
# maps it (litellm/llms/anthropic/chat/transformation.py, map_web_search_tool).
_SEARCH_USES = {"low": 1, "medium": 5, "high": 10}
_PLACE = ("city", "region", "country", "timezone")
WEB_SEARCH = "web_search"  # the server tool's name, in its server_tool_use blocks too


def web_search_tool(options: object, refuse: Callable[[str, str], None], at: str = "web_search_options") -> dict:
    """Chat Completions' `web_search_options` as Anthropic's web search server tool
    (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/web-search-tool): the search runs
    at Anthropic, billed per search (usage.server_tool_use.web_search_requests), and the text built
    on it carries citations, which the answer gives back as `url_citation` annotations. Also the
    Responses API's `web_search` tool, whose `filters.allowed_domains` rides along here; `at` names
    the field the options came from (`tools[2]` there), in every refusal."""
    if not isinstance(options, dict):
        raise _invalid(f"{at} must be an object", at)
    tool: dict = {"type": "web_search_20250305", "name": WEB_SEARCH}
    size = options.get("search_context_size")
    if size is not None:
        if size.__class__ is not str or size not in _SEARCH_USES:
            raise _invalid(f"{at}.search_context_size must be low, medium or high", f"{at}.search_context_size")
        tool["max_uses"] = _SEARCH_USES[size]
    location = options.get("user_location")
    if location is not None:
        approximate = location.get("approximate") if isinstance(location, dict) else None
        if not isinstance(approximate, dict):
            raise _invalid(f"{at}.user_location.approximate must be an object", f"{at}.user_location")
        place = {"type": "approximate"}
        for name in _PLACE:
            value = approximate.get(name)
            if value is not None:
                if not isinstance(value, str):
                    raise _invalid(f"{at}.user_location.approximate.{name} must be a string", f"{at}.user_location")
                place[name] = value
        tool["user_location"] = place
    filters = options.get("filters")
    if filters is not None:
        if not isinstance(filters, dict):
            raise _invalid(f"{at}.filters must be an object", f"{at}.filters")
        # null is no filter (openai-python types/responses/web_search_tool.py: Optional allowed_domains).
        domains = filters.get("allowed_domains")
        if domains is not None:
            if not isinstance(domains, list) or not all(isinstance(domain, str) and domain for domain in domains):
                raise _invalid(f"{at}.filters.allowed_domains must be a list of domains", f"{at}.filters")
            if domains:
                tool["allowed_domains"] = domains
        for name in filters:
            if name != "allowed_domains":
                refuse(f"{at}.filters.{name}", "Anthropic's web search has no equivalent")
    for name in options:
        if name not in ("search_context_size", "user_location", "filters"):
            refuse(f"{at}.{name}", "Anthropic's web search has no equivalent")
    return tool


def _chat_citations(block: dict, start: int, end: int) -> list[dict]:
    """A text block's web citations as a chat answer's `annotations`, spanning its text in the
    content (start..end): how OpenAI's search models cite, in `message.annotations` and, streamed,
    in the `delta` of the finish chunk."""
    return [
        {"type": "url_citation", "url_citation": {"start_index": start, "end_index": end, "url": url, "title": title}}
        for url, title in web_citations(block)
    ]


def web_citations(block: dict) -> list[tuple[str, str]]:
    """The (url, title) of each web search result a text block cites (`web_search_result_location`).
    Citations that are no list (a provider's garbage) cite nothing, on every path that reads them."""
    found = []
    citations = block.get("citations")
    if citations.__class__ is not list:
        return found
    for citation in citations:
        if isinstance(citation, dict) and citation.get("type") == "web_search_result_location":
            url = citation.get("url")
            if isinstance(url, str):
                title = citation.get("title")
                found.append((url, title if isinstance(title, str) else ""))
    return found


def _structured(schema: dict, at: str, warnings: list[str]) -> dict:
    """A schema for Anthropic's constrained decoding (structured outputs, strict tools): what it
    refuses (`minimum`, `maxLength`, …) written into descriptions instead, as Anthropic's own SDKs
    do, and said in a Warning; refused, every pydantic model with a bound was a 400 on Claude."""
    schema, moved = for_anthropic(schema)
    if moved:
        named = ", ".join(moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
        warnings.append(f"{at}: {named} not enforced by Anthropic's structured outputs; written into descriptions")
    return schema


def _tool(tool: dict, position: int, warnings: list[str]) -> dict:
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise _invalid(f"tools[{position}].function.name is required", f"tools[{position}].function.name")
    name = function["name"]
    if name == JSON_TOOL:
        raise _invalid(
            f"the tool name {JSON_TOOL!r} is reserved by egress for JSON mode", f"tools[{position}].function.name"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}  # OpenAI: omitted means no parameters
    elif not isinstance(parameters, dict):
        raise _invalid(
            f"tools[{position}].function.parameters must be an object", f"tools[{position}].function.parameters"
        )
    elif "type" not in parameters:
        # `{}` or properties without a type (MCP tools with no arguments, hand-written schemas):
        # OpenAI takes it as an object's schema, Anthropic refuses an input_schema without
        # `type: object` ("input_schema.type: Field required").
        parameters = {"type": "object", **parameters}
    translated: dict = {"name": name}
    description = function.get("description")
    if description:
        translated["description"] = description
    if function.get("strict") is True:
        # Strict tool use compiles input_schema as structured outputs do, with their limits.
        parameters = _structured(parameters, f"tools[{position}].function.parameters", warnings)
    translated["input_schema"] = parameters
    if function.get("strict") is True:
        translated["strict"] = True  # strict tool use, structured-outputs docs
    cache_control = tool.get("cache_control") or function.get("cache_control")
    if cache_control is not None:
        translated["cache_control"] = cache_control
    return translated


def _allowed_tools(allowed: object, tools: list) -> tuple[list, str]:
    """OpenAI's `tool_choice: {type: allowed_tools, allowed_tools: {mode, tools}}` (openai-python
    types/chat/chat_completion_allowed_tools_param.py): the model may call only those tools, `mode`
    auto or required. Anthropic has no such choice: the other tools are left out of the request,
    and the mode is its tool_choice."""
    at = "tool_choice.allowed_tools"
    if not isinstance(allowed, dict) or allowed.get("mode") not in ("auto", "required"):
        raise _invalid(f"{at} needs a mode of auto or required", f"{at}.mode")
    listed = allowed.get("tools")
    if not isinstance(listed, list) or not listed:
        raise _invalid(f"{at}.tools must be a non-empty list", f"{at}.tools")
    names = set()
    for index, entry in enumerate(listed):
        function = entry.get("function") if isinstance(entry, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not any(tool["name"] == name for tool in tools):
            raise _invalid(f"{at}.tools[{index}] must name a function of `tools`", f"{at}.tools[{index}]")
        names.add(name)
    return [tool for tool in tools if tool["name"] in names], allowed["mode"]


def _tool_choice(choice: object, tools: list) -> dict | None:
    if choice is None:
        return None
    if choice == "auto":
        translated = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        translated = {"type": "none"}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _invalid("tool_choice must be auto, required, none or {type: function, function: {name}}", "tool_choice")
    if not tools and translated["type"] in ("any", "tool"):
        raise _invalid("tool_choice requires tools", "tool_choice")
    return translated if tools else None


# -- messages ------------------------------------------------------------------------------------


def _messages(messages: object, refuse: _Refusals, warnings: list[str]) -> tuple[list, list]:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list", "messages")
    system: list = []
    turns: list[list] = []  # [role, blocks], consecutive same roles merged (Anthropic alternates)
    blank = ""  # the first user or assistant message left out for having no content
    unanswered = ""  # the first user message left out since the last message kept
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{position}] must be an object", f"messages[{position}]")
        role = message.get("role")
        where = f"messages[{position}]"
        if message.get("name") is not None and role in ("system", "developer", "user", "assistant"):
            # OpenAI's `name` tells the model which participant of a role spoke (ChatCompletion*MessageParam
            # in openai/types/chat); Anthropic's messages carry no participant names, and folding the name
            # into the text would change what was said. Left out, the model would lose who said what.
            refuse(f"{where}.name", "Anthropic's messages have no participant names")
        if role in ("system", "developer"):
            # Anthropic has one system prompt: every system and developer message, in order.
            blocks = _text_blocks(message.get("content"), where)
            role = None
        elif role == "user":
            blocks = _user_blocks(message.get("content"), where, warnings)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where, refuse)
        elif role == "tool":
            blocks = [_tool_result(message, where, warnings)]
            role = "user"  # tool results travel in a user turn, first in it (tool-use docs)
        else:
            raise _invalid(f"{where}.role must be system, developer, user, assistant or tool", f"{where}.role")
        cache_control = message.get("cache_control")
        if cache_control is not None and blocks:
            # A message-level mark means "cache up to the end of this message": its last block.
            blocks[-1] = {**blocks[-1], "cache_control": cache_control}
        if role is None:
            system.extend(blocks)
        elif not blocks:
            blank = blank or where  # the first: named if nothing else is left
            if message.get("role") == "user":
                unanswered = unanswered or where
            continue  # an empty message (Anthropic refuses empty content) must not break a merge
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
            unanswered = ""
        else:
            turns.append([role, blocks])
            unanswered = ""
    if unanswered and turns and turns[-1][0] == "assistant":
        # Left out, the caller's last turn would be gone and the assistant's message before it last:
        # Anthropic continues a last assistant message as a prefill ("Prefill Claude's response",
        # messages docs), so the request would quietly ask for something else than an answer to it.
        raise _invalid(
            "the last user message is empty or whitespace alone, which Anthropic refuses (blank text); left "
            "out, the assistant's message before it would be continued instead of answered",
            f"{unanswered}.content",
        )
    if not turns:
        if blank:
            # Said as what it is: "must include a user message" of a request that has one read as a bug.
            raise _invalid(
                "every user and assistant message is empty or whitespace alone, which is left out (Anthropic "
                "refuses blank text): there is nothing to answer",
                f"{blank}.content",
            )
        raise _invalid("messages must include a user or assistant message", "messages")
    return system, [{"role": role, "content": blocks} for role, blocks in turns]


def _text_part(part: dict, where: str) -> dict | None:
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{where}.text must be a string", f"{where}.text")
    if not text.strip():
        # Anthropic refuses an empty text block, and one of whitespace alone ("text content blocks must
        # contain non-whitespace text", anthropics/claude-code#23440), which Claude itself writes before a
        # tool call ("\n\n") and a client sends back as the assistant's content: it carries nothing.
        return None
    return _marked(part, {"type": "text", "text": text}, where)


# OpenAI's explicit prompt-cache mark on a content part (`prompt_cache_breakpoint: {mode: explicit,
# ttl?: 30m | 12h}`, openai-python types/chat/chat_completion_content_part_text_param.py and the
# Responses input parts): "the exact end of a reusable prompt prefix", what Anthropic's cache_control
# mark is. Its ttl is a minimum lifetime, 30m unless given (PromptCacheOptions); Anthropic keeps a
# cache 5m or 1h (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching, "1-hour cache
# duration"), so 1h, the shortest that lasts as long (its writes cost 2x the input price, 5m's 1.25x).
# Each is one of these two objects until _breakpoints() copies it: that is how it is told apart from
# a cache_control the caller gave, which goes as given.
_BREAKPOINT = {"type": "ephemeral", "ttl": "1h"}
_BREAKPOINT_12H = {"type": "ephemeral", "ttl": "1h"}  # asked for 12h, longer than Anthropic keeps one
# "A maximum of 4 blocks with cache_control may be provided. Found 5." (Anthropic's 400, quoted in
# tghamm/Anthropic.SDK#50); OpenAI writes the latest four of a request's breakpoints and reads up to
# 80 of a conversation's (PromptCacheOptions), so a history can carry more.
_MAX_MARKS = 4


def _marked(part: dict, block: dict, where: str) -> dict:
    """`block` with the cache mark `part` carries: its cache_control as given, else its
    prompt_cache_breakpoint as one (see _BREAKPOINT); a malformed breakpoint is a 400 naming it."""
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
        return block
    mark = part.get("prompt_cache_breakpoint")
    if mark is None:
        return block
    at = f"{where}.prompt_cache_breakpoint"
    if not isinstance(mark, dict) or mark.get("mode") != "explicit" or mark.get("ttl") not in (None, "30m", "12h"):
        raise _invalid(f"{at} must be {{mode: explicit, ttl?: 30m or 12h}}", at)
    block["cache_control"] = _BREAKPOINT_12H if mark.get("ttl") == "12h" else _BREAKPOINT
    return block


def _breakpoints(tools: list, system: list, messages: list, warnings: list[str]) -> None:
    """Every cache mark of the request, as Anthropic takes them. Anthropic reads them in prompt order,
    `tools`, `system`, then `messages` ("Cache prefixes are created in the following order: tools,
    system, then messages", prompt-caching docs), and refuses two things of them: more than four in
    all (_MAX_MARKS), and a 1h mark after a 5m one ("Cache entries with longer TTL must appear before
    shorter TTLs", prompt-caching docs, "Mixing different TTLs"; 400 "a ttl='1h' cache_control block
    must not come after a ttl='5m' cache_control block", kristianvast/hermes-claude-auth#31).
    The caller's own cache_control marks go as given, and so they take their places first: marks that
    break a rule by themselves are a 400 naming cache_control, as Anthropic would refuse them. The
    marks made from prompt_cache_breakpoint fill what is left, the latest kept, as OpenAI writes
    them; one after a 5m mark of the caller's is marked for 5m, the longest Anthropic takes there.
    Each kept one its own copy."""
    blocks = [*tools, *system]
    for message in messages:
        for block in message["content"]:
            inner = block.get("content") if block.get("type") == "tool_result" else None
            blocks += inner if isinstance(inner, list) else ()  # inside the result, so before its own mark
            blocks.append(block)
    marked = [block for block in blocks if block.get("cache_control") is not None]
    found = [block for block in marked if _is_breakpoint(block)]
    given = len(marked) - len(found)
    if given > _MAX_MARKS:
        raise _invalid(
            f"cache_control: {given} blocks carry one (tools, messages and content parts), Anthropic takes "
            f"{_MAX_MARKS} at most",
            "cache_control",
        )
    room = _MAX_MARKS - given
    if len(found) > room:
        for block in found[: len(found) - room]:
            del block["cache_control"]
        besides = f" besides {given} cache_control marks" if given else ""
        warnings.append(
            f"prompt_cache_breakpoint: {len(found)} given{besides}, Anthropic takes {_MAX_MARKS} cache marks at "
            + (f"most; the latest {room} were kept" if room else "most; none was kept")
        )
    shorter = False  # a 5m mark of the caller's came already
    shortened = twelve = 0
    for block in marked:
        control = block.get("cache_control")
        if control is None:  # a breakpoint left out above
            continue
        if not _is_breakpoint(block):
            if _ttl(control) == "1h" and shorter:
                raise _invalid(
                    "cache_control: a ttl of 1h comes after a cache_control of 5m; Anthropic takes a longer ttl "
                    "only before a shorter one, in the order tools, system, messages",
                    "cache_control",
                )
            shorter = shorter or _ttl(control) != "1h"
        elif shorter:
            block["cache_control"] = {"type": "ephemeral", "ttl": "5m"}
            shortened += 1
        else:
            twelve += control is _BREAKPOINT_12H
            block["cache_control"] = dict(control)
    if twelve:
        warnings.append("prompt_cache_breakpoint: a ttl of 12h is longer than Anthropic keeps a cache; marked for 1h")
    if shortened:
        warnings.append(
            f"prompt_cache_breakpoint: {shortened} after a cache_control of 5m marked for 5m, not 1h: Anthropic "
            "takes a longer ttl only before a shorter one"
        )


def _is_breakpoint(block: dict) -> bool:
    control = block.get("cache_control")
    return control is _BREAKPOINT or control is _BREAKPOINT_12H


def _ttl(control: object) -> object:
    """A cache_control's ttl, 5m unless given ("ttl": "5m" | "1h", prompt-caching docs); a mark that is
    not an object, which Anthropic refuses wherever it is, is no 1h one."""
    return control.get("ttl", "5m") if isinstance(control, dict) else control


def _text_blocks(content: object, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []  # as _text_part, for a string
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string or a list of parts", f"{where}.content")
    blocks = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
            raise _invalid(f"{where}.content[{index}] must be a text part", f"{where}.content[{index}]")
        if part["type"] == "refusal":  # an assistant's earlier refusal, shown as what it said
            part = {**part, "text": part.get("refusal")}
        block = _text_part(part, f"{where}.content[{index}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _user_blocks(content: object, where: str, warnings: list[str]) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []  # as _text_part, for a string
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string or a list of parts", f"{where}.content")
    blocks = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            block = _text_part(part, at)
        elif kind == "image_url":
            block = _image(part, at, warnings)
        elif kind == "file":
            block = _file(part, at)
        else:
            raise EgressError(
                "unsupported_parameter", f"{at}: content part type {kind!r} has no Anthropic equivalent", param=at
            )
        if block is not None:
            blocks.append(block)
    return blocks


def _data_uri(url: str, at: str) -> tuple[str, str]:
    header, comma, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding.lower() != "base64" or not media_type:
        raise _invalid(f"{at}: a data URL must be data:<media type>;base64,<data>", at)
    return media_type.lower(), data


def image_detail(detail: object, at: str, warnings: list[str]) -> None:
    """OpenAI's image `detail` (auto, low, high, original: openai-python types/chat/
    chat_completion_content_part_image_param.py, types/responses/image_detail.py), one rule for
    both surfaces (`at`: the field as the caller named it). Anthropic has no such choice: it scales
    an image itself, to at most 1568 px on its long edge (vision docs, "Evaluate image size"),
    about what OpenAI's high gives (2048 px square, then 768 px on the short side), so auto and high
    are what Anthropic does. low (512 px, a fixed small cost) and original (no scaling at all) are
    not: the image goes all the same, and a Warning says so."""
    if detail is None or detail in ("auto", "high"):
        return
    if detail not in ("low", "original"):
        raise _invalid(f"{at} must be auto, low, high or original", at)
    warnings.append(f"{at}: {detail!r} has no Anthropic equivalent; the image went at Anthropic's own scale")


def _image(part: dict, at: str, warnings: list[str]) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _invalid(f"{at}.image_url.url must be a string", f"{at}.image_url.url")
    if url.startswith("data:"):
        media_type, data = _data_uri(url, at)
        # "image/jpg" (file-extension and browser code's name for a JPEG) is not a registered type and
        # Anthropic takes only image/jpeg, image/png, image/gif and image/webp (vision docs; 400
        # "media_type: Input should be 'image/jpeg', ..."): the same image, by its registered name.
        if media_type == "image/jpg":
            media_type = "image/jpeg"
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}  # Anthropic fetches it; egress never downloads
    else:
        raise _invalid(f"{at}.image_url.url must be an http(s) or data: URL", f"{at}.image_url.url")
    if isinstance(image, dict):
        image_detail(image.get("detail"), f"{at}.image_url.detail", warnings)
    return _marked(part, {"type": "image", "source": source}, at)


def _file(part: dict, at: str) -> dict:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise EgressError(
            "unsupported_parameter",
            f"{at}: only inline file_data (a data: URL) translates, not file_id",
            param=f"{at}.file",
        )
    media_type, payload = _data_uri(data, at)
    block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": payload}}
    name = file.get("filename")
    if name is not None:
        # "The name of the file, used when passing the file to the model" (openai-python types/chat/
        # chat_completion_content_part_param.py, FileFile.filename): Anthropic's document `title`, which
        # the model is given too (citations docs, "Document parameters").
        if not isinstance(name, str):
            raise _invalid(f"{at}.file.filename must be a string", f"{at}.file.filename")
        if name.strip():
            block["title"] = name
    return _marked(part, block, at)


# The fields of each thinking block (Messages API, ThinkingBlockParam / RedactedThinkingBlockParam);
# `index` is the stream's position of the block (see the module docstring), not sent.
_THINKING_FIELDS = {"thinking": ("thinking", "signature"), "redacted_thinking": ("data",)}


def _thinking_blocks(entries: object, where: str) -> list:
    """An assistant message's `thinking_blocks`, as the Anthropic blocks they were.

    With thinking on, the assistant turn that carries tool_use must start with its thinking and
    redacted_thinking blocks, unmodified, when its tool results follow ("Preserving thinking
    blocks", https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking#preserving-thinking-blocks);
    the signature is checked against the text, so both travel exactly as they came.
    """
    if not isinstance(entries, list):
        raise _invalid(f"{where}.thinking_blocks must be a list", f"{where}.thinking_blocks")
    blocks = []
    for position, entry in enumerate(entries):
        at = f"{where}.thinking_blocks[{position}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        fields = _THINKING_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            raise _invalid(f"{at}.type must be thinking or redacted_thinking", f"{at}.type")
        for name, value in entry.items():
            if name not in fields and name not in ("type", "index") and value is not None:
                raise _invalid(f"{at}.{name} is not a field of a {kind} block", f"{at}.{name}")
        block = {"type": kind}
        for name in fields:
            value = entry.get(name)
            # The thinking text may be empty (display "omitted"); a signature or data never is.
            if not isinstance(value, str) or (not value and name != "thinking"):
                raise _invalid(f"{at}.{name} must be the string Anthropic returned", f"{at}.{name}")
            block[name] = value
        blocks.append(block)
    return blocks


def _assistant_blocks(message: dict, where: str, refuse: _Refusals) -> list:
    thinking = message.get("thinking_blocks")
    blocks = [] if thinking is None else _thinking_blocks(thinking, where)
    content = message.get("content")
    if content is not None:
        blocks += _text_blocks(content, where)
    refusal = message.get("refusal")
    if refusal is not None:
        # The assistant's earlier refusal (ChatCompletionAssistantMessageParam.refusal) is what it
        # said that turn: kept as its text, as a refusal content part is, so the history stays whole.
        if not isinstance(refusal, str):
            raise _invalid(f"{where}.refusal must be a string", f"{where}.refusal")
        if refusal:
            blocks.append({"type": "text", "text": refusal})
    if message.get("function_call") is not None:
        # The deprecated single call, paired with `functions`, which is refused as well.
        refuse(f"{where}.function_call", "the legacy function_call has no Anthropic equivalent; use tool_calls")
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        tool_calls = []
    elif not isinstance(tool_calls, list):
        raise _invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    for index, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        tool_id = call.get("id") if isinstance(function, dict) else None
        if not isinstance(tool_id, str) or not tool_id or not function.get("name"):
            raise _invalid(f"{at} needs an id and a function name", at)
        arguments = function.get("arguments") or "{}"
        try:
            parsed = orjson.loads(arguments)
        except (orjson.JSONDecodeError, TypeError):
            raise _invalid(f"{at}.function.arguments is not valid JSON", f"{at}.function.arguments") from None
        if not isinstance(parsed, dict):
            raise _invalid(f"{at}.function.arguments must be a JSON object", f"{at}.function.arguments")
        blocks.append({"type": "tool_use", "id": _tool_id(tool_id), "name": function["name"], "input": parsed})
    return blocks


_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _tool_id(tool_id: str) -> str:
    """A tool call id as Anthropic takes it: `^[a-zA-Z0-9_-]+$` ("String should match pattern", the
    400 for anything else). Ids from other providers and clients break it (Kimi's
    "functions.get_weather:0", MCP-style "server/tool"), and a history carries them back on every
    turn. An id that fits goes as it is; one that does not gets its other characters replaced and a
    digest of the whole id appended, the same for its tool_use and its tool_result and on every turn,
    and distinct for ids that differ only in the replaced characters (LiteLLM's
    _sanitize_anthropic_tool_use_id replaces alone, so "a.b" and "a:b" become one id)."""
    if _ID_CHARACTERS.issuperset(tool_id):
        return tool_id
    kept = "".join(character if character in _ID_CHARACTERS else "_" for character in tool_id)
    return f"{kept}_{hashlib.blake2b(tool_id.encode(), digest_size=6).hexdigest()}"


def _tool_result(message: dict, where: str, warnings: list[str]) -> dict:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise _invalid(f"{where}.tool_call_id is required", f"{where}.tool_call_id")
    content = message.get("content")
    block: dict = {"type": "tool_result", "tool_use_id": _tool_id(tool_call_id)}
    if isinstance(content, str):
        # Empty or whitespace alone ("\r\n" from a shell): Anthropic reads a string as one text block
        # and refuses a blank one ("text content blocks must contain non-whitespace text", for a
        # tool_result's string too: NousResearch/hermes-agent#97641), and the tool loop broke at the
        # next turn. It carries nothing, as a blank text part, which _text_part leaves out: no content.
        if content.strip():
            block["content"] = content
    elif content is not None:
        # Text, and images and documents: a tool_result's content takes all three
        # (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use, tool results).
        blocks = _user_blocks(content, where, warnings)
        if blocks:
            block["content"] = blocks
    return block


# -- response ------------------------------------------------------------------------------------

# stop_reason -> finish_reason (stop-reasons docs). pause_turn: a server tool loop paused and the
# caller may resume by sending the turn back; the turn produced what it produced, so "stop" (its
# raw value stays in native_finish_reason). An unknown reason is "stop" too, its raw value kept.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def _finish_reason(stop_reason: object, tool_calls: bool) -> str:
    reason = FINISH_REASONS.get(stop_reason, "stop") if stop_reason is not None else "stop"
    if reason == "tool_calls" and not tool_calls:
        return "stop"  # the only tool was JSON mode's: its input is the answer
    if reason == "stop" and tool_calls:
        return "tool_calls"  # a pending tool call is never hidden behind a plain stop
    return reason


def _chat_usage(usage: Usage, thinking_tokens: int | None) -> dict:
    prompt = usage.input_tokens or 0  # uncached + cache read + cache creation, as OpenAI counts
    completion = usage.output_tokens or 0
    chat = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # cache_write_tokens: the name the openai SDK's PromptTokensDetails gives cache writes.
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_tokens or 0,
            "cache_write_tokens": usage.cache_creation_tokens or 0,
        },
    }
    if thinking_tokens is not None:
        chat["completion_tokens_details"] = {"reasoning_tokens": thinking_tokens}
    return chat


def _thinking_tokens(counts: object) -> int | None:
    details = counts.get("output_tokens_details") if isinstance(counts, dict) else None
    value = details.get("thinking_tokens") if isinstance(details, dict) else None
    return value if value.__class__ is int else None


# What reading a field of another type than the one Anthropic documents raises (a list where a string
# goes, an object as a block index): an Anthropic-compatible server's answer, never Anthropic's. Raised
# out of a protocol callback, it left the exchange unended and the caller waiting for its own timeout.
_MALFORMED = (TypeError, AttributeError, KeyError, ValueError)


def provider_answer(translate: Callable) -> Callable:
    """A whole answer's translation (message_to_chat, responses_codec.message_to_response) that fails
    as the provider's broken answer, upstream_protocol_error (502, or a cut once the head went out, as
    a body cut short), never with a TypeError."""

    @functools.wraps(translate)
    def total(*args, **kwargs):
        try:
            return translate(*args, **kwargs)
        except _MALFORMED:
            raise EgressError(
                "upstream_protocol_error", "the provider's answer is not a message egress can read"
            ) from None

    return total


@provider_answer
def message_to_chat(message: dict, *, model: str, created: int) -> dict:
    text: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[dict] = []
    tool_calls = []
    annotations = []
    length = 0  # of the text so far: where a cited block starts
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            piece = block.get("text")
            if piece.__class__ is not str:
                piece = ""  # a provider's garbage (a number, a list): no content, as the stream has it
            if block.get("citations"):  # a web search's answer: most text blocks have none
                annotations += _chat_citations(block, length, length + len(piece))
            length += len(piece)
            text.append(piece)
        elif kind == "thinking":
            thought = block.get("thinking")
            reasoning.append(thought if thought.__class__ is str else "")  # as a text of the wrong type
            signed = {"type": kind, "thinking": block.get("thinking"), "signature": block.get("signature")}
            thinking_blocks.append(signed)  # verbatim: the signature is checked when it comes back
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": kind, "data": block.get("data")})
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            if block.get("name") == JSON_TOOL:
                text.append(arguments)
                length += len(arguments)
            else:
                function = {"name": block.get("name"), "arguments": arguments}
                tool_calls.append({"id": block.get("id"), "type": "function", "function": function})
        # server_tool_use and server tool results: nothing a chat client has a place for; the
        # text built on a web search cites it (annotations).
    reply: dict = {"role": "assistant", "content": "".join(text) if text else None}
    if annotations:
        reply["annotations"] = annotations
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if thinking_blocks:
        reply["thinking_blocks"] = thinking_blocks
    usage = Usage()
    reduce_usage(usage, {}, message, ANTHROPIC)
    stop_reason = message.get("stop_reason")
    return {
        "id": "chatcmpl-" + message_id(message),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": _finish_reason(stop_reason, bool(tool_calls)),
                "native_finish_reason": stop_reason,
                "logprobs": None,
            }
        ],
        "usage": _chat_usage(usage, _thinking_tokens(message.get("usage"))),
    }


# -- errors --------------------------------------------------------------------------------------

# Anthropic error type -> OpenAI error type (https://docs.anthropic.com/en/api/errors,
# https://platform.openai.com/docs/guides/error-codes). The Anthropic type rides along as `code`.
ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "billing_error": "insufficient_quota",
    "rate_limit_error": "rate_limit_error",
    "api_error": "server_error",
    "overloaded_error": "server_error",
    "timeout_error": "server_error",
}


def _type_for_status(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


# How Anthropic words a request that does not fit the model's context window (400
# invalid_request_error): "prompt is too long: 208656 tokens > 200000 maximum", and "input length and
# `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease input length or `max_tokens`
# and try again" (both quoted from the API in anthropics/claude-code#12186 and docker/docker-agent#569).
# OpenAI says the same with code "context_length_exceeded" and param "messages", the code clients
# look for to trim or compact their history and retry (LiteLLM maps both to ContextWindowExceededError).
_CONTEXT_EXCEEDED = ("prompt is too long", "input length and `max_tokens` exceed context limit")


def message_id(message: dict) -> str:
    """The upstream message's id, which every id egress shows for it is made from (chat's
    `chatcmpl-…`, the Responses ids through responses_codec.mint_id). A message without one (an
    Anthropic-compatible server may leave it out) gets a fresh one: never one shared by every such
    response, and by their items."""
    found = message.get("id")
    return found if isinstance(found, str) and found else "gen_" + secrets.token_hex(16)


def _openai_error(error: dict, status: int) -> dict:
    kind = error.get("type")
    message = error.get("message")
    if kind == "invalid_request_error" and isinstance(message, str) and message.startswith(_CONTEXT_EXCEEDED):
        return {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    return {
        "message": message if isinstance(message, str) else "upstream error",
        "type": ERROR_TYPES.get(kind, _type_for_status(status)) if isinstance(kind, str) else _type_for_status(status),
        "param": None,
        "code": kind if isinstance(kind, str) else None,
    }


def error_to_openai(status: int, body: bytes) -> bytes:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return orjson.dumps({"error": _openai_error(document["error"], status)})
    raw = bytes(body[:500]).decode("utf-8", "replace")
    error = {"message": f"upstream error {status}: {raw}", "type": _type_for_status(status), "param": None}
    error["code"] = None
    return orjson.dumps({"error": error})


# -- stream --------------------------------------------------------------------------------------

# What a content block index stands for, once its content_block_start was seen.
_TEXT, _THINKING, _REDACTED, _TOOL, _JSON, _IGNORED = range(6)
_BLOCK_KINDS = {"text": _TEXT, "thinking": _THINKING, "redacted_thinking": _REDACTED, "tool_use": _TOOL}
_DONE = b"data: [DONE]\n\n"
_ROLE = orjson.dumps({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})


class AnthropicEvents:
    """Anthropic SSE, cut anywhere, read event by event: each whole event's JSON goes to the handler
    its type names in the subclass's `HANDLERS` (an unknown type is ignored, as Anthropic asks);
    a payload that is not JSON, or an event whose fields are not of Anthropic's types, goes to
    `_on_error`. `feed(bytes) -> bytes` returns what the
    handlers wrote for the events completed by those bytes; `finish()` ends a last event without
    its blank line; nothing is read once `ended`."""

    __slots__ = ("_buffer", "_data", "_scanned", "ended")
    HANDLERS: dict = {}

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already searched for a newline
        self._data: list[bytes] = []  # data: lines of the event being read
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        if self.ended:
            return b""  # anything after the end (trailing bytes, a second stream) is not ours
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        start = 0
        while not self.ended:
            newline = buffer.find(b"\n", max(start, self._scanned))
            if newline == -1:
                break
            self._line(bytes(buffer[start:newline]), out)
            start = newline + 1
        if self.ended:
            buffer.clear()
            self._scanned = 0
        else:
            del buffer[:start]
            self._scanned = len(buffer)  # an unfinished line is not searched again
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not self.ended:
            if self._buffer:  # a last line without its newline
                line = bytes(self._buffer)
                self._buffer.clear()
                if line.strip(b"\r"):
                    self._line(line, out)
            if not self.ended and self._data:  # and an event without its blank line
                payload = b"\n".join(self._data)
                self._data.clear()
                try:
                    event = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    # Cut inside its last event (a close at a byte boundary): not an event, and not
                    # an error the provider sent. `ended` stays False: the caller sees a cut.
                    return b"".join(out)
                self._dispatch(event, out)
        return b"".join(out)

    # -- SSE framing (https://html.spec.whatwg.org/multipage/server-sent-events.html) ------------
    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if self._data:
                payload = b"\n".join(self._data)
                self._data.clear()
                self._event(payload, out)
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        # event:, id:, retry: and comments: the event's type is in its JSON, so nothing to keep.

    def _event(self, payload: bytes, out: list[bytes]) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            event = None
        self._dispatch(event, out)

    def _dispatch(self, event: object, out: list[bytes]) -> None:
        if not isinstance(event, dict):
            error = {"type": "api_error", "message": "egress could not parse an event from the upstream stream"}
            self._on_error({"error": error}, out)
            return
        handler = self.HANDLERS.get(event.get("type"))
        if handler is not None:
            try:
                handler(self, event, out)
            except _MALFORMED:
                # Its fields are not of the types Anthropic documents (an object as a block index, a
                # list as a stop reason): an error the client reads, as for a payload that is not JSON.
                # Try/except costs nothing until it raises (zero-cost exceptions, Python 3.11).
                error = {"type": "api_error", "message": "egress could not read an event from the upstream stream"}
                self._on_error({"error": error}, out)

    def _on_error(self, event: dict, out: list[bytes]) -> None:
        raise NotImplementedError


class StreamTranscoder(AnthropicEvents):
    """Anthropic Messages SSE -> OpenAI chat.completion.chunk SSE, one event at a time.

    State is what the mapping needs: the content-block index -> (kind, tool-call or thinking-block
    index) map, the next tool-call and thinking-block indexes (each counted on its own, densely,
    whatever the block index), the tool blocks whose input has not come yet (their arguments are
    "{}" at their stop), the usage so far, and whether the finish chunk went out. Each chunk
    is written as soon as its event is whole, so the client sees tokens as Anthropic sends them.
    """

    __slots__ = (
        "_annotations",
        "_blocks",
        "_cited",
        "_created",
        "_finished",
        "_head",
        "_include_usage",
        "_length",
        "_model",
        "_no_input",
        "_raw_usage",
        "_thinking_blocks",
        "_thinking_tokens",
        "_tool_calls",
        "_usage",
    )

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        super().__init__()
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._blocks: dict[int, tuple[int, int]] = {}
        self._no_input: dict[object, tuple[int, int]] = {}  # tool blocks whose input has not come yet
        self._tool_calls = 0
        self._thinking_blocks = 0
        self._usage = Usage()
        self._raw_usage: dict[str, int] = {}
        self._thinking_tokens: int | None = None
        self._finished = False
        self._head = self._chunk_head("chatcmpl-")
        # Web citations: the content's length so far, each cited text block's start and citations
        # (by block index) till its stop, and the annotations they make, sent with the finish chunk.
        self._length = 0
        self._cited: dict[object, tuple[int, dict]] = {}
        self._annotations: list[dict] = []

    def _chunk_head(self, chunk_id: str) -> bytes:
        return b"".join(
            (
                b'data: {"id":',
                orjson.dumps(chunk_id),
                b',"object":"chat.completion.chunk","created":',
                str(self._created).encode(),
                b',"model":',
                orjson.dumps(self._model),
                b',"choices":[',
            )
        )

    # -- one handler per Anthropic event type ---------------------------------------------------
    def _emit(self, delta: dict, out: list[bytes]) -> None:
        choice = orjson.dumps({"index": 0, "delta": delta, "finish_reason": None})
        out.append(b"".join((self._head, choice, b"]}\n\n")))

    def _on_message_start(self, event: dict, out: list[bytes]) -> None:
        message = event.get("message")
        if isinstance(message, dict):
            self._head = self._chunk_head("chatcmpl-" + message_id(message))
            self._count_thinking(message.get("usage"))
        reduce_usage(self._usage, self._raw_usage, event, ANTHROPIC)
        out.append(b"".join((self._head, _ROLE, b"]}\n\n")))

    def _on_block_start(self, event: dict, out: list[bytes]) -> None:
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict):
            return
        kind = _BLOCK_KINDS.get(block.get("type"), _IGNORED)
        if kind == _TOOL and block.get("name") == JSON_TOOL:
            kind = _JSON
        tool_index = -1
        if kind == _TOOL:
            tool_index = self._tool_calls
            self._tool_calls += 1
        self._blocks[index] = (kind, tool_index)
        if kind in (_TOOL, _JSON) and not block.get("input"):
            self._no_input[index] = (kind, tool_index)
        if kind == _TOOL:
            # Input normally arrives as input_json_delta; one already whole here is sent at once.
            arguments = orjson.dumps(block["input"]).decode() if block.get("input") else ""
            function = {"name": block.get("name"), "arguments": arguments}
            call = {"index": tool_index, "id": block.get("id"), "type": "function", "function": function}
            self._emit({"tool_calls": [call]}, out)
        elif kind == _TEXT:
            citations = block.get("citations")
            if citations is not None:  # citations on: a web search's answer
                cited = list(citations) if citations.__class__ is list else []  # anything else: none to read
                self._cited[index] = (self._length, {"citations": cited})
            if block.get("text"):
                self._content(block["text"], out)
        elif kind == _THINKING and (block.get("thinking") or block.get("signature")):
            # Anthropic starts a thinking block empty ("thinking": "", "signature": ""); a block
            # that comes whole is sent whole, in one chunk.
            entry = {"type": "thinking", "thinking": block.get("thinking") or ""}
            if block.get("signature"):
                entry["signature"] = block["signature"]
            reasoning = {"reasoning_content": block["thinking"]} if block.get("thinking") else {}
            self._emit_thinking(index, reasoning, entry, out)
        elif kind == _REDACTED:
            # Encrypted reasoning comes whole in its start event, no deltas (extended-thinking docs,
            # "Thinking redaction"): the client has it to hand back, and nothing to show.
            self._emit_thinking(index, {}, {"type": "redacted_thinking", "data": block.get("data")}, out)
        elif kind == _JSON and block.get("input"):
            self._content(orjson.dumps(block["input"]).decode(), out)

    def _content(self, text: object, out: list[bytes]) -> None:
        if text.__class__ is not str:  # a provider's garbage (a number, a list): no content, no length
            return
        self._length += len(text)
        self._emit({"content": text}, out)

    def _emit_thinking(self, block_index: object, delta: dict, entry: dict, out: list[bytes]) -> None:
        # The thinking-block index is taken with the block's first chunk, not at its start: a block
        # that sent nothing must not leave a hole, where the openai SDK's accumulator (which inserts
        # an unseen index at that position of its list) would put the next block's entries astray.
        kind, position = self._blocks[block_index]
        if position < 0:
            position = self._thinking_blocks
            self._thinking_blocks += 1
            self._blocks[block_index] = (kind, position)
        delta["thinking_blocks"] = [{"index": position, **entry}]
        self._emit(delta, out)

    def _on_block_delta(self, event: dict, out: list[bytes]) -> None:
        kind, tool_index = self._blocks.get(event.get("index"), (_IGNORED, -1))
        delta = event.get("delta")
        if kind == _IGNORED or not isinstance(delta, dict):
            return
        delta_type = delta.get("type")
        if delta_type == "text_delta" and kind == _TEXT:
            text = delta.get("text")
            if text and text.__class__ is str:  # _content, written out: the event a stream is made of
                self._length += len(text)
                self._emit({"content": text}, out)
        elif delta_type == "thinking_delta" and kind == _THINKING:
            if delta.get("thinking"):
                entry = {"type": "thinking", "thinking": delta["thinking"]}
                self._emit_thinking(event.get("index"), {"reasoning_content": delta["thinking"]}, entry, out)
        elif delta_type == "signature_delta" and kind == _THINKING:
            # The last delta of a thinking block (streaming docs, "Thinking delta"). "thinking": ""
            # gives a block whose text never came (display "omitted") its field all the same.
            if delta.get("signature"):
                entry = {"type": "thinking", "thinking": "", "signature": delta["signature"]}
                self._emit_thinking(event.get("index"), {}, entry, out)
        elif delta_type == "input_json_delta" and delta.get("partial_json"):
            self._no_input.pop(event.get("index"), None)
            if kind == _TOOL:
                call = {"index": tool_index, "function": {"arguments": delta["partial_json"]}}
                self._emit({"tool_calls": [call]}, out)
            elif kind == _JSON:
                self._content(delta["partial_json"], out)
        elif delta_type == "citations_delta" and kind == _TEXT:
            cited = self._cited.get(event.get("index"))
            if cited is None:
                cited = self._cited[event.get("index")] = (self._length, {"citations": []})
            cited[1]["citations"].append(delta.get("citation"))

    def _on_block_stop(self, event: dict, out: list[bytes]) -> None:
        index = event.get("index")
        entry = self._no_input.pop(index, None)
        if entry is not None:
            self._empty_input(*entry, out)
        cited = self._cited.pop(index, None)
        if cited is not None:
            self._annotations += _chat_citations(cited[1], cited[0], self._length)

    def _empty_input(self, kind: int, tool_index: int, out: list[bytes]) -> None:
        # A tool without parameters: Anthropic starts it with input {} and sends one input_json_delta
        # of "" (streaming docs, "Input JSON delta"); its arguments are "{}", as message_to_chat and
        # OpenAI give them, never "" (which is not JSON).
        if kind == _TOOL:
            self._emit({"tool_calls": [{"index": tool_index, "function": {"arguments": "{}"}}]}, out)
        else:
            self._content("{}", out)

    def _on_message_delta(self, event: dict, out: list[bytes]) -> None:
        reduce_usage(self._usage, self._raw_usage, event, ANTHROPIC)  # cumulative: latest wins
        self._count_thinking(event.get("usage"))
        delta = event.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if stop_reason is not None and not self._finished:
            self._finish_chunk(stop_reason, out)

    def _count_thinking(self, counts: object) -> None:
        thinking = _thinking_tokens(counts)
        if thinking is not None:
            self._thinking_tokens = thinking

    def _finish_chunk(self, stop_reason: str | None, out: list[bytes]) -> None:
        for entry in self._no_input.values():  # blocks never stopped: their input is whole by now
            self._empty_input(*entry, out)
        self._no_input.clear()
        for start, block in self._cited.values():  # cited blocks never stopped: cited to here
            self._annotations += _chat_citations(block, start, self._length)
        self._cited.clear()
        self._finished = True
        choice = {
            "index": 0,
            # As OpenAI's search models stream them: the annotations in the finish chunk's delta.
            "delta": {"annotations": self._annotations} if self._annotations else {},
            "finish_reason": _finish_reason(stop_reason, self._tool_calls > 0),
            "native_finish_reason": stop_reason,
        }
        out.append(b"".join((self._head, orjson.dumps(choice), b"]}\n\n")))

    def _on_message_stop(self, event: dict, out: list[bytes]) -> None:
        if not self._finished:
            self._finish_chunk(None, out)  # a stream that never said why it stopped: a plain stop
        if self._include_usage:
            usage = orjson.dumps(_chat_usage(self._usage, self._thinking_tokens))
            out.append(b"".join((self._head, b'],"usage":', usage, b"}\n\n")))
        out.append(_DONE)
        self.ended = True

    def _on_error(self, event: dict, out: list[bytes]) -> None:
        error = event.get("error")
        # A mid-stream error arrives under a 200: the OpenAI SDK raises on a chunk with "error".
        out.append(b"data: " + orjson.dumps({"error": _openai_error(error if isinstance(error, dict) else {}, 500)}))
        out.append(b"\n\n" + _DONE)
        self.ended = True


# ping is dropped by not being here, as every event type this table does not name.
StreamTranscoder.HANDLERS = {
    "message_start": StreamTranscoder._on_message_start,
    "content_block_start": StreamTranscoder._on_block_start,
    "content_block_delta": StreamTranscoder._on_block_delta,
    "content_block_stop": StreamTranscoder._on_block_stop,
    "message_delta": StreamTranscoder._on_message_delta,
    "message_stop": StreamTranscoder._on_message_stop,
    "error": StreamTranscoder._on_error,
}
