"""A second look at the day's changes (8b14350..): each case a hole the new code opened, found against
the real code (units directly; the proxy through the real `egress serve`)."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress import anthropic_codec
from egress.anthropic_codec import _user_id, chat_to_messages
from egress.errors import EgressError
from egress.responses_codec import responses_param, responses_to_chat
from egress.vkeys import mint
from tests.support import LoopbackServer, RawClient, _split_request, request_bytes, samples, value
from tests.test_accounts import ISSUER, KEY_A, KEY_B, _error, accounts_config, completion, keyed  # noqa: F401

# --- a held 429 or 400 whose body does not come whole ---------------------------------------------


class _RawKeyed(LoopbackServer):
    """Per pool key, raw bytes to write and what follows them: "close", "hang" (silence, open) or None
    (kept alive). Every request is recorded by its key."""

    def __init__(self, plans: dict) -> None:
        self.plans = plans
        self.seen: list[str] = []
        self.lock = threading.Lock()
        super().__init__(backlog=64)

    def _serve(self, conn: socket.socket) -> None:
        for raw in self._requests(conn, _split_request):
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in head[1:])}
            key = headers.get("authorization", "").removeprefix("Bearer ")
            with self.lock:
                self.seen.append(key)
            data, after = self.plans[key]
            try:
                conn.sendall(data)
            except OSError:
                return
            if after == "hang":
                while not self._stop.is_set():
                    time.sleep(0.05)
                return
            if after == "close":
                conn.close()
                return

    def served(self, key: str) -> int:
        with self.lock:
            return self.seen.count(key)


_OK = completion()[2]
_OK_REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(_OK), _OK),
    None,
)
_LIMITED_BODY = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'


def _limited_head(length: int) -> bytes:
    return (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 20\r\n"
        b"content-length: %d\r\n\r\n" % length
    )


def _chat(egress, timeout: float = 10.0):
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    with RawClient(egress.port, timeout=timeout) as client:
        headers = {"Authorization": f"Bearer {mint(ISSUER, 'review-today')[0]}"}
        client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
        return client.read_response("POST")


def test_a_429_whose_body_never_ends_is_still_retried_on_the_next_account(start_egress, tmp_path):
    # Its head says the request was refused (nothing generated): before its body was held to be judged,
    # the next account answered at once. Held, the caller waited read_idle_timeout (300 s) for a 504.
    upstream = _RawKeyed({KEY_A: (_limited_head(len(_LIMITED_BODY)) + _LIMITED_BODY[:20], "hang"), KEY_B: _OK_REPLY})
    try:
        egress = start_egress(accounts_config(upstream, tmp_path, extra="\n[upstream]\nread_idle_timeout = 30\n"))
        started = time.monotonic()
        response = _chat(egress, timeout=8.0)
        assert response.status == 200, response.body
        assert response.headers["x-egress-attempts"] == "2"
        assert upstream.served(KEY_A) == 1 and upstream.served(KEY_B) == 1
        assert time.monotonic() - started < 4.0
    finally:
        upstream.stop()


def test_a_429_whose_body_is_cut_is_still_retried_on_the_next_account(start_egress, tmp_path):
    # Was a 502 upstream_protocol_error, the next account never tried and this one not cooled.
    upstream = _RawKeyed({KEY_A: (_limited_head(len(_LIMITED_BODY)) + _LIMITED_BODY[:20], "close"), KEY_B: _OK_REPLY})
    try:
        egress = start_egress(accounts_config(upstream, tmp_path))
        response = _chat(egress)
        assert response.status == 200, response.body
        assert response.headers["x-egress-attempts"] == "2"
        found = samples(egress.admin_port)
        assert value(found, "egress_upstream_attempts_total", account="team-a", outcome="retry_scheduled") == 1
    finally:
        upstream.stop()


def test_a_400_cut_short_reaches_the_caller_cut_as_before_it_was_held(start_egress, tmp_path):
    # Not retried (a 400 is about the request): what came is relayed and the response cut, as an
    # error never held is; it was egress's own 502, the provider's status and words lost.
    body = b'{"error": {"message": "Invalid value for temperature", "type": "invalid_request_error"}}'
    head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    upstream = _RawKeyed({KEY_A: (head + body[:30], "close"), KEY_B: (head + body[:30], "close")})
    try:
        egress = start_egress(accounts_config(upstream, tmp_path))
        response = _chat(egress)
        assert response.status == 400 and not response.complete
        assert response.body == body[:30]
        assert upstream.served(KEY_A) + upstream.served(KEY_B) == 1
    finally:
        upstream.stop()


def test_a_400_slower_than_the_hold_is_relayed_whole_once_judged_by_its_status(start_egress, tmp_path):
    body = b'{"error": {"message": "Invalid value for temperature", "type": "invalid_request_error"}}'
    head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)

    class Slow(_RawKeyed):
        def _serve(self, conn: socket.socket) -> None:
            for _ in self._requests(conn, _split_request):
                conn.sendall(head + body[:30])
                self._stop.wait(1.5)  # past first_event_timeout (1 s)
                conn.sendall(body[30:])

    upstream = Slow({})
    try:
        egress = start_egress(accounts_config(upstream, tmp_path, extra="\n[accounts]\nfirst_event_timeout = 1\n"))
        response = _chat(egress)
        assert response.status == 400 and response.complete and response.body == body
    finally:
        upstream.stop()


# --- egress_upstream_attempts_total: one outcome per attempt --------------------------------------


def test_a_disabled_accounts_attempt_counts_once_among_the_outcomes(start_egress, keyed, tmp_path):  # noqa: F811
    # account_disabled was tallied beside the retry_scheduled (or retry_exhausted, not_retryable) of the
    # same attempt: team-a's one attempt counted twice, and the outcomes no longer added up to attempts.
    spent = _error("insufficient_quota", "You exceeded your current quota", "insufficient_quota")
    upstream = keyed({KEY_A: lambda n: (429, {}, spent), KEY_B: lambda n: (402, {}, b'{"error": {}}')})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = _chat(egress)
    assert response.status == 502 and response.error_code == "pool_key_refused"
    found = samples(egress.admin_port)
    for account in ("team-a", "team-b"):
        assert value(found, "egress_upstream_attempts_total", account=account) == 1
        assert value(found, "egress_upstream_attempts_total", account=account, outcome="account_disabled") == 1


# --- the chat translation: blank text left out -----------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "  "}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "\n\n"}]}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "\n"}],
    ],
)
def test_a_request_whose_every_message_is_blank_is_told_so(messages):
    # Whitespace-only text is left out (Anthropic refuses it); with nothing else, the 400 said "messages
    # must include a user or assistant message" of a request that has one.
    with pytest.raises(EgressError) as caught:
        chat_to_messages({"model": "claude-x", "messages": messages}, default_max_tokens=16)
    assert "whitespace" in caught.value.message
    assert caught.value.param.endswith(".content")
    # Named on the Responses API as its own field.
    with pytest.raises(EgressError) as caught:
        chat, _ = responses_to_chat({"model": "claude-x", "input": "   "})
        chat_to_messages(chat, default_max_tokens=16)
    assert "whitespace" in caught.value.message
    assert responses_param(caught.value.param) == "input"


def test_no_message_at_all_is_still_said_as_before():
    with pytest.raises(EgressError) as caught:
        chat_to_messages({"model": "claude-x", "messages": [{"role": "system", "content": "s"}]}, default_max_tokens=16)
    assert caught.value.message == "messages must include a user or assistant message"


# --- the end user's id: found an email in linear time -----------------------------------------------

_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")  # what the day's code searched with


@pytest.mark.parametrize(
    "user",
    ["u" * 40_000, "7" * 40_000, "a" * 20_000 + "@" + "b" * 20_000, "(1" * 20_000 + "x"],
    ids=["letters", "digits", "an-at-sign", "parentheses"],
)
def test_a_long_user_id_is_read_in_linear_time(user):
    # A regular expression search scanned to the end from every start position: 40,000 characters
    # took 5 s of the worker's loop (400,000: 500 s), for any caller with a key to the chat surface.
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "user": user}
    started = time.perf_counter()
    out, _ = chat_to_messages(body, default_max_tokens=16)
    assert time.perf_counter() - started < 1.0
    assert out["metadata"]["user_id"] in (user, _digest(user))


def _digest(user: str) -> str:
    return "user-" + hashlib.blake2b(user.encode(), digest_size=16).hexdigest()


@given(st.text(alphabet="ab.@ \t1+-", max_size=40))
@settings(max_examples=3000, deadline=None)
def test_the_email_rule_is_the_regular_expressions(text):
    assert anthropic_codec._has_email(text) == (_EMAIL.search(text) is not None)


@pytest.mark.parametrize(
    ("user", "digested"),
    [
        ("a@b.co", True),
        ("name: jo@example.org here", True),
        ("a@b", False),
        ("@b.co", False),
        ("a@.co", False),
        ("user-123-456-7890", False),
        ("550e8400-e29b-41d4-a716-446655440000", False),
        ("+1 555 123 4567", True),
    ],
)
def test_which_ids_are_digested_is_unchanged(user, digested):
    assert (_user_id(user) != user) is digested
