"""OpenAI Responses API <-> Anthropic Messages, stateless (sans-IO): dicts and bytes in and out.

Contract
  responses_to_chat(body, dropped=None) -> (chat_body, warnings)
      A Responses request becomes the Chat Completions request that means the same, which
      anthropic_codec.chat_to_messages then translates: one mapping of messages, images, tools,
      tool_choice, sampling, JSON schema and thinking blocks for both surfaces. Stateless by
      contract (as OpenRouter's Responses API): a `previous_response_id`, a `conversation` or an
      `item_reference` input is a 400 naming the param, since egress keeps no history; the client
      sends the whole history each time (Codex does). `store` of either value is processed
      statelessly and answered `store: false`. An unknown tool or input item type is a 400 naming
      it, never a silent rewrite; a malformed field it maps is a 400 under its Responses name
      (`max_output_tokens`, `reasoning.effort`, `input[3].arguments`, `tools[0].name`), never
      under a chat field the caller did not send. `warnings` name what was left out and why (a reasoning item
      egress did not mint, `text.verbosity`, an image's `detail`: the last two by chat's own rules,
      anthropic_codec.left_out and image_detail): they go back in a `Warning` header. Given a `dropped`
      list (the route's drop_params), a parameter or tool Anthropic can't honour is left out and its
      name appended, as chat_to_messages does; `responses_param` gives that codec's names (in its
      refusals and dropped names) their Responses spelling.
  response_shell(body, model, created) -> the response object's request echo (id and output unset).
  message_to_response(message, shell) -> the Responses `response` object for an Anthropic message (one
      whose fields are not of Anthropic's types: EgressError("upstream_protocol_error"), as on chat).
  ResponsesTranscoder(shell): `feed(bytes) -> bytes` turns Anthropic SSE, cut anywhere, into the
      Responses event stream as each event is whole; `finish()` at the end of the upstream body;
      `ended` once the terminal event went out.

Ids are minted once, from the upstream message id and the block index (`mint_id`), by both the
JSON and the stream path, so they agree across `response.created`, every `output_item.*` and
`response.completed`, across workers, and on a replayed history; their prefixes are OpenAI's own
(`resp_`, `msg_`, `fc_`, `rs_`), which OpenAI checks when such items are sent to it (LiteLLM PR
#37946). A function call's `call_id` is Anthropic's `toolu_…` id, so a tool result finds its call.

Reasoning: a thinking block becomes a `reasoning` item whose summary is the thinking text and whose
`encrypted_content` is egress's envelope of the exact block (`_ENVELOPE` + base64url of its JSON:
thinking and signature, or a redacted block's data). Sent back, the envelope becomes that block
again, signature intact, so a tool loop with thinking works; a reasoning item without one (another
provider's) is dropped with a warning. The envelope is not a secret: Anthropic's signature is what
makes a block trustworthy, and Anthropic checks it.

Docs: https://platform.openai.com/docs/api-reference/responses/create,
https://platform.openai.com/docs/api-reference/responses-streaming, and the openai-python SDK's
types (openai/types/responses/: response_create_params.py, response_stream_event.py, response.py).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable

import orjson

from egress.anthropic_codec import (
    JSON_TOOL,
    THINKING_BUDGETS,
    WEB_SEARCH,
    AnthropicEvents,
    _openai_error,
    _thinking_tokens,
    image_detail,
    left_out,
    message_id,
    provider_answer,
    web_citations,
    web_search_tool,
)
from egress.errors import EgressError
from egress.usage import ANTHROPIC, Usage, reduce_usage

_ENVELOPE = "egress.v1."


def mint_id(prefix: str, upstream_id: str, index: int = -1) -> str:
    """The one id minter: the same upstream message and block give the same id everywhere."""
    digest = hashlib.blake2b(f"{prefix}:{upstream_id}:{index}".encode(), digest_size=24).hexdigest()
    return f"{prefix}_{digest}"


def _invalid(message: str, param: str | None = None) -> EgressError:
    return EgressError("invalid_request", message, param=param)


def _unsupported(message: str, param: str) -> EgressError:
    return EgressError("unsupported_parameter", message, param=param)


class _Refusals:
    """Refuses what Anthropic can't honour, naming `param`; given a `dropped` list (a route's
    drop_params, as anthropic_codec's own), leaves it out instead and appends its name (`name`, or
    `param`), which the surface lists in x-egress-dropped-params with the chat codec's."""

    __slots__ = ("dropped",)

    def __init__(self, dropped: list[str] | None) -> None:
        self.dropped = dropped

    def __call__(self, message: str, param: str, name: str | None = None) -> None:
        if self.dropped is None:
            raise _unsupported(message, param)
        self.dropped.append(name or param)


# -- request -------------------------------------------------------------------------------------

# Accepted, and change nothing on a stateless translation to Anthropic.
_NEUTRAL: dict[str, Callable[[object], bool]] = {
    "store": lambda v: isinstance(v, bool),  # processed statelessly either way; answered store: false
    # reasoning.encrypted_content is always included; the other values (response_includable.py) add
    # results of OpenAI's own tools (refused with the tools) or echo inputs: nothing to add here.
    # Logprobs are refused, as on every surface: Anthropic returns none.
    "include": lambda v: isinstance(v, list) and "message.output_text.logprobs" not in v,
    "metadata": lambda v: isinstance(v, dict),
    "prompt_cache_key": lambda v: isinstance(v, str),
    "service_tier": lambda v: v in ("auto", "default"),
    "truncation": lambda v: v == "disabled",
    "background": lambda v: v is False,
    "top_logprobs": lambda v: v.__class__ is int and v == 0,
    "stream_options": lambda v: isinstance(v, dict),
    # Codex's session and installation ids for OpenAI's own telemetry; they change no answer.
    "client_metadata": lambda v: isinstance(v, dict),
}
# Stateful features: egress keeps no responses, so there is nothing for these to point at.
_STATEFUL = ("previous_response_id", "conversation", "prompt")
_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "stream")
_MAPPED = frozenset(
    ("model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "text", "reasoning")
)


def responses_to_chat(body: dict, *, dropped: list[str] | None = None) -> tuple[dict, list[str]]:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    refuse = _Refusals(dropped)
    warnings: list[str] = []
    for name in _STATEFUL:
        if body.get(name) is not None:
            raise _invalid(
                f"'{name}' is not supported: egress keeps no responses; send the whole conversation in 'input'",
                name,
            )
    for name, value in body.items():
        if value is None or name in _MAPPED or name in _PASSED or name in _STATEFUL:
            continue
        neutral = _NEUTRAL.get(name)
        if neutral is None:
            refuse(f"'{name}' is not supported by Anthropic models", name)
        elif not neutral(value):
            refuse(f"'{name}' is not supported with the value {orjson.dumps(value).decode()[:100]}", name)
    chat: dict = {name: body[name] for name in _PASSED if body.get(name) is not None}
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("instructions must be a string", "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    messages += _input(body.get("input"), warnings)
    chat["messages"] = messages
    # What is mapped is checked here, under its Responses name: the chat translation's message would
    # name its own fields (max_completion_tokens, reasoning_effort, messages[2]...), which the caller
    # never sent.
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if max_output.__class__ is not int or max_output < 1:
            raise _invalid("max_output_tokens must be a positive integer", "max_output_tokens")
        chat["max_completion_tokens"] = max_output
    _tools(body, chat, refuse, warnings)
    _text(body.get("text"), chat, warnings)
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _invalid("reasoning must be an object", "reasoning")
        effort = reasoning.get("effort")
        if effort is not None:
            if effort.__class__ is not str or effort not in THINKING_BUDGETS:  # a list is no dict key
                raise _invalid(f"reasoning.effort must be one of {', '.join(THINKING_BUDGETS)}", "reasoning.effort")
            chat["reasoning_effort"] = effort
        # `summary` (auto, concise, detailed): the summary is the thinking text Anthropic streams.
    return chat, warnings


def _input(items: object, warnings: list[str]) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _invalid("input must be a string or a non-empty list of items", "input")
    messages: list[dict] = []
    assistant: dict | None = None  # the assistant turn being gathered: reasoning, text, calls
    # Results of that turn's calls came already (function_call_output). A later call still joins
    # the turn: an agent appends each result right after its call, and parallel calls sent back as
    # [call A, output A, call B, output B] are one Anthropic turn, its thinking first (a call moved
    # to a turn of its own would start with no thinking, which Anthropic refuses). Reasoning or
    # text after results opens the next turn.
    answered = False
    # Items left out, by kind: one Warning each kind, however many (see _left_out).
    foreign: list[str] = []  # reasoning items egress did not mint
    searches: list[str] = []  # web_search_call items

    def turn() -> dict:
        nonlocal assistant, answered
        if assistant is None:
            assistant = {"role": "assistant", "content": None}
            answered = False
            messages.append(assistant)
        return assistant

    for position, item in enumerate(items):
        at = f"input[{position}]"
        if not isinstance(item, dict):
            raise _invalid(f"{at} must be an object", at)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "assistant":
                text = _assistant_text(item.get("content"), at)
                if answered:
                    assistant = None  # after the results: the model's next turn
                current = turn()
                if text:
                    if current.get("tool_calls"):
                        # Text after a call in the same turn: Anthropic keeps blocks in order only
                        # within one message, so a new assistant message keeps it after the call.
                        assistant = None
                        current = turn()
                    # Each message item its own text part: joined into one string, two paragraphs
                    # would run together ("First.Second.").
                    parts = current["content"] or []
                    parts.append({"type": "text", "text": text})
                    current["content"] = parts
                continue
            assistant = None
            if role in ("system", "developer"):
                messages.append(_marked(item, {"role": role, "content": _text_parts(item.get("content"), at)}))
            elif role == "user":
                content = _user_parts(item.get("content"), at, warnings)
                messages.append(_marked(item, {"role": "user", "content": content}))
            else:
                raise _invalid(f"{at}.role must be user, assistant, system or developer", f"{at}.role")
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise _invalid(f"{at} needs a call_id and a name", at)
            if not isinstance(arguments, str):
                raise _invalid(f"{at}.arguments must be a string of JSON", f"{at}.arguments")
            if arguments:  # "" is a call without arguments
                try:
                    parsed = orjson.loads(arguments)
                except orjson.JSONDecodeError:
                    parsed = None
                if not isinstance(parsed, dict):
                    raise _invalid(f"{at}.arguments must be a JSON object", f"{at}.arguments")
            space = item.get("namespace")
            if isinstance(space, str) and space:
                name = f"{space}{_SEPARATOR}{name}"
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            turn().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            answered = assistant is not None
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _invalid(f"{at}.call_id is required", f"{at}.call_id")
            result = {"role": "tool", "tool_call_id": call_id, "content": _output(item.get("output"), at, warnings)}
            messages.append(_marked(item, result))
        elif kind == "reasoning":
            blocks = _opened(item.get("encrypted_content"), at)
            if blocks is None:
                foreign.append(at)
                continue
            current = turn()
            if current.get("tool_calls") or current["content"] or answered:
                assistant = None  # thinking opens a turn (a new Anthropic message keeps the order)
                current = turn()
            current.setdefault("thinking_blocks", []).extend(blocks)
        elif kind == "web_search_call":
            # A search run earlier in the conversation: its results (Anthropic's encrypted content)
            # are not in the item, so it can't be sent back; the answer built on it still is.
            searches.append(at)
        elif kind == "item_reference":
            raise _invalid(f"{at}: item_reference is not supported: egress keeps no items; send the item itself", at)
        else:
            raise _unsupported(f"{at}: input items of type {kind!r} have no Anthropic equivalent", f"{at}.type")
    if foreign:
        many = "reasoning items egress did not mint were dropped"
        warnings.append(_left_out(foreign, "a reasoning item egress did not mint was dropped", many))
    if searches:
        one = "a web_search_call can't be sent back to Anthropic and was left out"
        many = "web_search_call items can't be sent back to Anthropic and were left out"
        warnings.append(_left_out(searches, one, many))
    return messages


def _left_out(positions: list[str], one: str, many: str) -> str:
    """One Warning for every item of a kind left out: a Codex session sends its whole history each
    turn, and a header per item (a search on each turn) outgrows what clients take: hyper, under
    Codex's reqwest, refuses a response of over 100 headers, undici over 16 KiB of them."""
    if len(positions) == 1:
        return f"{positions[0]}: {one}"
    named = ", ".join(positions[:3]) + (f" and {len(positions) - 3} more" if len(positions) > 3 else "")
    return f"{named}: {len(positions)} {many}"


def _content(content: object, at: str, convert: Callable[[object, str], object]) -> str | list:
    """A string as it is, or each part of a list converted (`convert(part, where)`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"{at} must be a string or a list of parts", at)
    return [convert(part, f"{at}[{index}]") for index, part in enumerate(content)]


def _kind(part: object) -> object:
    return part.get("type") if isinstance(part, dict) else None


def _text_part(part: object, where: str) -> dict:
    if _kind(part) not in ("input_text", "output_text", "text"):
        raise _unsupported(f"{where} must be a text part, not {_kind(part)!r}", where)
    return _part(part, {"type": "text", "text": _string(part, "text", where)})


def _part(given: dict, translated: dict) -> dict:
    """A content part with its cache marks: `cache_control`, and OpenAI's own `prompt_cache_breakpoint`,
    which the chat translation makes a cache_control by its one rule (anthropic_codec._marked)."""
    if given.get("prompt_cache_breakpoint") is not None:
        translated["prompt_cache_breakpoint"] = given["prompt_cache_breakpoint"]
    return _marked(given, translated)


def _marked(given: dict, translated: dict) -> dict:
    """`translated` with the `cache_control` mark `given` carries (Anthropic's prompt caching, which the
    chat translation keeps on a part or a message): copied, never dropped, as on a function tool."""
    if given.get("cache_control") is not None:
        translated["cache_control"] = given["cache_control"]
    return translated


def _string(part: dict, field: str, where: str) -> str:
    value = part.get(field)
    if not isinstance(value, str):
        raise _invalid(f"{where}.{field} must be a string", f"{where}.{field}")
    return value


def _text_parts(content: object, at: str) -> str | list:
    return _content(content, f"{at}.content", _text_part)


def _assistant_piece(part: object, where: str) -> str:
    kind = _kind(part)
    if kind in ("output_text", "input_text", "text"):
        return _string(part, "text", where)
    if kind == "refusal":
        return _string(part, "refusal", where)
    raise _unsupported(f"{where} of type {kind!r} has no Anthropic equivalent", where)


def _assistant_text(content: object, at: str) -> str:
    pieces = _content(content, f"{at}.content", _assistant_piece)
    return pieces if isinstance(pieces, str) else "".join(pieces)


def _user_part(part: object, where: str, warnings: list[str]) -> dict:
    kind = _kind(part)
    if kind in ("input_text", "text"):
        return _part(part, {"type": "text", "text": _string(part, "text", where)})
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _unsupported(f"{where}: only image_url images translate, not file_id", where)
        image_detail(part.get("detail"), f"{where}.detail", warnings)  # chat's rule, under the name sent
        return _part(part, {"type": "image_url", "image_url": {"url": url}})
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str):
            raise _unsupported(f"{where}: only inline file_data translates, not file_id or file_url", where)
        if not data.startswith("data:"):
            data = "data:application/pdf;base64," + data  # the SDKs send bare base64 of a PDF
        return _part(part, {"type": "file", "file": {"file_data": data, "filename": part.get("filename")}})
    raise _unsupported(f"{where}: content of type {kind!r} has no Anthropic equivalent", where)


def _user_parts(content: object, at: str, warnings: list[str]) -> str | list:
    return _content(content, f"{at}.content", lambda part, where: _user_part(part, where, warnings))


def _output_part(part: object, where: str, warnings: list[str]) -> dict:
    """A function_call_output's part: text, or an image or file the tool returned (Codex's view_image,
    an MCP tool's image), which Anthropic takes in a tool_result's content."""
    if _kind(part) in ("input_image", "input_file"):
        return _user_part(part, where, warnings)
    return _text_part(part, where)


def _output(output: object, at: str, warnings: list[str]) -> str | list:
    return _content(output, f"{at}.output", lambda part, where: _output_part(part, where, warnings))


# The Responses API's web search tool, by each name it has had (openai-python types/responses/
# web_search_tool.py, web_search_preview_tool.py): Anthropic's web search server tool, through chat's
# web_search_options (anthropic_codec.web_search_tool).
_WEB_SEARCH_TOOLS = frozenset(
    ("web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11")
)


def _web_search_options(tool: dict, at: str, refuse: _Refusals) -> dict:
    """A Responses web search tool as chat's web_search_options, checked here under the names the
    caller sent (`tools[2].user_location.city`), never under chat's, which it did not send."""
    options: dict = {}
    for name, value in tool.items():
        if name in ("type", "external_web_access") or value is None:
            continue
        if name == "search_context_size":
            options[name] = value
        elif name == "filters":
            if isinstance(value, dict):
                for key in value:
                    if key != "allowed_domains":
                        refuse(f"{at}.filters.{key} has no Anthropic equivalent", f"{at}.filters.{key}")
                value = {"allowed_domains": value.get("allowed_domains")}
            options[name] = value
        elif name == "user_location":
            if not isinstance(value, dict):
                raise _invalid(f"{at}.user_location must be an object", f"{at}.user_location")
            # The Responses tool's location is flat; chat's nests it under `approximate`.
            place = {}
            for key in ("city", "region", "country", "timezone"):
                if value.get(key) is not None:
                    if not isinstance(value[key], str):
                        where = f"{at}.user_location.{key}"
                        raise _invalid(f"{where} must be a string", where)
                    place[key] = value[key]
            options[name] = {"type": "approximate", "approximate": place}
        else:
            refuse(f"{at}.{name} has no Anthropic equivalent", f"{at}.{name}")
    # Checked as chat_to_messages will, each malformed field named as the caller sent it.
    web_search_tool(options, lambda name, why: refuse(f"{name}: {why}", name), at)
    return options


def _tools(body: dict, chat: dict, refuse: _Refusals, warnings: list[str]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("tools must be a list", "tools")
        translated = []
        for position, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "namespace" and isinstance(tool.get("tools"), list):
                # A group of function tools (Codex sends its sub-agent tools so): each becomes a tool
                # named namespace__name, its calls answered with their namespace again.
                space = tool.get("name")
                if not isinstance(space, str) or not space:
                    raise _invalid(f"tools[{position}].name is required", f"tools[{position}].name")
                for inner, member in enumerate(tool["tools"]):
                    at = f"tools[{position}].tools[{inner}]"
                    if _kind(member) != "function":
                        refuse(f"{at}: only function tools translate, not {_kind(member)!r}", f"{at}.type", at)
                        continue
                    translated.append(_function_tool(member, at, f"{space}{_SEPARATOR}"))
                continue
            if kind == "web_search" and tool.get("external_web_access") is False:
                # Codex's default (`web_search = "cached"`): a search of OpenAI's own index, with no
                # live access to the web. Anthropic has no such search, and its live one would do
                # what the caller turned off: left out, and said in a Warning. Refused, it made every
                # Codex pointed at a Claude model fail until its config changed.
                warnings.append(
                    f"tools[{position}]: a web_search without external web access (a cached search) has no "
                    "Anthropic equivalent and was left out"
                )
                continue
            if kind in _WEB_SEARCH_TOOLS:
                if "web_search_options" in chat:
                    raise _invalid(f"tools[{position}]: one web_search tool at most", f"tools[{position}]")
                chat["web_search_options"] = _web_search_options(tool, f"tools[{position}]", refuse)
                continue
            if kind != "function":
                # web_search, file_search, computer_use, mcp, custom, …: run by OpenAI itself.
                at = f"tools[{position}]"
                refuse(
                    f"{at}: {kind!r} tools are not supported by Anthropic models; only function tools", f"{at}.type", at
                )
                continue
            translated.append(_function_tool(tool, f"tools[{position}]"))
        if translated:
            chat["tools"] = translated
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice in ("auto", "required", "none"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        # The Responses shape (types/responses/tool_choice_allowed_param.py) to the chat one.
        listed = choice.get("tools")
        functions = [
            {"type": "function", "function": {"name": tool.get("name")}} if isinstance(tool, dict) else tool
            for tool in (listed if isinstance(listed, list) else ())
        ]
        chat["tool_choice"] = {
            "type": "allowed_tools",
            "allowed_tools": {"mode": choice.get("mode"), "tools": functions},
        }
    else:
        refuse("tool_choice must be auto, required, none or {type: function, name}", "tool_choice")


def _function_tool(tool: dict, at: str, prefix: str = "") -> dict:
    """A Responses function tool (`prefix`: a namespace's, for its members) as a chat tool."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{at}.name is required", f"{at}.name")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _invalid(f"{at}.parameters must be an object", f"{at}.parameters")
    function = {key: tool[key] for key in ("description", "parameters", "strict") if key in tool}
    function["name"] = prefix + name
    entry = {"type": "function", "function": function}
    if tool.get("cache_control") is not None:
        entry["cache_control"] = tool["cache_control"]
    return entry


# Between a namespace and a tool's name in the Anthropic tool name (^[a-zA-Z0-9_-]{1,128}$).
_SEPARATOR = "__"


# A chat field's name in the Responses request it came from (responses_to_chat, read backwards).
_FROM_CHAT = {
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
    # Positions move (instructions become a message, items merge into turns, namespace members are
    # flattened), so a path under these names the whole field rather than a wrong element.
    "messages": "input",
    "tools": "tools",
}


def responses_param(param: str) -> str:
    """The Responses name of a field anthropic_codec names in a refusal or a dropped name."""
    head = param.partition(".")[0].partition("[")[0]
    return _FROM_CHAT.get(head, param)


def namespaced(body: dict) -> dict[str, tuple[str, str]]:
    """Anthropic tool name -> (namespace, name) for the namespace tools of a Responses request."""
    found = {}
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if _kind(tool) == "namespace" and isinstance(tool.get("tools"), list):
            for member in tool["tools"]:
                if isinstance(member, dict) and isinstance(member.get("name"), str):
                    found[f"{tool.get('name')}{_SEPARATOR}{member['name']}"] = (tool.get("name"), member["name"])
    return found


def _text(text: object, chat: dict, warnings: list[str]) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise _invalid("text must be an object", "text")
    left_out("text.verbosity", text.get("verbosity"), warnings)  # as chat's `verbosity`
    form = text.get("format")
    if form is None:
        return
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "json_schema":
        schema = form.get("schema")
        if not isinstance(schema, dict):
            raise _invalid("text.format.schema must be an object", "text.format.schema")
        spec = {"name": form.get("name") or "response", "schema": schema}
        for name in ("strict", "description"):  # chat's json_schema has both, read by chat's rule
            if form.get(name) is not None:
                spec[name] = form[name]
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind != "text":
        raise _invalid("text.format.type must be text, json_schema or json_object", "text.format.type")


def envelope(block: dict) -> str:
    """A thinking or redacted_thinking block, whole, as an opaque encrypted_content."""
    fields = ("thinking", "signature") if block.get("type") == "thinking" else ("data",)
    document = {"type": block.get("type"), **{name: block.get(name) or "" for name in fields}}
    return _ENVELOPE + base64.urlsafe_b64encode(orjson.dumps(document)).decode()


def _opened(content: object, at: str) -> list[dict] | None:
    """The blocks an envelope holds; None for content egress did not mint."""
    if not isinstance(content, str) or not content.startswith(_ENVELOPE):
        return None
    try:
        block = orjson.loads(base64.urlsafe_b64decode(content[len(_ENVELOPE) :]))
    except (ValueError, orjson.JSONDecodeError):
        raise _invalid(f"{at}.encrypted_content is damaged", f"{at}.encrypted_content") from None
    if not isinstance(block, dict) or block.get("type") not in ("thinking", "redacted_thinking"):
        raise _invalid(f"{at}.encrypted_content is damaged", f"{at}.encrypted_content")
    return [block]


# -- response ------------------------------------------------------------------------------------


def _given(body: dict, name: str, default: object) -> object:
    """A parameter as the request gave it, or its default when it is absent or null: null is "not given"
    to the API (every translation here skips it), and its echo is typed as the value (`parallel_tool_calls`
    a bool, `tool_choice` a choice: openai-python types/responses/response.py)."""
    value = body.get(name)
    return default if value is None else value


def response_shell(body: dict, model: str, created: int) -> dict:
    """What every response object of this request repeats of it (OpenAI echoes the parameters)."""
    tools = body.get("tools") or []
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return {
        "id": "",
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": _given(body, "parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": "default",
        "store": False,
        "temperature": _given(body, "temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": _given(body, "tool_choice", "auto"),
        "tools": tools,
        "top_p": _given(body, "top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


# stop_reason -> (status, incomplete reason)
_ENDINGS = {
    "max_tokens": ("incomplete", "max_output_tokens"),
    "model_context_window_exceeded": ("incomplete", "max_output_tokens"),
    "refusal": ("incomplete", "content_filter"),
}
_COMPLETED = ("completed", None)  # any other stop reason


def _usage(usage: Usage, thinking_tokens: int | None) -> dict:
    input_tokens = usage.input_tokens or 0  # uncached + cache read + cache creation
    output_tokens = usage.output_tokens or 0
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_tokens or 0,
            "cache_write_tokens": usage.cache_creation_tokens or 0,  # openai-python's ResponseUsage has it
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": thinking_tokens or 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _finished(shell: dict, upstream_id: str, output: list, stop_reason: object, usage: dict) -> dict:
    response = dict(shell)
    response["id"] = mint_id("resp", upstream_id)
    status, reason = _ENDINGS.get(stop_reason, _COMPLETED)
    response["status"] = status
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["output"] = output
    response["usage"] = usage
    return response


def _message_item(item_id: str, text: str, status: str = "completed", annotations: list | None = None) -> dict:
    content = (
        [{"type": "output_text", "text": text, "annotations": annotations or [], "logprobs": []}]
        if status != "in_progress"
        else []
    )
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _url_annotations(citations: list[tuple[str, str]], text: str) -> list[dict]:
    """A text block's web citations as the Responses API's url_citation annotations: Anthropic cites
    for a whole block, and each block is an item of its own, so each spans the item's text."""
    end = len(text)
    return [
        {"type": "url_citation", "start_index": 0, "end_index": end, "url": url, "title": title}
        for url, title in citations
    ]


def _search_item(item_id: str, search: dict, status: str) -> dict:
    """A web search Anthropic ran (its server_tool_use block, `query` in its input) as a
    `web_search_call` item, with the pages its web_search_tool_result found (`sources`)."""
    action: dict = {"type": "search", "query": search.get("query")}
    if search.get("sources"):
        action["sources"] = [{"type": "url", "url": url} for url in search["sources"]]
    return {"id": item_id, "type": "web_search_call", "status": status, "action": action}


def _search_found(block: dict) -> tuple[list[str], str]:
    """A web_search_tool_result's page urls, and the search's status: a result carrying an error
    (`web_search_tool_result_error`: too many requests, max uses, …) instead of a list failed."""
    content = block.get("content")
    if not isinstance(content, list):
        return [], "failed"
    urls = [page["url"] for page in content if isinstance(page, dict) and isinstance(page.get("url"), str)]
    return urls, "completed"


def _query(block_input: object) -> str | None:
    query = block_input.get("query") if isinstance(block_input, dict) else None
    return query if isinstance(query, str) else None


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed", names: dict | None = None
) -> dict:
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name}
    space = names.get(name) if names else None
    if space is not None:
        item["namespace"], item["name"] = space
    item["arguments"] = arguments
    return item


def _reasoning_item(item_id: str, block: dict | None, summary: str | None) -> dict:
    item: dict = {"id": item_id, "type": "reasoning", "summary": []}
    if summary:
        item["summary"] = [{"type": "summary_text", "text": summary}]
    if block is not None:
        item["encrypted_content"] = envelope(block)
    return item


def _item_status(stop_reason: object) -> str:
    """The status of the output item a response's generation ended in: `incomplete` when the
    response is (cut at max_output_tokens, or refused), as OpenAI marks it. A function call cut
    there has half a JSON value for arguments: its `completed` would have the caller run it."""
    return _ENDINGS.get(stop_reason, _COMPLETED)[0]


@provider_answer
def message_to_response(message: dict, shell: dict, names: dict | None = None) -> dict:
    upstream_id = message_id(message)
    output = []
    blocks = message.get("content") or ()
    last = None  # the item the last block made, if it made one: where generation stopped
    searches: dict[object, dict] = {}  # a web search's server_tool_use id -> its item, till its result
    for index, block in enumerate(blocks):
        last = None
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text = block.get("text")
            if text.__class__ is not str:
                text = ""  # a provider's garbage (a number, a list): no content, as on chat
            annotations = _url_annotations(web_citations(block), text)
            last = _message_item(mint_id("msg", upstream_id, index), text, annotations=annotations)
            output.append(last)
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            if block.get("name") == JSON_TOOL:
                last = _message_item(mint_id("msg", upstream_id, index), arguments)
            else:
                item_id = mint_id("fc", upstream_id, index)
                last = _call_item(item_id, str(block.get("id")), str(block.get("name")), arguments, names=names)
            output.append(last)
        elif kind in ("thinking", "redacted_thinking"):
            summary = block.get("thinking") if kind == "thinking" else None
            if summary.__class__ is not str:
                summary = None  # as a text of the wrong type: no summary
            output.append(_reasoning_item(mint_id("rs", upstream_id, index), block, summary))
        elif kind == "server_tool_use" and block.get("name") == WEB_SEARCH:
            # Without its result (the answer cut at max_tokens right after it), incomplete.
            item = _search_item(mint_id("ws", upstream_id, index), {"query": _query(block.get("input"))}, "incomplete")
            searches[block.get("id")] = item
            output.append(item)
        elif kind == "web_search_tool_result":
            item = searches.pop(block.get("tool_use_id"), None)
            if item is not None:
                sources, item["status"] = _search_found(block)
                item.update(
                    _search_item(item["id"], {"query": item["action"]["query"], "sources": sources}, item["status"])
                )
        # Other server tools' blocks: nothing a Responses client of function tools has a place for.
    if last is not None:
        last["status"] = _item_status(message.get("stop_reason"))
    usage = Usage()
    reduce_usage(usage, {}, message, ANTHROPIC)
    return _finished(
        shell, upstream_id, output, message.get("stop_reason"), _usage(usage, _thinking_tokens(message.get("usage")))
    )


# -- stream --------------------------------------------------------------------------------------

# An Anthropic error type (anthropic/types/shared/error_type.py) -> ResponseError.code, which
# openai/types/responses/response_error.py makes a closed Literal (an Anthropic type there fails
# ResponseFailedEvent validation). Any type not named here, or none, is "server_error": the rest
# (authentication, permission, billing, not_found, conflict) are the gateway's or the account's
# trouble, not the prompt's.
_FAILURE_CODES = {
    "api_error": "server_error",
    "overloaded_error": "server_error",
    "timeout_error": "server_error",
    "rate_limit_error": "rate_limit_exceeded",
    "invalid_request_error": "invalid_prompt",
    "request_too_large": "invalid_prompt",
}


class _Item:
    """One output item being streamed: its index, id, kind and what has come of it so far."""

    __slots__ = ("block", "call_id", "id", "kind", "name", "output_index", "parts", "summary_open")

    def __init__(self, output_index: int, item_id: str, kind: str) -> None:
        self.output_index = output_index
        self.id = item_id
        self.kind = kind  # "message", "function_call", "reasoning"
        self.parts: list[str] = []  # text, arguments, or thinking text
        self.block: dict | None = None  # a reasoning item's Anthropic block
        self.call_id = ""
        self.name = ""
        self.summary_open = False


class ResponsesTranscoder(AnthropicEvents):
    """Anthropic Messages SSE -> Responses API SSE, one upstream event at a time, every event with
    its `sequence_number`; the schedule the openai SDKs and Codex expect (see the module docstring)."""

    __slots__ = (
        "_blocks",
        "_done",
        "_held",
        "_names",
        "_raw_usage",
        "_searching",
        "_sequence",
        "_shell",
        "_stop_reason",
        "_thinking_tokens",
        "_upstream_id",
        "_usage",
        "started",
    )

    def __init__(self, shell: dict, names: dict | None = None) -> None:
        super().__init__()
        self._shell = shell
        self._names = names  # namespace tools' flattened names (namespaced())
        self._sequence = 0
        self._blocks: dict[object, _Item] = {}
        # Items done, by output_index: a search is done when its result comes, which may be after an
        # item that started later (parallel searches answered out of order); `output` is in index order.
        self._done: dict[int, dict] = {}
        # Web searches whose server_tool_use block ended, by its id: done when their result comes.
        self._searching: dict[object, _Item] = {}
        # The last block stopped, its item's done held until the stop reason says whether
        # generation ended inside it (max_tokens stops a block like any other: content_block_stop,
        # then message_delta with the reason). A next block's start releases it, completed.
        self._held: _Item | None = None
        self._upstream_id = ""
        self._usage = Usage()
        self._raw_usage: dict[str, int] = {}
        self._thinking_tokens: int | None = None
        self._stop_reason: object = None
        self.started = False  # response.created went out

    def _emit(self, kind: str, fields: dict, out: list[bytes]) -> None:
        document = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(document) + b"\n\n")

    def _response(self, status: str) -> dict:
        response = dict(self._shell)
        response["id"] = mint_id("resp", self._upstream_id)
        response["status"] = status
        return response

    # -- one handler per Anthropic event type -----------------------------------------------------
    def _on_message_start(self, event: dict, out: list[bytes]) -> None:
        message = event.get("message")
        if isinstance(message, dict):
            self._upstream_id = message_id(message)
            thinking = _thinking_tokens(message.get("usage"))
            if thinking is not None:
                self._thinking_tokens = thinking
        reduce_usage(self._usage, self._raw_usage, event, ANTHROPIC)
        self.started = True
        self._emit("response.created", {"response": self._response("in_progress")}, out)
        self._emit("response.in_progress", {"response": self._response("in_progress")}, out)

    def _release(self, status: str, out: list[bytes]) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._close(held, out, status)

    def _on_block_start(self, event: dict, out: list[bytes]) -> None:
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict) or index.__class__ is not int:
            return
        self._release("completed", out)  # generation went on past it
        kind = block.get("type")
        position = len(self._done) + len(self._blocks) + len(self._searching)
        upstream = self._upstream_id
        if kind == "text" or (kind == "tool_use" and block.get("name") == JSON_TOOL):
            item = _Item(position, mint_id("msg", upstream, index), "message")
            if isinstance(block.get("citations"), list) and block["citations"]:
                item.block = {"citations": list(block["citations"])}  # cited at its start (citations_delta: later)
            self._blocks[index] = item
            self._emit(
                "response.output_item.added",
                {"output_index": position, "item": _message_item(item.id, "", "in_progress")},
                out,
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._emit("response.content_part.added", self._at(item, content_index=0, part=part), out)
            first = block.get("text") or (orjson.dumps(block["input"]).decode() if block.get("input") else "")
            if first:
                self._output_text(item, first, out)
        elif kind == "tool_use":
            item = _Item(position, mint_id("fc", upstream, index), "function_call")
            item.call_id, item.name = str(block.get("id")), str(block.get("name"))
            self._blocks[index] = item
            added = _call_item(item.id, item.call_id, item.name, "", "in_progress", self._names)
            self._emit("response.output_item.added", {"output_index": position, "item": added}, out)
            if block.get("input"):
                self._arguments(item, orjson.dumps(block["input"]).decode(), out)
        elif kind in ("thinking", "redacted_thinking"):
            item = _Item(position, mint_id("rs", upstream, index), "reasoning")
            item.block = {"type": kind, **({"data": block.get("data")} if kind == "redacted_thinking" else {})}
            self._blocks[index] = item
            self._emit(
                "response.output_item.added",
                {"output_index": position, "item": _reasoning_item(item.id, None, None)},
                out,
            )
            if kind == "thinking":
                if block.get("thinking"):
                    self._thinking(item, block["thinking"], out)
                if block.get("signature"):
                    item.block["signature"] = block["signature"]
        elif kind == "server_tool_use" and block.get("name") == WEB_SEARCH:
            item = _Item(position, mint_id("ws", upstream, index), "web_search_call")
            item.call_id = block.get("id")
            item.block = {"query": _query(block.get("input"))}
            self._blocks[index] = item
            added = {"id": item.id, "type": "web_search_call", "status": "in_progress"}  # as OpenAI's stream has it
            self._emit("response.output_item.added", {"output_index": position, "item": added}, out)
            self._emit("response.web_search_call.in_progress", self._at(item), out)
        elif kind == "web_search_tool_result":
            item = self._searching.pop(block.get("tool_use_id"), None)
            if item is not None:
                item.block["sources"], status = _search_found(block)
                self._close(item, out, status)
        # Other server tools' blocks: not output items a function-tool client knows.

    def _output(self) -> list[dict]:
        return [self._done[index] for index in sorted(self._done)]

    def _at(self, item: _Item, **fields) -> dict:
        return {"item_id": item.id, "output_index": item.output_index, **fields}

    def _output_text(self, item: _Item, text: str, out: list[bytes]) -> None:
        if text.__class__ is not str:
            return  # a provider's garbage (a number, an object): no content, as on chat
        item.parts.append(text)
        self._emit("response.output_text.delta", self._at(item, content_index=0, delta=text, logprobs=[]), out)

    def _arguments(self, item: _Item, piece: str, out: list[bytes]) -> None:
        if piece.__class__ is not str:
            return  # arguments are JSON text; anything else is no piece of them
        item.parts.append(piece)
        self._emit("response.function_call_arguments.delta", self._at(item, delta=piece), out)

    def _thinking(self, item: _Item, text: str, out: list[bytes]) -> None:
        if text.__class__ is not str:
            return  # as _output_text
        if not item.summary_open:
            item.summary_open = True
            part = {"type": "summary_text", "text": ""}
            self._emit("response.reasoning_summary_part.added", self._at(item, summary_index=0, part=part), out)
        item.parts.append(text)
        self._emit("response.reasoning_summary_text.delta", self._at(item, summary_index=0, delta=text), out)

    def _on_block_delta(self, event: dict, out: list[bytes]) -> None:
        item = self._blocks.get(event.get("index"))
        delta = event.get("delta")
        if item is None or not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta" and item.kind == "message":
            if delta.get("text"):
                self._output_text(item, delta["text"], out)
        elif kind == "input_json_delta" and delta.get("partial_json"):
            if item.kind == "function_call":
                self._arguments(item, delta["partial_json"], out)
            elif item.kind == "message":
                self._output_text(item, delta["partial_json"], out)  # JSON mode: the tool input is the answer
            elif item.kind == "web_search_call":
                item.parts.append(delta["partial_json"])  # the search's input: its query
        elif kind == "citations_delta" and item.kind == "message":
            # Cited before its text comes: annotated once the text is whole (the span is the block's).
            if item.block is None:
                item.block = {"citations": []}
            item.block["citations"].append(delta.get("citation"))
        elif kind == "thinking_delta" and item.kind == "reasoning":
            if delta.get("thinking"):
                self._thinking(item, delta["thinking"], out)
        elif kind == "signature_delta" and item.kind == "reasoning" and item.block is not None:
            item.block["signature"] = (item.block.get("signature") or "") + (delta.get("signature") or "")

    def _on_block_stop(self, event: dict, out: list[bytes]) -> None:
        item = self._blocks.pop(event.get("index"), None)
        if item is not None:
            self._release("completed", out)
            if item.kind == "reasoning":
                self._close(item, out)
            elif item.kind == "web_search_call":
                if item.parts:
                    try:
                        item.block["query"] = _query(orjson.loads("".join(item.parts)))
                    except orjson.JSONDecodeError:
                        pass  # a query that never came whole: the search says none
                self._emit("response.web_search_call.searching", self._at(item), out)
                self._searching[item.call_id] = item
            else:
                self._held = item

    def _close(self, item: _Item, out: list[bytes], status: str = "completed") -> None:
        joined = "".join(item.parts)
        if item.kind == "message":
            annotations = _url_annotations(web_citations(item.block), joined) if item.block is not None else []
            for position, annotation in enumerate(annotations):
                fields = self._at(item, content_index=0, annotation_index=position, annotation=annotation)
                self._emit("response.output_text.annotation.added", fields, out)
            self._emit("response.output_text.done", self._at(item, content_index=0, text=joined, logprobs=[]), out)
            part = {"type": "output_text", "text": joined, "annotations": annotations, "logprobs": []}
            self._emit("response.content_part.done", self._at(item, content_index=0, part=part), out)
            done = _message_item(item.id, joined, status, annotations)
        elif item.kind == "web_search_call":
            if status == "completed":
                self._emit("response.web_search_call.completed", self._at(item), out)
            done = _search_item(item.id, item.block, status)
        elif item.kind == "function_call":
            if not joined:
                joined = "{}"  # a call without input: its arguments are an empty object
                self._arguments(item, joined, out)
            done = _call_item(item.id, item.call_id, item.name, joined, status, self._names)
            # `name` (an extra the SDK's event model allows) as the item names it: a namespace
            # tool's own name, its namespace beside it, never the flattened Anthropic name.
            named = {key: done[key] for key in ("namespace", "name") if key in done}
            self._emit("response.function_call_arguments.done", self._at(item, arguments=joined, **named), out)
        else:
            block = item.block or {}
            if block.get("type") == "thinking":
                block["thinking"] = joined
            if item.summary_open:
                self._emit("response.reasoning_summary_text.done", self._at(item, summary_index=0, text=joined), out)
                part = {"type": "summary_text", "text": joined}
                self._emit("response.reasoning_summary_part.done", self._at(item, summary_index=0, part=part), out)
            done = _reasoning_item(item.id, block, joined if item.summary_open else None)
        self._done[item.output_index] = done
        self._emit("response.output_item.done", {"output_index": item.output_index, "item": done}, out)

    def _on_message_delta(self, event: dict, out: list[bytes]) -> None:
        reduce_usage(self._usage, self._raw_usage, event, ANTHROPIC)
        thinking = _thinking_tokens(event.get("usage"))
        if thinking is not None:
            self._thinking_tokens = thinking
        delta = event.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason") is not None:
            self._stop_reason = delta["stop_reason"]
            self._release(_item_status(self._stop_reason), out)

    def _on_message_stop(self, event: dict, out: list[bytes]) -> None:
        status = _item_status(self._stop_reason)
        self._release(status, out)
        # A block never stopped is closed with what came; a search whose result never came, incomplete.
        left = [(item, status) for item in self._blocks.values()]
        left += [(item, "incomplete") for item in self._searching.values()]
        for item, ending in sorted(left, key=lambda pair: pair[0].output_index):
            self._close(item, out, "incomplete" if item.kind == "web_search_call" else ending)
        self._blocks.clear()
        self._searching.clear()
        usage = _usage(self._usage, self._thinking_tokens)
        response = _finished(self._shell, self._upstream_id, self._output(), self._stop_reason, usage)
        self._emit(f"response.{response['status']}", {"response": response}, out)
        self.ended = True

    def _on_error(self, event: dict, out: list[bytes]) -> None:
        error = event.get("error")
        detail = _openai_error(error if isinstance(error, dict) else {}, 500)
        if not self.started:
            # No upstream message to name it after: an id of its own, through the one minter, so two
            # failed requests never share a response id.
            self._upstream_id = "failed_" + secrets.token_hex(16)
            self.started = True
            self._emit("response.created", {"response": self._response("in_progress")}, out)
            self._emit("response.in_progress", {"response": self._response("in_progress")}, out)
        self._release("completed", out)  # it stopped before the error: whole
        for index in sorted(self._blocks, key=lambda key: self._blocks[key].output_index):
            item = self._blocks[index]
            # The text that came is the client's: its message closes, incomplete. A function call's
            # arguments and an unsigned thinking block are not whole, so they stay open and out of
            # `output` (arguments only ever arrive whole; a block without its signature can't go back).
            if item.kind == "message":
                self._close(item, out, "incomplete")
        self._blocks.clear()
        response = self._response("failed")
        response["output"] = self._output()
        kind = detail["code"]
        response["error"] = {
            "code": _FAILURE_CODES.get(kind, "server_error"),
            "message": detail["message"],
            "type": kind,  # ResponseError.type: "the original error type"
        }
        self._emit("response.failed", {"response": response}, out)
        self.ended = True


ResponsesTranscoder.HANDLERS = {
    "message_start": ResponsesTranscoder._on_message_start,
    "content_block_start": ResponsesTranscoder._on_block_start,
    "content_block_delta": ResponsesTranscoder._on_block_delta,
    "content_block_stop": ResponsesTranscoder._on_block_stop,
    "message_delta": ResponsesTranscoder._on_message_delta,
    "message_stop": ResponsesTranscoder._on_message_stop,
    "error": ResponsesTranscoder._on_error,
}
