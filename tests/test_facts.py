"""Usage facts from the real process with the official SDKs, the token limit they feed, the report."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config, virtual_key_config
from tests.support import RawClient, request_bytes, run_egress_cli, wait_until

ISSUER = Ed25519PrivateKey.generate()


@pytest.fixture
def metered(start_egress, fake_provider, ca_file, tmp_path):
    usage_file = tmp_path / "usage.jsonl"
    config = virtual_key_config(
        fake_provider,
        ca_file,
        tmp_path,
        public_key_text(ISSUER.public_key()),
        extra=f"""
[limits.tiers.small]
tokens_per_minute = 30

[usage]
jsonl = "{usage_file}"
""",
    )
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


def facts_of(egress, count: int) -> list[dict]:
    def read() -> list[dict]:
        if not egress.usage_file.exists():
            return []
        return [orjson.loads(line) for line in egress.usage_file.read_bytes().splitlines()]

    assert wait_until(lambda: len(read()) >= count, timeout=3), read()
    return read()


def test_facts_for_both_dialects_json_and_stream(metered):
    key, claims = mint(ISSUER, "billing-app")
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-fake", messages=messages)
    list(
        client.chat.completions.create(
            model="gpt-fake", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    list(client.chat.completions.create(model="gpt-fake", messages=messages, stream=True))
    claude = anthropic.Anthropic(base_url=metered.url + "/anthropic", api_key="sk-ant-byo", max_retries=0)
    claude.messages.create(model="claude-fake", max_tokens=8, messages=messages)
    with claude.messages.stream(model="claude-fake", max_tokens=8, messages=messages) as stream:
        stream.get_final_message()

    facts = facts_of(metered, 5)
    rows = [(f["provider"], f["stream"], f["usage"], f["input_tokens"], f["output_tokens"]) for f in facts]
    assert rows == [
        ("openai", False, "complete", 12, 7),
        ("openai", True, "complete", 12, 6),
        ("openai", True, "complete", 12, 6),  # the caller didn't ask for usage: egress did
        ("anthropic", False, "complete", 12, 7),
        ("anthropic", True, "complete", 12, 6),
    ]
    assert {f["kid"] for f in facts[:3]} == {claims.kid} and facts[0]["subject"] == "billing-app"
    assert facts[0]["identity"] == f"kid:{claims.kid}"
    assert facts[3]["kid"] is None and facts[3]["identity"].startswith("byo:")
    assert "sk-ant-byo" not in metered.usage_file.read_text()
    assert [f["requested_model"] for f in facts] == ["gpt-fake"] * 3 + ["claude-fake"] * 2
    assert [f["model"] for f in facts] == ["gpt-fake"] * 3 + ["claude-fake"] * 2
    assert len({f["request_id"] for f in facts}) == 5
    assert all(f["status"] == 200 and f["ttfb_ms"] > 0 and f["total_ms"] >= f["ttfb_ms"] for f in facts)


def test_cut_and_abandoned_streams_yield_partial_facts(metered, fake_provider):
    body = b'{"model":"gpt-fake","messages":[],"stream":true}'
    with RawClient(metered.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/openai/v1/chat/completions",
                {"Content-Type": "application/json", "x-fake-scenario": "cut-stream"},
                body,
            )
        )
        assert not client.read_response("POST").complete
    with RawClient(metered.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/anthropic/v1/messages",
                {
                    "Content-Type": "application/json",
                    "x-fake-scenario": "long-stream",
                    "x-fake-events": "200",
                    "x-fake-interval": "0.01",
                },
                b'{"model":"claude-fake","messages":[],"stream":true}',
            )
        )
        client.sock.recv(4096)
        time.sleep(0.2)
    facts = facts_of(metered, 2)
    cut, abandoned = facts
    assert (cut["usage"], cut["outcome"], cut["estimated_output_tokens"]) == ("partial", "upstream_cut", 1)
    assert abandoned["usage"] == "partial" and abandoned["outcome"] == "client_gone"
    assert abandoned["estimated_output_tokens"] > 0


def test_token_limit_fed_by_the_meter(metered):
    key, _ = mint(ISSUER, "small-app", tier="small")  # 30 tokens a minute; each call costs 12 + 7
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-fake", messages=messages)
    facts_of(metered, 1)  # the fact, and so the token count, lands after the response
    client.chat.completions.create(model="gpt-fake", messages=messages)
    facts_of(metered, 2)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-fake", messages=messages)
    headers = raised.value.response.headers
    assert raised.value.code == "rate_limited"
    assert headers["x-ratelimit-limit-tokens"] == "30" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["retry-after"]) >= 1


def test_usage_report(metered):
    key, _ = mint(ISSUER, "report-app")
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    facts_of(metered, 3)
    duplicate = metered.usage_file.read_bytes().splitlines()[0]
    with open(metered.usage_file, "ab") as fh:  # a republished fact is billed once
        fh.write(duplicate + b"\n" + b'{"half a line')
    result = run_egress_cli("usage", "report", "--config", str(metered.config_path), "--by", "subject", "--json")
    assert result.returncode == 0, result.stderr
    totals = orjson.loads(result.stdout)
    assert totals["report-app"]["requests"] == 3
    assert totals["report-app"]["input_tokens"] == 36 and totals["report-app"]["output_tokens"] == 21
    table = run_egress_cli("usage", "report", "--file", str(metered.usage_file), "--by", "model", "--since", "1h")
    assert table.returncode == 0 and "gpt-fake" in table.stdout and "input_tokens" in table.stdout


def test_facts_reach_a_real_nats_server_once_each(start_egress, fake_provider, ca_file, tmp_path, nats_server):
    import asyncio

    import nats

    config = provider_config(
        fake_provider,
        ca_file,
        extra=f"""
[nats]
url = "{nats_server.url}"
snapshot = "{tmp_path / "revocations.snapshot"}"

[usage]
nats_publish = true
nats_stream = "EGRESS_USAGE_TEST"
""",
    )
    egress = start_egress(config)
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key="sk-byo-nats", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])

    async def stream_contents() -> list[tuple[str, dict]]:
        connection = await nats.connect(nats_server.url)
        try:
            js = connection.jetstream()
            subscription = await js.pull_subscribe("egress.usage.>", stream="EGRESS_USAGE_TEST")
            messages = await subscription.fetch(10, timeout=1)
            result = [(message.subject, orjson.loads(message.data)) for message in messages]
            for message in messages:
                await message.ack()
            # A republished fact (same request id) is stored once.
            duplicate = result[0][1]
            await js.publish(
                "egress.usage.openai", orjson.dumps(duplicate), headers={"Nats-Msg-Id": duplicate["request_id"]}
            )
            info = await js.stream_info("EGRESS_USAGE_TEST")
            return result, info.state.messages
        finally:
            await connection.close()

    def published() -> bool:
        return egress.stderr_path.read_bytes().count(b"usage_publisher_connected") >= 1

    assert wait_until(published, timeout=5)
    result: list = []
    stored = 0

    def three_arrived() -> bool:
        nonlocal result, stored
        result, stored = asyncio.run(stream_contents())
        return len(result) >= 3

    assert wait_until(three_arrived, timeout=5, interval=0.2)
    assert [subject for subject, _ in result] == ["egress.usage.openai"] * 3
    assert {fact["usage"] for _, fact in result} == {"complete"}
    assert [fact["input_tokens"] for _, fact in result] == [12, 12, 12]
    assert stored == 3
    assert "sk-byo-nats" not in str(result)


def test_report_reads_every_workers_file_and_rotation(tmp_path):
    from egress.facts import worker_path
    from egress.report import aggregate, files_of

    base = str(tmp_path / "usage.jsonl")
    assert worker_path(base, 1) == str(tmp_path / "usage-w1.jsonl")
    written = {
        worker_path(base, 0): ["a", "b"],
        worker_path(base, 0) + ".1": ["c"],
        worker_path(base, 1): ["d", "a"],  # "a" twice: billed once
    }
    for path, ids in written.items():
        lines = [
            orjson.dumps({"ts": time.time(), "request_id": i, "provider": "openai", "input_tokens": 1}) for i in ids
        ]
        Path(path).write_bytes(b"\n".join(lines) + b"\n")
    assert sorted(files_of(base)) == sorted(written)
    assert aggregate(files_of(base), 0, "provider")["openai"]["requests"] == 4
