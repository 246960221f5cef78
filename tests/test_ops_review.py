"""Operator tools and secret hygiene, from a review: what an operator or a caller hit and called a bug.

- A provider that names a model longer than a tally record can hold (an OpenAI-compatible server
  echoes the caller's `model`) raised out of the log phase: the usage fact was lost, the keep-alive
  connection cut.
- `egress usage report` read each file whole into memory.
- A pool key set in the environment as bytes that are not UTF-8 crashed `config check` and `serve`
  with a traceback; a key file's byte order mark was sent as part of the key; a key no header can
  carry (a control character, "Bearer " pasted in front) passed every check and was refused by the
  provider once traffic came.
"""

from __future__ import annotations

import os
import subprocess
import time
import tracemalloc
from pathlib import Path

import orjson

from egress import report
from egress.metrics import MODEL_LABEL_MAX, Metrics
from egress.secrets import load_secrets
from egress.tally import Tally, read_slabs, slab_bytes
from egress.usage import Usage
from tests.support import RawClient, ScriptedUpstream, egress_command, request_bytes, samples, value

# --- a provider's model name, however long ----------------------------------------------------


def _completion(model: str) -> bytes:
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


def test_a_provider_naming_a_huge_model_still_gets_its_fact_and_keeps_the_connection(start_egress, tmp_path):
    """llama.cpp's server answers with the `model` the caller sent, whatever it is: a 70 KB name
    made the token metric's tally key too long for its record (a u16 length), and the struct.error
    ended the log phase before the usage fact was written (a caller could use without a bill) and
    cut the keep-alive connection under the next request."""
    long_model = "m-" + "a" * 70_000
    upstream = ScriptedUpstream([_completion(long_model), _completion("gpt-4o")])
    usage_file = tmp_path / "usage.jsonl"
    try:
        egress = start_egress(
            f"""
[usage]
jsonl = "{usage_file}"

[providers.openai]
base_url = "{upstream.base_url}"
"""
        )
        body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
        with RawClient(egress.port) as client:
            for _ in range(2):  # both on one keep-alive connection
                client.send(
                    request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": "Bearer sk-byo-1"}, body)
                )
                assert client.read_response("POST").status == 200
        deadline = time.monotonic() + 5
        facts: list[dict] = []
        while time.monotonic() < deadline and len(facts) < 2:
            facts = [orjson.loads(line) for line in usage_file.read_bytes().splitlines()] if usage_file.exists() else []
            time.sleep(0.05)
        assert [fact["input_tokens"] for fact in facts] == [3, 3], egress.logs()
        assert facts[0]["model"] == long_model[:200]  # as the provider said, to MODEL_FIELD's 200 characters
        assert b"internal_error" not in egress.stderr_path.read_bytes()
        found = samples(egress.admin_port)
        assert value(found, "egress_tokens_total", provider="openai", model=long_model[:200], kind="input") == 3
        assert value(found, "egress_tokens_total", provider="openai", model="gpt-4o", kind="input") == 3
    finally:
        upstream.stop()


def test_a_model_name_too_long_for_a_label_is_counted_as_other():
    """A label is bounded like the cap on models: 50 names of 60 KB filled a worker's 512 KiB of
    keys, and every metric key made after them (a new error code, a new provider) was lost."""
    tally = Tally(bytearray(slab_bytes(4096, 1 << 19)))
    metrics = Metrics(tally)
    for index in range(50):
        metrics.observe_usage("local", Usage(model=f"{index}-" + "x" * 60_000, input_tokens=1))
    metrics.observe_usage("local", Usage(model="y" * MODEL_LABEL_MAX, input_tokens=2))
    tally.add(("errors", "local", "bad_request"))
    (slab,) = read_slabs(memoryview(tally._buffer), 1)
    assert slab.overflow == 0
    assert slab.counters[("tokens", "local", "other")][0] == 50
    assert slab.counters[("tokens", "local", "y" * MODEL_LABEL_MAX)][0] == 2
    assert slab.counters[("errors", "local", "bad_request")] == [1]


def test_a_key_too_long_for_a_tally_record_is_overflow_not_an_exception():
    tally = Tally(bytearray(slab_bytes(4096, 1 << 19)))
    tally.add(("tokens", "p", "z" * 70_000))  # raised struct.error ("ushort format requires ...")
    tally.add(("kept",), 2)
    (slab,) = read_slabs(memoryview(tally._buffer), 1)
    assert slab.overflow == 1 and slab.counters == {("kept",): [2]}


# --- usage report: memory ---------------------------------------------------------------------


def _facts(path: Path, count: int, pad: int = 0, start: int = 0) -> None:
    with open(path, "ab") as fh:
        for index in range(start, start + count):
            fact = {"ts": time.time(), "request_id": f"r{index}", "provider": "openai", "input_tokens": 1}
            if pad:
                fact["path"] = "/openai/" + "p" * pad
            fh.write(orjson.dumps(fact) + b"\n")


def test_the_report_holds_a_chunk_of_a_file_not_the_file(tmp_path):
    """A 64 MiB usage file (the default rotate_bytes; an operator may set gigabytes) took twice its
    size in memory: the file read whole, then split whole into lines."""
    path = tmp_path / "usage.jsonl"
    _facts(path, 16_000, pad=4000)
    assert path.stat().st_size >= 64_000_000
    tracemalloc.start()
    try:
        totals = report.aggregate([str(path)], 0, "provider")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert totals["openai"]["requests"] == 16_000
    assert peak < 48 << 20, f"peak {peak >> 20} MiB for a {path.stat().st_size >> 20} MiB file"


def test_the_report_counts_facts_across_chunks_and_skips_an_overlong_line(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(report, "MAX_LINE_BYTES", 10_000)
    path = tmp_path / "usage.jsonl"
    _facts(path, 100, pad=300)  # lines cut across chunks
    with open(path, "ab") as fh:
        fh.write(b"{" + b"x" * 50_000 + b"\n")  # not a fact, and longer than any: counted, not held
    _facts(path, 100, pad=300, start=100)
    with open(path, "ab") as fh:
        fh.write(orjson.dumps({"ts": time.time(), "request_id": "last", "provider": "openai"}))  # no newline yet
    skipped: dict[str, int] = {}
    totals = report.aggregate([str(path)], 0, "provider", skipped, relist=lambda: [str(path)])
    assert totals["openai"]["requests"] == 201
    assert skipped == {str(path): 1}


# --- pool keys: odd bytes -----------------------------------------------------------------------


def _config_check(tmp_path: Path, source: str, env: dict | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "egress.toml"
    config.write_text(f'[providers.openai]\npool_keys = ["{source}"]\n')
    environment = {**os.environb, **(env or {})}
    return subprocess.run(
        [*egress_command(), "config", "check", str(config)], capture_output=True, env=environment, timeout=30
    )


def test_a_pool_key_in_the_environment_that_is_not_utf8_is_a_config_error_not_a_traceback(tmp_path):
    result = _config_check(tmp_path, "env:EGRESS_ODD_KEY", {b"EGRESS_ODD_KEY": b"sk-SECRET\xff-tail"})
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"env:EGRESS_ODD_KEY holds a byte that is not ASCII" in result.stderr
    assert b"SECRET" not in result.stderr + result.stdout


def test_a_key_files_byte_order_mark_is_no_part_of_the_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xef\xbb\xbfsk-first\r\n  # a comment, indented\r\nsk-second\r\n")
    assert [bytes(secret.reveal()) for secret in load_secrets(f"file:{keys}")] == [b"sk-first", b"sk-second"]


def test_a_pool_key_no_header_can_carry_is_refused_by_line_never_shown(tmp_path):
    """Passed before: config check said OK, serve started, and the provider refused the key (or
    the request) once traffic came, with the account then disabled."""
    cases = {
        b"sk-good\nBearer sk-SECRET-one\n": b"line 2 holds a space or tab",
        b"sk-SECRET\x01two\n": b"line 1 holds a control character",
        b"# keys\nsk-SECRET-three\xc2\xa0\n": b"line 2 holds a byte that is not ASCII",
    }
    for number, (content, said) in enumerate(cases.items()):
        keys = tmp_path / f"keys-{number}"
        keys.write_bytes(content)
        keys.chmod(0o600)
        result = _config_check(tmp_path, f"file:{keys}")
        assert result.returncode == 2, (content, result.stderr)
        assert said in result.stderr and str(keys).encode() in result.stderr, result.stderr
        assert b"SECRET" not in result.stderr + result.stdout
    doctor = subprocess.run(
        [*egress_command(), "doctor", "--json", "--config", str(tmp_path / "egress.toml")],
        capture_output=True,
        timeout=30,
    )
    document = orjson.loads(doctor.stdout)
    assert doctor.returncode == 2 and document["status"] == "fail"
    assert b"SECRET" not in doctor.stdout + doctor.stderr
