"""Framing decisions and header blocks, without sockets; every block egress writes must parse in h11."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress import http1
from egress.errors import EgressError

HOST = (b"Host", b"egress.test")

REQUEST_CASES = [
    # headers, version, expected error code (None: accepted)
    ([HOST], "1.1", None),
    ([], "1.0", None),
    ([], "1.1", "bad_request"),
    ([HOST, HOST], "1.1", "bad_request"),
    ([HOST, (b"Transfer-Encoding", b"chunked")], "1.1", None),
    ([HOST, (b"Transfer-Encoding", b"Chunked ")], "1.1", None),
    ([HOST, (b"Transfer-Encoding", b",chunked")], "1.1", "bad_request"),
    ([HOST, (b"Transfer-Encoding", b"gzip, chunked")], "1.1", "bad_request"),
    ([HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "1.1", "bad_request"),
    ([(b"Transfer-Encoding", b"chunked")], "1.0", "bad_request"),
    ([HOST, (b"Content-Length", b"12")], "1.1", None),
    ([HOST, (b"Content-Length", b"-1")], "1.1", "bad_request"),
    ([HOST, (b"Content-Length", b"1"), (b"Content-Length", b"1")], "1.1", "bad_request"),
    ([HOST, (b"Expect", b"100-continue")], "1.1", None),
    ([HOST, (b"Expect", b"something-else")], "1.1", "expectation_failed"),
    ([HOST], "2.0", "http_version_not_supported"),
    ([HOST], "0.9", "http_version_not_supported"),
]


@pytest.mark.parametrize(("headers", "version", "code"), REQUEST_CASES)
def test_inspect_request(headers, version, code):
    if code is None:
        http1.inspect_request(headers, version)
    else:
        with pytest.raises(EgressError) as raised:
            http1.inspect_request(headers, version)
        assert raised.value.code == code


def test_request_headers_forwarded_without_hop_by_hop():
    facts = http1.inspect_request(
        [
            HOST,
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Content-Length", b"2"),
            (b"Expect", b"100-continue"),
            (b"Authorization", b"Bearer byo"),
            (b"anthropic-beta", b"x"),
        ],
        "1.1",
    )
    assert facts.forward_headers == [(b"authorization", b"Bearer byo"), (b"anthropic-beta", b"x")]
    assert facts.content_length == 2 and facts.expect_continue and not facts.close_requested


def test_connection_close_is_noticed():
    assert http1.inspect_request([HOST, (b"Connection", b"Close")], "1.1").close_requested


def test_inspect_response_filters_and_refuses_split_headers():
    facts = http1.inspect_response(
        [
            (b"Content-Type", b"text/event-stream"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"x-a"),
            (b"X-A", b"1"),
            (b"x-request-id", b"req_1"),
            (b"Keep-Alive", b"timeout=5"),
        ]
    )
    assert facts.headers == [(b"Content-Type", b"text/event-stream"), (b"x-request-id", b"req_1")]
    assert facts.content_length is None
    for bad in (b"a\rb", b"a\nb", b"a\x00b"):
        with pytest.raises(EgressError) as raised:
            http1.inspect_response([(b"X", bad)])
        assert raised.value.code == "upstream_protocol_error"


def test_inspect_response_keeps_the_named_headers_in_the_same_pass():
    from egress.hints import HINT_NAMES, read_hints

    head = [
        (b"Content-Type", b"application/json"),
        (b"X-RateLimit-Remaining-Requests", b"7"),
        (b"retry-after", b"2"),
        (b"Connection", b"keep-alive"),
        (b"x-request-id", b"req_1"),
    ]
    facts = http1.inspect_response(head, HINT_NAMES)
    # Relayed as they came; the hints listed apart, lower-cased, for read_hints.
    assert facts.headers == [head[0], head[1], head[2], head[4]]
    assert facts.kept == [(b"x-ratelimit-remaining-requests", b"7"), (b"retry-after", b"2")]
    assert read_hints(facts.kept, 0.0) == read_hints(head, 0.0)
    assert http1.inspect_response(head).kept == []  # nothing named: nothing kept


@pytest.mark.parametrize(
    ("status", "head", "length", "http11", "framing"),
    [
        (200, False, 10, True, http1.CONTENT_LENGTH),
        (200, False, None, True, http1.CHUNKED),
        (200, False, None, False, http1.UNTIL_CLOSE),
        (200, True, 10, True, http1.NO_BODY),
        (204, False, None, True, http1.NO_BODY),
        (304, False, 10, True, http1.NO_BODY),
    ],
)
def test_response_framing(status, head, length, http11, framing):
    assert http1.response_framing(status, head, length, http11) == framing


def _parse_with_h11(data: bytes, method: str = "GET", http11: bool = True):
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(method=method, target="/", headers=[("host", "x")], http_version="1.1" if http11 else "1.0")
    )
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(b"")
            continue
        events.append(event)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return events, client


@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("framing", [http1.CONTENT_LENGTH, http1.CHUNKED])
def test_response_head_parses_in_h11(framing, keep_alive):
    body = b"hello"
    head = http1.response_head(
        200,
        [(b"Content-Type", b"text/plain")],
        framing,
        len(body) if framing == http1.CONTENT_LENGTH else None,
        b"rid1",
        keep_alive,
        True,
    )
    payload = body if framing == http1.CONTENT_LENGTH else b"5\r\nhello\r\n0\r\n\r\n"
    events, client = _parse_with_h11(head + payload)
    response, data, end = events[0], events[1], events[2]
    assert response.status_code == 200 and data.data == body and isinstance(end, h11.EndOfMessage)
    assert (b"x-egress-request-id", b"rid1") in response.headers
    assert client.their_state is (h11.DONE if keep_alive else h11.MUST_CLOSE)
    assert ((b"connection", b"close") in response.headers) is not keep_alive


def test_simple_response_for_http10_keep_alive_and_head():
    data = http1.simple_response(404, b"{}", b"rid", keep_alive=True, client_http11=False)
    # h11 only plays an HTTP/1.1 client; an HTTP/1.0 keep-alive answer must say so explicitly.
    assert b"\r\nconnection: keep-alive\r\n" in data and data.endswith(b"\r\n\r\n{}")
    head_only = http1.simple_response(200, b"{}", b"rid", keep_alive=True, head_request=True)
    assert head_only.endswith(b"\r\n\r\n") and b"content-length: 2" in head_only
    events, _ = _parse_with_h11(head_only, method="HEAD")
    assert isinstance(events[-1], h11.EndOfMessage)


def test_upstream_request_head():
    head = http1.upstream_request_head(b"POST", b"/v1/x?y=1", b"api.test", [(b"authorization", b"Bearer k")], 5)
    assert head == (
        b"POST /v1/x?y=1 HTTP/1.1\r\nhost: api.test\r\nauthorization: Bearer k\r\ncontent-length: 5\r\n\r\n"
    )


header_name = st.binary(min_size=0, max_size=20)
header_value = st.binary(min_size=0, max_size=40)


@given(st.lists(st.tuples(header_name, header_value), max_size=12), st.sampled_from(["1.0", "1.1", "2.0"]))
def test_inspect_request_accepts_or_refuses_never_crashes(headers, version):
    try:
        http1.inspect_request(headers, version)
    except EgressError as error:
        assert 400 <= error.status < 600


@given(st.lists(st.tuples(header_name, header_value), max_size=12))
def test_inspect_response_accepts_or_refuses_never_crashes(headers):
    try:
        http1.inspect_response(headers)
    except EgressError as error:
        assert error.code == "upstream_protocol_error"


@pytest.mark.parametrize(
    ("value", "narrowed"),
    [
        (b"gzip, deflate", b"gzip, deflate"),
        (b"gzip, deflate, br, zstd", b"gzip, deflate"),
        (b"br;q=1.0, gzip;q=0.8, *;q=0.1", b"gzip;q=0.8, gzip;q=0.1, deflate;q=0.1"),
        (b"br", b""),
        (b"identity", b"identity"),
        (b"GZIP , x-gzip", b"GZIP, x-gzip"),
    ],
)
def test_accept_encoding_is_narrowed_to_what_the_meter_decodes(value, narrowed):
    from egress.http1 import narrow_accept_encoding

    assert narrow_accept_encoding(value) == narrowed
    facts = http1.inspect_request([(b"Host", b"a"), (b"Accept-Encoding", value)], "1.1")
    expected = [(b"accept-encoding", narrowed)] if narrowed else []
    assert [h for h in facts.forward_headers if h[0] == b"accept-encoding"] == expected


def test_the_callers_request_id_is_noted_and_forwarded():
    facts = http1.inspect_request([HOST, (b"X-Request-Id", b"app-1"), (b"Accept", b"*/*")], "1.1")
    assert facts.request_id == b"app-1"
    assert (b"x-request-id", b"app-1") in facts.forward_headers
    assert http1.inspect_request([HOST], "1.1").request_id is None
