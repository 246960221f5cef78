"""Real provider traffic through the real egress process: bytes unchanged, usage as the provider said.

Every case in tests/recordings/ (cited in tests/recordings/SOURCES.md) is a recorded request and
the provider's response bytes. The request is sent as recorded, through egress, to a replay
upstream that answers with the recording; the client must get exactly the recorded bytes (gzip
ones too), and the usage fact for that request must carry the provider's own numbers (`expected`
in meta.json, read off the recording independently of egress's meter). Each case runs with the
body relayed whole and cut into 7-byte chunks; the short ones also in 1-byte chunks.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from egress.providers import BUILTIN_PROVIDERS
from tests.replay import Recording, ReplayUpstream, load_recordings
from tests.support import EgressProcess, RawClient, request_bytes, wait_until, whole_lines

RECORDINGS = load_recordings()
# The fact's key for each `expected` field, where the two differ.
FACT_KEYS = {"state": "usage"}
ABSENT = "<absent from the fact>"
SHORT = 4096  # bodies this small also run in 1-byte pieces

CASES = [(name, 0) for name in RECORDINGS] + [(name, 7) for name in RECORDINGS]
CASES += [(name, 1) for name, recording in RECORDINGS.items() if len(recording.body) <= SHORT]


@pytest.fixture(scope="module")
def replay():
    upstream = ReplayUpstream(RECORDINGS)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def metered(replay, tmp_path_factory):
    workdir: Path = tmp_path_factory.mktemp("recordings")
    usage_file = workdir / "usage.jsonl"
    rows = []
    for name in sorted({recording.provider for recording in RECORDINGS.values()}):
        base_path = BUILTIN_PROVIDERS[name].origin.base_path.decode()
        rows.append(f'[providers.{name}]\nbase_url = "{replay.base_url}{base_path}"\n')
    config = "\n".join(rows) + f'\n[usage]\njsonl = "{usage_file}"\n'
    egress = EgressProcess(workdir, config).start()
    egress.usage_file = usage_file
    yield egress
    egress.stop()


def fact_for(egress: EgressProcess, request_id: str) -> dict | None:
    if not egress.usage_file.exists():
        return None
    for line in whole_lines(egress.usage_file.read_bytes()):
        if request_id.encode() in line:
            fact = orjson.loads(line)
            if fact.get("request_id") == request_id:
                return fact
    return None


_KEY_FORMS = {"groq": "gsk_", "openrouter": "sk-or-", "xai": "xai-", "cerebras": "csk-", "fireworks": "fw_"}


def send(egress: EgressProcess, recording: Recording, piece: int):
    request = recording.meta["request"]
    headers = {"Content-Type": "application/json", "x-replay-case": recording.name}
    if recording.provider == "anthropic":
        headers["x-api-key"] = "sk-ant-test"
        headers["anthropic-version"] = "2023-06-01"
    else:
        # A key of the provider's own form: egress refuses one of another provider's (auth.py).
        headers["Authorization"] = f"Bearer {_KEY_FORMS.get(recording.provider, 'sk-')}test"
    if piece:
        headers["x-replay-piece"] = str(piece)
    target = f"/{recording.provider}{request['path']}"
    with RawClient(egress.port, timeout=10) as client:
        client.send(request_bytes(request["method"], target, headers, recording.request_body))
        return client.read_response(request["method"])


def may_ask_for_usage(recording: Recording) -> bool:
    """An OpenAI-style chat stream whose caller didn't ask for usage: egress may add the option."""
    body = recording.meta["request"]["body"] or {}
    asked = (body.get("stream_options") or {}).get("include_usage") is True
    chat = recording.meta["request"]["path"].split("?", 1)[0].endswith("/chat/completions")
    return recording.provider != "anthropic" and chat and body.get("stream") is True and not asked


@pytest.mark.parametrize(
    ("name", "piece"), CASES, ids=[f"{name}-{'whole' if not piece else f'{piece}B'}" for name, piece in CASES]
)
def test_recording(metered, replay, name, piece):
    recording = RECORDINGS[name]
    response = send(metered, recording, piece)
    received = [request for request in replay.requests if request.headers.get("x-replay-case") == name][-1]
    assert received.headers.get("x-replay-piece", "0") == str(piece)  # the body really went out in pieces
    if not may_ask_for_usage(recording):
        assert received.body == recording.request_body, "egress changed a request it had no reason to touch"
    assert response.status == recording.meta["response"]["status"], response.body[:500]
    assert response.complete
    if response.body != recording.body:
        at = next((i for i, (a, b) in enumerate(zip(response.body, recording.body, strict=False)) if a != b), None)
        at = min(len(response.body), len(recording.body)) if at is None else at
        pytest.fail(
            f"the client got other bytes than the provider sent: {len(response.body)} bytes, recorded "
            f"{len(recording.body)}; first difference at byte {at}: got {response.body[at : at + 120]!r}, "
            f"recorded {recording.body[at : at + 120]!r}"
        )
    for name_, value in recording.headers:
        if name_ == "content-encoding":
            assert response.headers.get("content-encoding") == value
    request_id = response.headers["x-egress-request-id"]
    assert wait_until(lambda: fact_for(metered, request_id) is not None, timeout=5), "no usage fact was written"
    fact = fact_for(metered, request_id)
    got = {key: fact.get(FACT_KEYS.get(key, key), ABSENT) for key in recording.meta["expected"]}
    wrong = {key: (expected, got[key]) for key, expected in recording.meta["expected"].items() if got[key] != expected}
    assert not wrong, "usage fields that differ (expected, got): " + ", ".join(
        f"{key}={expected!r}/{value!r}" for key, (expected, value) in wrong.items()
    )


def test_the_mistral_replay_is_as_strict_as_mistral(replay):
    # What makes the mistral cases above mean something: asked directly, with the field egress
    # would add for an OpenAI-style stream, the replay refuses as Mistral does (422 extra_forbidden).
    name = next(name for name, recording in RECORDINGS.items() if recording.provider == "mistral" and "stream" in name)
    body = orjson.loads(RECORDINGS[name].request_body)
    body["stream_options"] = {"include_usage": True}
    headers = {"Content-Type": "application/json", "x-replay-case": name, "Authorization": "Bearer sk-test"}
    with RawClient(replay.port) as client:
        client.send(request_bytes("POST", RECORDINGS[name].meta["request"]["path"], headers, orjson.dumps(body)))
        response = client.read_response("POST")
    assert response.status == 422
    assert response.json()["message"]["detail"][0]["type"] == "extra_forbidden"
