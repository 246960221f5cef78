"""Pool keys never show themselves."""

from __future__ import annotations

import pickle

import pytest

from egress.secrets import Secret, SecretSourceError, load_secrets

VALUE = b"sk-pool-very-secret-0123456789"


def test_secret_never_shows_its_value():
    secret = Secret(VALUE, "env:POOL")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret), repr([secret])):
        assert "sk-pool" not in shown and "redacted" in shown
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_equals_and_wipe():
    secret = Secret(VALUE, "env:POOL")
    assert secret.equals(VALUE) and not secret.equals(b"other")
    secret.wipe()
    assert bytes(secret.reveal()) == b"\x00" * len(VALUE)


def test_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("EGRESS_TEST_POOL_KEY", "sk-from-env\n")
    assert load_secrets("env:EGRESS_TEST_POOL_KEY")[0].equals(b"sk-from-env")
    keys = tmp_path / "keys"
    keys.write_bytes(b"# pool\nsk-one\n\n sk-two \n")
    assert [bytes(s.reveal()) for s in load_secrets(f"file:{keys}")] == [b"sk-one", b"sk-two"]


@pytest.mark.parametrize("source", ["env:EGRESS_TEST_UNSET_VARIABLE", "file:/nonexistent/keys"])
def test_bad_sources_name_the_source_only(source):
    with pytest.raises(SecretSourceError) as raised:
        load_secrets(source)
    assert source.split(":", 1)[1] in str(raised.value)


@pytest.mark.parametrize("source", ["sk-live-abcdef0123456789SECRET", "vault:SECRET", "sk:SECRET", "SECRET"])
def test_a_source_that_is_no_source_is_never_echoed(source):
    # Whatever is not env:/file: may be the key itself, pasted where its source belongs.
    with pytest.raises(SecretSourceError, match="a literal key\\? keys never go in the config file") as raised:
        load_secrets(source)
    assert "SECRET" not in str(raised.value) and "SECRET" not in repr(raised.value)
