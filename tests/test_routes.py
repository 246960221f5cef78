"""Model routes and the one model policy: the call path and the listing agree by construction."""

from __future__ import annotations

import pytest

from egress.errors import EgressError
from egress.providers import BUILTIN_PROVIDERS, Provider
from egress.routes import (
    DEFAULT_ROUTES,
    ModelRoute,
    ModelRoutes,
    check_model,
    listed_models,
    model_permitted,
    path_model,
)
from egress.vkeys import Claims

POOL = ("env:POOL_KEY",)  # a virtual key is served only where a pool key can be swapped in
PROVIDERS = {
    **BUILTIN_PROVIDERS,
    "openai": Provider("openai", "https://api.openai.com", models=("gpt-4o", "gpt-4o-mini", "o3"), pool_keys=POOL),
    "anthropic": Provider(
        "anthropic",
        "https://api.anthropic.com",
        dialect="anthropic",
        models=("claude-sonnet-4-5", "claude-opus-4-1"),
        deny_models=("claude-opus-*",),
        pool_keys=POOL,
    ),
    "groq": Provider(
        "groq",
        "https://api.groq.com",
        models=("llama-3.3-70b", "gpt-4o"),
        allow_models=("llama-*",),
        pool_keys=POOL,
    ),
}
ROUTES = ModelRoutes(
    (ModelRoute("claude-*", "anthropic"), ModelRoute("llama-*", "groq"), ModelRoute("*", "openai")),
    PROVIDERS,
)


def claims(models: tuple[str, ...] | None = None, providers: frozenset[str] | None = None) -> Claims:
    return Claims("0" * 16, "1" * 16, "app", 0, models=models, providers=providers)


@pytest.mark.parametrize(
    ("model", "provider", "upstream"),
    [
        ("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5"),
        ("llama-3.3-70b", "groq", "llama-3.3-70b"),
        ("gpt-4o", "openai", "gpt-4o"),
        ("my-claude-model", "openai", "my-claude-model"),  # a glob matches the whole name, never a part
        ("Claude-3", "openai", "Claude-3"),  # case-sensitive
        ("groq:gpt-4o", "groq", "gpt-4o"),  # provider:model names a provider; its own name goes upstream
        ("nosuch:gpt-4o", "openai", "nosuch:gpt-4o"),  # not a provider: an ordinary model name
    ],
)
def test_resolve(model, provider, upstream):
    target = ROUTES.resolve(model)
    assert (target.provider.name, target.upstream_model) == (provider, upstream)


@pytest.mark.parametrize(("model", "code"), [(None, "model_required"), ("", "model_required"), (7, "model_required")])
def test_model_required(model, code):
    with pytest.raises(EgressError) as raised:
        ROUTES.resolve(model)
    assert raised.value.code == code and raised.value.status == 400


def test_no_route_is_404():
    routes = ModelRoutes((ModelRoute("gpt-*", "openai"),), PROVIDERS)
    with pytest.raises(EgressError) as raised:
        routes.resolve("claude-x")
    assert (raised.value.code, raised.value.status) == ("model_not_found", 404)


def test_default_routes_send_claude_to_anthropic_and_the_rest_to_openai():
    routes = ModelRoutes(DEFAULT_ROUTES, BUILTIN_PROVIDERS)
    assert routes.resolve("claude-haiku-4-5").provider.name == "anthropic"
    assert routes.resolve("gpt-5").provider.name == "openai"


def test_a_key_may_name_a_model_of_one_provider_as_the_listing_does():
    # /v1/models lists an id two providers serve as provider:model; a key minted with that form, or
    # with provider:*, permits the model there and nowhere else.
    openai, groq, anthropic = PROVIDERS["openai"], PROVIDERS["groq"], PROVIDERS["anthropic"]
    only_openai = claims(("openai:gpt-4o",))
    assert model_permitted(openai, "gpt-4o", only_openai)
    assert not model_permitted(openai, "o3", only_openai)
    assert not model_permitted(anthropic, "gpt-4o", only_openai)
    groq_only = claims(("groq:*",))
    assert model_permitted(groq, "llama-3.3-70b", groq_only) and not model_permitted(openai, "o3", groq_only)
    assert not model_permitted(groq, "gpt-4o", groq_only)  # the provider's own allow list still holds
    assert [entry["id"] for entry in listed_models(ROUTES, only_openai)] == ["gpt-4o"]
    assert [entry["id"] for entry in listed_models(ROUTES, groq_only)] == ["llama-3.3-70b"]


def test_policy_deny_beats_allow_and_the_key_narrows_further():
    anthropic, groq = PROVIDERS["anthropic"], PROVIDERS["groq"]
    assert model_permitted(anthropic, "claude-sonnet-4-5", None)
    assert not model_permitted(anthropic, "claude-opus-4-1", None)  # deny
    assert not model_permitted(groq, "gpt-4o", None)  # not in allow
    both = Provider("x", "https://x.test", allow_models=("a-*",), deny_models=("a-bad",))
    assert model_permitted(both, "a-good", None) and not model_permitted(both, "a-bad", None)
    none_allowed = Provider("y", "https://y.test", allow_models=())
    assert not model_permitted(none_allowed, "anything", None)
    key = claims(models=("gpt-4o*",))
    assert model_permitted(PROVIDERS["openai"], "gpt-4o-mini", key)
    assert not model_permitted(PROVIDERS["openai"], "o3", key)
    with pytest.raises(EgressError) as raised:
        check_model(PROVIDERS["openai"], "o3", key)
    assert (raised.value.code, raised.value.status) == ("model_not_permitted", 403)


def test_the_listing_is_what_the_call_path_serves():
    for key in (None, claims(models=("gpt-4o*", "claude-*")), claims(providers=frozenset({"openai"}))):
        listed = listed_models(ROUTES, key)
        for entry in listed:
            target = ROUTES.resolve(entry["id"])
            assert target.provider.name == entry["owned_by"], entry
            assert model_permitted(target.provider, target.upstream_model, key), entry
            if key is not None and key.providers is not None:
                assert target.provider.name in key.providers
    ids = {entry["id"] for entry in listed_models(ROUTES, None)}
    # gpt-4o is served by openai and offered by groq (but groq's allow list refuses it): listed once.
    assert ids == {"gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4-5", "llama-3.3-70b"}
    assert "claude-opus-4-1" not in ids  # denied: never listed
    assert {e["id"] for e in listed_models(ROUTES, claims(models=("gpt-4o*",)))} == {"gpt-4o", "gpt-4o-mini"}


def test_a_virtual_key_is_not_offered_a_provider_with_no_pool_key():
    # The call path refuses it one (auth: no_pool_key); a BYO key may still call it with its own.
    providers = {**PROVIDERS, "local": Provider("local", "http://127.0.0.1:8000", models=("local-model",))}
    routes = ModelRoutes((ModelRoute("local-*", "local"), ModelRoute("*", "openai")), providers)
    assert "local-model" in {entry["id"] for entry in listed_models(routes, None)}
    for key in (claims(), claims(models=("local-*", "gpt-4o")), claims(providers=frozenset({"local", "openai"}))):
        assert {entry["id"] for entry in listed_models(routes, key)} <= {"gpt-4o", "gpt-4o-mini", "o3"}


def test_an_id_two_providers_serve_is_listed_per_provider():
    providers = {
        "openai": Provider("openai", "https://api.openai.com", models=("shared-model",)),
        "groq": Provider("groq", "https://api.groq.com", models=("shared-model",)),
    }
    routes = ModelRoutes((ModelRoute("*", "openai"), ModelRoute("x", "groq")), providers)
    ids = sorted(entry["id"] for entry in listed_models(routes, None))
    assert ids == ["groq:shared-model", "openai:shared-model"]
    for shown in ids:
        assert routes.resolve(shown).provider.name == shown.split(":")[0]


DECOY_FORM = (
    b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
    b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    b'--A\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--A--\r\n\r\n--B--\r\n'
)


@pytest.mark.parametrize(
    ("body", "content_type", "models"),
    [
        (b"", b"application/json", []),
        (b'{"model":"a","model":"b"}', b"application/json", ["b"]),
        (b'{"model":"a\\u0062"}', b"application/json; charset=utf-8", ["ab"]),
        (b'{"requests":[{"params":{"model":"x"}},{"params":{"model":"y"}}]}', b"application/json", ["x", "y"]),
        (b'{"tools":[{"input_schema":{"properties":{"model":{"type":"string"}}}}]}', b"application/json", []),
        (b'{"model":5,"input":"hi"}', b"application/json", []),
        # A tool call sent back in the conversation is the model's output, not a model choice:
        # Claude Code's Task tool takes `"model": "haiku"` (anthropics/claude-code#16554).
        (
            b'{"model":"claude-x","messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t",'
            b'"name":"Task","input":{"prompt":"p","model":"haiku"}}]}]}',
            b"application/json",
            ["claude-x"],
        ),
        (
            b'{"requests":[{"params":{"model":"x","messages":[{"role":"assistant","content":[{"type":"tool_use",'
            b'"input":{"model":"haiku"}}]}]}}]}',
            b"application/json",
            ["x"],
        ),
        (b'{"model":"gpt-4o","input":[{"type":"message","content":{"model":"y"}}]}', b"application/json", ["gpt-4o"]),
        (b'{"model":"gpt-4o","metadata":{"model":"my-tag"}}', b"application/json", ["gpt-4o"]),
        (
            b'{"model":"gpt-4o","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object",'
            b'"properties":{"model":{"type":"string","default":"a"}},"examples":[{"model":"b"}]}}}]}',
            b"application/json",
            ["gpt-4o"],
        ),
        # Models the provider runs, nested: a Responses image_generation tool, a realtime session's
        # transcription (a dict-valued `input`: still read).
        (
            b'{"model":"gpt-4o","tools":[{"type":"image_generation","model":"gpt-image-1"}]}',
            b"application/json",
            ["gpt-4o", "gpt-image-1"],
        ),
        (
            b'{"session":{"model":"gpt-realtime","audio":{"input":{"transcription":{"model":"whisper-1"}}}}}',
            b"application/json",
            ["gpt-realtime", "whisper-1"],
        ),
        (b"[[[[" * 100 + b'{"model":"deep"}' + b"]]]]" * 100, b"application/json", ["deep"]),
        (b"not json", b"application/json", None),
        (b"model=a", b"application/x-www-form-urlencoded", None),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
            b'--b\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
            ["whisper-1"],
        ),
        # The `name` parameter as a token and as RFC 5987's name*=, as Werkzeug reads them both.
        (
            b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\ngpt-4o\r\n--b--\r\n",
            b"multipart/form-data; boundary=b",
            ["gpt-4o"],
        ),
        (
            b"--b\r\nContent-Disposition: form-data; name*=UTF-8''%6Dodel\r\n\r\n" + b"g" * 400 + b"\r\n--b--\r\n",
            b'multipart/form-data; boundary="b"',
            ["g" * 400],
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n\r\nx\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
            [],
        ),
        # The boundary is the parameter of that name, as the provider's parser reads it, never the
        # tail of another parameter: the decoy form between --A delimiters is the file's content.
        (DECOY_FORM, b"multipart/form-data; xboundary=A; boundary=B", ["gpt-4o-transcribe"]),
        (DECOY_FORM, b'multipart/form-data; charset="x; boundary=A"; boundary=B', ["gpt-4o-transcribe"]),
        (DECOY_FORM, b'multipart/form-data;boundary="B" ; x-a=1', ["gpt-4o-transcribe"]),
        # A part's head as lenient parsers read it (Werkzeug reads `model` in each of these): a
        # bare LF, a folded line, space before the colon, a folded first line, an LF before the
        # next delimiter (the value is "gpt-denied", which a deny list must see as such).
        *(
            (
                b"--B\r\n" + head + b"\r\n\r\ngpt-denied" + end + b"--B--\r\n",
                b"multipart/form-data; boundary=B",
                ["gpt-denied"],
            )
            for head, end in (
                (b'X-Pad: y\nContent-Disposition: form-data; name="model"', b"\r\n"),
                (b'Content-Disposition: form-data;\r\n name="model"', b"\r\n"),
                (b'Content-Disposition : form-data; name="model"', b"\r\n"),
                (b' Content-Disposition: form-data; name="model"', b"\r\n"),
                (b'Content-Disposition: form-data; name="model"', b"\n"),
            )
        ),
        (
            b'--B\nContent-Disposition: form-data; name="model"\n\ngpt-denied\n--B--\n',
            b"multipart/form-data; boundary=B",
            ["gpt-denied"],
        ),
        # Two boundaries, or parameters that can't be read whole: which one the provider takes is a guess.
        (DECOY_FORM, b"multipart/form-data; boundary=A; boundary=B", None),
        (DECOY_FORM, b"multipart/form-data; boundary=B junk", None),
        # A form with no closing delimiter, or no boundary: not readable, so not "no model".
        (b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\ngpt-4o", b"multipart/form-data; boundary=b", None),
        (b"--b\r\n\r\n--b--", b"multipart/form-data", None),
    ],
)
def test_body_models_reads_every_model_as_the_provider_would(body, content_type, models):
    from egress.routes import body_models

    found = body_models(body, content_type)
    assert (sorted(found) if found is not None else None) == models  # any order: each is checked


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (b"/v1/models/gpt-4o", "gpt-4o"),
        (b"/v1/models/ft:gpt-4o-mini:org::abc", "ft:gpt-4o-mini:org::abc"),  # OpenAI's fine-tuned ids keep colons
        (b"/v1/models/ft%3Agpt-4o%3Aorg%3A%3Aabc", "ft:gpt-4o:org::abc"),
        (b"/v1beta/models/gemini-2.5-pro:generateContent", "gemini-2.5-pro"),  # Gemini's model:method
        (b"/v1/models", None),
        (b"/v1/models/", None),
        (b"/v1/models/a/b", None),
        (b"/v1/chat/completions", None),
    ],
)
def test_path_model(path, model):
    assert path_model(path) == model
