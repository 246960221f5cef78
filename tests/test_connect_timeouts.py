"""A connect that times out sent nothing: it goes to a fallback, never again to the same host."""

from __future__ import annotations

import time

import openai
import pytest

from egress.vkeys import public_key_text
from tests.test_fallbacks import ISSUER, OPENAI_POOL, sdk, upstream_calls
from tests.test_upstream_review import dropping_syns

HI = [{"role": "user", "content": "hi"}]


def dead_config(ca_file, tmp_path, address: tuple[str, int], keys: int = 1, extra: str = "", fallback: str = "") -> str:
    """A `dead` provider at `address` (which drops SYNs), with `keys` pool keys and the route
    `gpt-dead` to it (with `fallback`, when given); `extra`: more tables."""
    for index in range(keys):
        (tmp_path / f"dead{index}.key").write_text(f"sk-dead-pool-key-{index}-0123456789\n")
    pool_keys = ", ".join(f'"file:{tmp_path / f"dead{index}.key"}"' for index in range(keys))
    host, port = address
    fallbacks = f'fallbacks = ["{fallback}"]\n' if fallback else ""
    return f"""
[upstream]
ca_file = "{ca_file}"
connect_timeout = 1.0

[accounts]
max_attempts = 3

[providers.dead]
base_url = "https://{host}:{port}"
pool_keys = [{pool_keys}]
{extra}
[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "gpt-dead"
provider = "dead"
{fallbacks}"""


def test_a_provider_whose_connect_times_out_falls_back(start_egress, fake_provider, ca_file, tmp_path):
    # The first route's provider drops SYNs: its connect times out, nothing was sent. Before, a
    # timeout was never retried (the provider might be generating), so the caller got a 504 while
    # the route's fallback was healthy; a connect timeout is a connect failure (Envoy's
    # connect-failure), and the request goes on to the fallback.
    (tmp_path / "openai.key").write_text(OPENAI_POOL + "\n")
    openai_row = f'\n[providers.openai]\nbase_url = "{fake_provider.base_url}"\n'
    openai_row += f'pool_keys = ["file:{tmp_path / "openai.key"}"]\n'
    with dropping_syns() as address:
        egress = start_egress(dead_config(ca_file, tmp_path, address, extra=openai_row, fallback="openai:gpt-fake"))
        started = time.monotonic()
        answer = sdk(egress).chat.completions.create(model="gpt-dead", messages=HI)
        took = time.monotonic() - started
    assert answer.model == "gpt-fake"
    assert [call[:2] for call in upstream_calls(fake_provider)] == [("chat", "gpt-fake")]
    assert 0.9 <= took < 5.0  # one connect timeout, then the fallback


@pytest.mark.parametrize("keys", [1, 2])
def test_a_connect_timeout_with_no_fallback_waits_once(start_egress, ca_file, tmp_path, keys):
    # Another account of the provider shares its host: sent there, or to the same one after a
    # back-off, the request waited connect_timeout again for each of max_attempts.
    with dropping_syns() as address:
        egress = start_egress(dead_config(ca_file, tmp_path, address, keys=keys))
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            sdk(egress).chat.completions.create(model="gpt-dead", messages=HI)
        took = time.monotonic() - started
    assert raised.value.status_code == 504
    assert raised.value.body["code"] == "upstream_timeout"
    assert 0.9 <= took < 1.9  # one connect_timeout, not one per attempt (two: 2 s and more)


def test_a_byo_connect_timeout_is_answered_after_one_wait(start_egress, tmp_path):
    with dropping_syns() as (host, port):
        egress = start_egress(
            f"""
[upstream]
connect_timeout = 1.0

[providers.dead]
base_url = "http://{host}:{port}"

[[routes]]
match = "gpt-dead"
provider = "dead"
"""
        )
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-callers-own-key", max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="gpt-dead", messages=HI)
        took = time.monotonic() - started
    assert raised.value.status_code == 504
    assert 0.9 <= took < 1.9
