"""SIGHUP against the real process: a reload never leaves egress less specific than the file it ran.

An editor or a config manager that writes the file in place can leave it empty or half written at
the moment the SIGHUP lands. Such a file must be refused, and the running configuration (a
provider moved to a private upstream, the trusted issuers) must keep serving.
"""

from __future__ import annotations

import signal
import threading

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import virtual_key_config
from tests.support import RawClient, request_bytes, wait_until

ISSUER = Ed25519PrivateKey.generate()
LITERAL = "sk-live-abcdef0123456789SECRET"


def events(egress, name: str | None = None) -> list[dict]:
    found = []
    for line in egress.stderr_path.read_bytes().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if name is None or event.get("event") == name:
            found.append(event)
    return found


def reload_outcomes(egress) -> list[dict]:
    return [event for event in events(egress) if event.get("event") in ("reloaded", "reload_failed")]


def sighup(egress, text: str | bytes) -> dict:
    """Write the file as a careless editor would (in place) and reload; returns the outcome event."""
    before = len(reload_outcomes(egress))
    if isinstance(text, str):
        text = text.encode()
    egress.config_path.write_bytes(text)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: len(reload_outcomes(egress)) > before, timeout=5), egress.logs()
    return reload_outcomes(egress)[-1]


def status_at_fake(egress, fake_provider, headers: dict | None = None) -> int:
    """A request for openai, which the running config moved to the fake upstream."""
    seen = len(fake_provider.requests)
    with RawClient(egress.port, timeout=15) as client:
        client.send(request_bytes("GET", "/openai/v1/models", headers))
        status = client.read_response().status
    assert len(fake_provider.requests) == seen + 1, "the request did not reach the fake upstream"
    return status


@pytest.fixture
def keyed(start_egress, fake_provider, ca_file, tmp_path):
    config = virtual_key_config(fake_provider, ca_file, tmp_path, public_key_text(ISSUER.public_key()))
    # The last line is a setting, so every shorter prefix of the file says less.
    config = config.rstrip() + "\n[limits]\nrequests_per_minute = 100000\n"
    egress = start_egress(config)
    egress.config_text = config
    egress.virtual_key = mint(ISSUER, "reload-app")[0]
    assert status_at_fake(egress, fake_provider, {"Authorization": f"Bearer {egress.virtual_key}"}) == 200
    return egress


def still_serving(egress, fake_provider) -> None:
    assert status_at_fake(egress, fake_provider) == 200  # BYO still goes to the moved provider
    assert status_at_fake(egress, fake_provider, {"Authorization": f"Bearer {egress.virtual_key}"}) == 200
    assert fake_provider.requests[-1].header("authorization") == "Bearer sk-pool-test-0123456789"


@pytest.mark.parametrize("text", ["", "\n", "# being rewritten\n"], ids=["empty", "newline", "comment"])
def test_an_empty_file_is_refused_and_the_running_config_keeps_serving(keyed, fake_provider, text):
    outcome = sighup(keyed, text)
    assert outcome["event"] == "reload_failed"
    assert "is empty" in outcome["error"]
    still_serving(keyed, fake_provider)


def test_a_truncated_file_is_refused_and_names_what_is_missing(keyed, fake_provider):
    text = keyed.config_text
    cut = text.index("[providers.openai]") + len("[providers.openai]\n")  # the base_url line is lost
    outcome = sighup(keyed, text[:cut])
    assert outcome["event"] == "reload_failed"
    assert "no longer sets" in outcome["error"] and "providers.openai.base_url" in outcome["error"]
    assert "keys.trusted_issuers" in outcome["error"]
    still_serving(keyed, fake_provider)
    outcome = sighup(keyed, text[: text.index("base_url") + len('base_url = "ht')])  # mid-string
    assert outcome["event"] == "reload_failed" and "invalid TOML" in outcome["error"]
    still_serving(keyed, fake_provider)
    # The whole file again reloads, and a value changed in it takes effect.
    assert sighup(keyed, text.replace("requests_per_minute = 100000", "requests_per_minute = 0"))["event"] == "reloaded"
    still_serving(keyed, fake_provider)


def test_every_prefix_of_the_file_is_refused(keyed, fake_provider):
    text = keyed.config_text
    cuts = sorted({index + 1 for index, char in enumerate(text[:-1]) if char == "\n"} | set(range(0, len(text), 97)))
    for cut in cuts:
        assert sighup(keyed, text[:cut])["event"] == "reload_failed", text[:cut]
    still_serving(keyed, fake_provider)


def test_a_failed_reload_logs_no_secret(keyed, fake_provider):
    text = keyed.config_text.replace(
        f'pool_keys = ["file:{keyed.workdir / "pool.keys"}"]', f'pool_keys = ["{LITERAL}"]', 1
    )
    assert LITERAL in text
    outcome = sighup(keyed, text)
    assert outcome["event"] == "reload_failed"
    assert "providers.openai.pool_keys[0] is not 'env:NAME' or 'file:PATH'" in outcome["error"]
    assert b"SECRET" not in keyed.stderr_path.read_bytes() and b"SECRET" not in keyed.stdout_path.read_bytes()
    still_serving(keyed, fake_provider)


def test_a_reload_storm_while_requests_flow(keyed, fake_provider):
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            with RawClient(keyed.port, timeout=15) as client:
                client.send(request_bytes("GET", "/openai/v1/models"))
                statuses.append(client.read_response().status)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(50):
            keyed.signal(signal.SIGHUP)
    finally:
        wait_until(lambda: len(statuses) >= 50, timeout=10)
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert keyed.process.poll() is None, keyed.logs()
    assert statuses and set(statuses) == {200}
    assert wait_until(lambda: len(reload_outcomes(keyed)) >= 1, timeout=5)
    assert {event["event"] for event in reload_outcomes(keyed)} == {"reloaded"}
    still_serving(keyed, fake_provider)


def test_files_from_other_editors_on_reload(keyed, fake_provider):
    text = keyed.config_text
    windows = b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()  # a byte order mark and CRLF
    assert sighup(keyed, windows)["event"] == "reloaded"
    still_serving(keyed, fake_provider)
    latin1 = text.replace("[limits]", "[limits]\n# d\u00e9bit par minute").encode("latin-1")
    outcome = sighup(keyed, latin1)
    assert outcome["event"] == "reload_failed" and "not UTF-8" in outcome["error"]
    still_serving(keyed, fake_provider)
