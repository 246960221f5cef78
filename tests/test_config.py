"""Strict configuration: unknown keys are errors that name the key; defaults live in config.py."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from egress.config import MAX_CONFIG_BYTES, Config, ConfigError, load_config, parse_config, parse_listen, render_config
from tests.support import egress_command, run_egress_cli


def test_empty_config_is_the_builtin_default():
    config = parse_config({})
    assert config == Config()
    assert config.server.listen == "127.0.0.1:8787"
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert len(config.providers) == 10


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"sever": {}}, "sever"),
        ({"server": {"listen_addr": "x"}}, "server.listen_addr"),
        ({"upstream": {"cafile": "x"}}, "upstream.cafile"),
        ({"providers": {"openai": {"base_uri": "https://x"}}}, "providers.openai.base_uri"),
    ],
)
def test_unknown_keys_are_named(table, named):
    with pytest.raises(ConfigError, match=rf"unknown key '{named}'"):
        parse_config(table)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"server": {"max_connections": "10"}}, "server.max_connections must be a non-negative integer"),
        ({"server": {"header_timeout": 0}}, "server.header_timeout must be a positive number"),
        ({"server": {"listen": "8787"}}, "server.listen must be HOST:PORT"),
        ({"providers": {"mine": {"auth": "bearer"}}}, "providers.mine.base_url is required"),
        ({"providers": {"mine": {"base_url": "ftp://x"}}}, "must be an absolute http"),
        ({"providers": {"mine": {"base_url": "https://x?key=1"}}}, "must not carry a query"),
        ({"providers": {"mine": {"base_url": "https://x", "auth": "basic"}}}, "auth must be 'bearer' or 'x-api-key'"),
        ({"providers": {"mine": {"base_url": "https://x", "dialect": "gemini"}}}, "dialect must be"),
        ({"providers": {"healthz": {"base_url": "https://x"}}}, "'healthz' is reserved"),
        ({"providers": {"Mine": {"base_url": "https://x"}}}, "provider names"),
        ({"providers": {"openai": {"pool_keys": "env:X"}}}, "pool_keys must be a list of sources"),
        ({"providers": {"openai": {"pool_keys": ["sk-literal-key"]}}}, "'env:NAME' or 'file:PATH'"),
        ({"providers": {"openai": {"allow_anonymous": "yes"}}}, "allow_anonymous must be true or false"),
        ({"keys": {"trusted_issuers": ["not-a-key"]}}, r"keys.trusted_issuers\[0\]"),
        ({"nats": {"url": "nats://127.0.0.1:4222"}}, "nats.snapshot is required"),
        # Whatever urlsplit or the origin would raise on later is a ConfigError here, on reload too.
        ({"providers": {"mine": {"base_url": "http://[::1"}}}, "providers.mine.base_url must be an absolute"),
        ({"providers": {"mine": {"base_url": "http://h:99999"}}}, "providers.mine.base_url must be an absolute"),
        ({"providers": {"mine": {"base_url": "http://h:abc"}}}, "providers.mine.base_url must be an absolute"),
        ({"providers": {"mine": {"base_url": "http://h:-1"}}}, "providers.mine.base_url must be an absolute"),
        ({"providers": {"mine": {"base_url": "http://ex\u00e4mple.com"}}}, "host is ASCII"),
        ({"providers": {"mine": {"base_url": "http://h x"}}}, "host is ASCII"),
        # TOML has nan and inf: a nan deadline is never reached, so it would switch a timeout off.
        ({"server": {"header_timeout": float("nan")}}, "server.header_timeout must be a positive number"),
        ({"server": {"body_timeout": float("inf")}}, "server.body_timeout must be a positive number"),
        ({"keys": {"invalid_key_rate": float("nan")}}, "keys.invalid_key_rate must be a positive number"),
    ],
)
def test_invalid_values(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(table)


def test_add_and_override_providers():
    config = parse_config(
        {
            "providers": {
                "local-vllm": {"base_url": "http://127.0.0.1:8000"},
                "openai": {"base_url": "https://openai-proxy.internal:8443"},
            }
        }
    )
    assert config.providers["local-vllm"].origin.port == 8000
    assert config.providers["local-vllm"].dialect == "openai"
    assert config.providers["openai"].origin.host_header == b"openai-proxy.internal:8443"
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com"


def test_rendered_config_parses_back_to_the_same_config():
    config = parse_config(
        {
            "server": {"listen": "[::1]:9000"},
            "nats": {"url": "nats://127.0.0.1:4222", "snapshot": "/tmp/s"},
            "providers": {
                "x": {"base_url": "http://h:1", "pool_keys": ["env:X_KEY"], "allow_anonymous": True},
                "y": {
                    "base_url": "http://h:2",
                    "pool_keys": ["env:Y1", {"name": "team-a", "key": "env:Y2", "max_concurrent": 3}],
                    "max_concurrent": 8,
                    "account_max_concurrent": 2,
                    "queue_timeout": 2.5,
                },
            },
            "routes": [
                {
                    "match": "big-*",
                    "provider": "y",
                    "fallbacks": ["x:small", {"model": "y:medium", "serves": ["tools", "json_mode"]}],
                },
                {"match": "*", "provider": "x"},
            ],
        }
    )
    assert config.routes[0].fallbacks[1].serves == frozenset({"tools", "json_mode"})
    assert config.providers["y"].pool_key_caps == (0, 3)
    assert parse_config(tomllib.loads(render_config(config))) == config


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"max_concurrent": -1}, "providers.y.max_concurrent must be a non-negative integer"),
        ({"queue_timeout": 601}, "providers.y.queue_timeout must be 0 to 600"),
        ({"pool_keys": [{"name": "a", "key": "env:A", "max_concurrent": -2}]}, r"pool_keys\[0\].max_concurrent"),
        ({"pool_keys": [{"name": "a", "key": "env:A", "weight": 2}]}, "unknown key"),
    ],
)
def test_invalid_caps(row, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"providers": {"y": {"base_url": "http://h:2", **row}}})


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        ("openai:gpt-4o", "must be a list"),
        (["nowhere:model"], r"routes\[0\].fallbacks\[0\]: no provider serves 'nowhere:model'"),
        ([{"model": "openai:x", "serves": ["vision"]}], "unknown"),
        ([{"serves": ["tools"]}], "must be a model name"),
        ([{"model": "openai:x", "weight": 1}], "unknown key"),
    ],
)
def test_invalid_fallbacks(fallbacks, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"routes": [{"match": "claude-*", "provider": "anthropic", "fallbacks": fallbacks}]})


def test_parse_listen():
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:8787") == ("::1", 8787)
    with pytest.raises(ConfigError):
        parse_listen("host:99999")


def test_config_check_command(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlisten = "127.0.0.1:9999"\n[providers.vllm]\nbase_url = "http://127.0.0.1:8000"\n')
    result = run_egress_cli("config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert 'listen = "127.0.0.1:9999"' in result.stdout and "[providers.vllm]" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "127.0.0.1:1"\nmax_conections = 5\n')
    result = run_egress_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "unknown key 'server.max_conections'" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[providers.openai]\npool_keys = ["env:EGRESS_TEST_UNSET_POOL_KEY"]\n',
            "providers.openai.pool_keys[0]: environment variable EGRESS_TEST_UNSET_POOL_KEY",
        ),
        ('[usage]\njsonl = "/nonexistent-egress-dir/usage.jsonl"\n', "usage.jsonl /nonexistent-egress-dir/usage.jsonl"),
        ('[nats]\nurl = "http://broker:4222"\nsnapshot = "/tmp/s"\n', "nats.url http://broker:4222 is not nats://"),
        ('[providers.v1]\nbase_url = "http://h:1"\n', "'v1' is reserved"),
    ],
)
def test_config_check_refuses_what_serve_refuses_in_the_same_words(tmp_path, text, message):
    path = tmp_path / "egress.toml"
    path.write_text('[server]\nadmin_listen = "off"\n' + text)
    checked = run_egress_cli("config", "check", str(path))
    served = run_egress_cli("serve", "--config", str(path), "--listen", "127.0.0.1:0", "--workers", "1")
    assert checked.returncode == served.returncode == 2, (checked.stderr, served.stderr)
    assert message in checked.stderr
    assert checked.stderr.splitlines()[-1] == served.stderr.splitlines()[-1]


def test_serve_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nca_file = 5\n")
    result = run_egress_cli("serve", "--config", str(bad))
    assert result.returncode == 2 and "upstream.ca_file must be a string" in result.stderr


def test_deploy_example_states_the_real_defaults():
    with open(Path(__file__).parent.parent / "deploy" / "egress.toml", "rb") as fh:
        example = parse_config(tomllib.load(fh))
    assert example.server == dataclasses.replace(Config().server, listen="0.0.0.0:8787")
    assert example.upstream == Config().upstream
    # allow_byo is the one other key set otherwise: a listener off loopback must not be an open relay.
    assert example.keys == dataclasses.replace(Config().keys, allow_byo=False)
    assert example.nats == Config().nats
    assert example.limits == Config().limits
    assert example.usage == Config().usage


# Reloads: a file may change values and add settings, never say less than the running file.


def _loaded(tmp_path, text: str, name: str = "egress.toml") -> tuple[Config, str]:
    path = tmp_path / name
    path.write_text(text)
    return load_config(str(path)), str(path)


RUNNING = """
[server]
listen = "127.0.0.1:9000"

[keys]
trusted_issuers = ["JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"]

[limits.tiers.batch]
requests_per_minute = 60

[providers.openai]
base_url = "https://openai-gateway.internal"
"""


@pytest.mark.parametrize("text", ["", "\n\n   \n", "# being written\n", "\ufeff"])
def test_an_empty_file_is_refused_on_reload(tmp_path, text):
    running, _ = _loaded(tmp_path, RUNNING, "running.toml")
    path = tmp_path / "new.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"reload refused: .*new\.toml is empty"):
        load_config(str(path), running=running)
    # Even when what runs came from an empty file: an empty file is never a deliberate reload.
    empty, _ = _loaded(tmp_path, "", "empty.toml")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(str(path), running=empty)


@pytest.mark.parametrize(
    ("new", "missing"),
    [
        (
            RUNNING.replace('trusted_issuers = ["JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"]', ""),
            "keys.trusted_issuers",
        ),
        (RUNNING.replace('[keys]\ntrusted_issuers = ["JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"]', ""), "keys"),
        (RUNNING.replace('base_url = "https://openai-gateway.internal"', ""), "providers.openai.base_url"),
        (RUNNING.split("[providers.openai]")[0], "providers.openai"),
        (RUNNING.replace("[limits.tiers.batch]\nrequests_per_minute = 60", ""), "limits.tiers.batch"),
    ],
)
def test_a_reload_that_says_less_is_refused_and_names_what_is_missing(tmp_path, new, missing):
    running, _ = _loaded(tmp_path, RUNNING, "running.toml")
    path = tmp_path / "new.toml"
    path.write_text(new)
    load_config(str(path))  # a valid file on its own: only as a reload is it refused
    with pytest.raises(ConfigError, match=rf"reload refused: .*no longer sets {re.escape(missing)}\b"):
        load_config(str(path), running=running)


def test_every_line_boundary_prefix_of_a_file_is_refused_on_reload(tmp_path):
    text = RUNNING.strip() + "\n"
    running, _ = _loaded(tmp_path, text, "running.toml")
    cuts = [index + 1 for index, char in enumerate(text[:-1]) if char == "\n"]
    path = tmp_path / "new.toml"
    for cut in [0, *cuts]:
        path.write_text(text[:cut])
        with pytest.raises(ConfigError, match=r"reload refused|invalid TOML"):
            load_config(str(path), running=running)


def test_a_reload_may_change_values_and_add_settings(tmp_path):
    running, _ = _loaded(tmp_path, RUNNING, "running.toml")
    changed = (
        RUNNING.replace("openai-gateway.internal", "openai-gateway-2.internal")
        .replace("= 60", "= 0")
        .replace('["JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"]', "[]")
    )
    path = tmp_path / "new.toml"
    path.write_text(changed + '\n[providers.added]\nbase_url = "http://127.0.0.1:1"\n[usage]\nenabled = true\n')
    new = load_config(str(path), running=running)
    assert new.providers["openai"].base_url == "https://openai-gateway-2.internal" and "added" in new.providers
    # Spelled out differently (a dotted key, an inline table), the same settings are the same.
    path.write_text(
        RUNNING.replace(
            "[limits.tiers.batch]\nrequests_per_minute = 60", "[limits]\ntiers.batch = {requests_per_minute = 60}"
        )
    )
    load_config(str(path), running=running)


# Encodings an operator's editor may produce.


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "windows.toml"
    path.write_bytes(b"\xef\xbb\xbf" + RUNNING.replace("\n", "\r\n").encode())
    assert load_config(str(path)).providers["openai"].base_url == "https://openai-gateway.internal"


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\n# caf\u00e9\nlisten = "127.0.0.1:9000"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 \(line 2\)"):
        load_config(str(path))
    result = run_egress_cli("config", "check", str(path))
    assert result.returncode == 2 and "not UTF-8" in result.stderr and "Traceback" not in result.stderr


def test_a_file_over_the_size_bound_is_a_config_error_everywhere(tmp_path):
    """One bound for serve, config check and reload: the supervisor hands a reload's bytes to the
    workers in a buffer of this size (workers.ConfigBox)."""
    path = tmp_path / "huge.toml"
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10) + b'[server]\nlisten = "127.0.0.1:9000"\n')
    with pytest.raises(ConfigError, match="is over 1 MiB"):
        load_config(str(path))
    result = run_egress_cli("config", "check", str(path))
    assert result.returncode == 2 and "is over 1 MiB" in result.stderr and "Traceback" not in result.stderr
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 - 10) + b'[server]\nlisten = "127.0.0.1:9000"\n')
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    assert load_config(str(path)).server.listen == "127.0.0.1:9000"
    assert load_config(str(path), raw=path.read_bytes()) == load_config(str(path))


def test_a_nats_token_a_url_parser_would_read_as_a_host_is_refused_unshown(tmp_path):
    """A base64 token has `/`: unrefused, `nats://TOKEN/x@host` dials TOKEN (and sends it to DNS),
    and `keys revoke` printed it as the broker's name."""
    path = tmp_path / "egress.toml"
    path.write_text(f'[nats]\nurl = "nats://SECRETTOKEN/xyz@127.0.0.1:4222"\nsnapshot = "{tmp_path / "snapshot"}"\n')
    with pytest.raises(ConfigError, match="has a '/', '\\?' or '#'") as refused:
        load_config(str(path))
    assert "SECRETTOKEN" not in str(refused.value)
    for command in (("config", "check", str(path)), ("keys", "revoke", "--config", str(path), "0123456789abcdef")):
        result = run_egress_cli(*command)
        assert result.returncode == 2 and "SECRETTOKEN" not in result.stdout + result.stderr, result.stderr
        assert "nats.url nats://<redacted>@127.0.0.1:4222" in result.stderr, result.stderr
    path.write_text(f'[nats]\nurl = "nats://user:pa55@127.0.0.1:4222"\nsnapshot = "{tmp_path / "snapshot"}"\n')
    assert load_config(str(path)).nats.url == "nats://user:pa55@127.0.0.1:4222"


@pytest.mark.parametrize("width", [63, (1 << 23) + 1, 1 << 40])
def test_a_sketch_width_out_of_bounds_is_refused_not_an_allocation_failure(width):
    with pytest.raises(ConfigError, match=r"sketch_width 64\.\.8388608"):
        parse_config({"limits": {"sketch_width": width}})


def test_a_tier_takes_the_limits_it_leaves_unset_from_the_default_tier():
    config = parse_config(
        tomllib.loads(
            """
[limits]
requests_per_minute = 600
tokens_per_minute = 1000000

[limits.tiers.batch]
requests_per_minute = 60

[limits.tiers.bulk]
tokens_per_minute = 0

[limits.tiers.open]
"""
        )
    )
    tiers = config.limits.tiers
    assert (tiers["batch"].requests_per_minute, tiers["batch"].tokens_per_minute) == (60, 1_000_000)
    assert (tiers["bulk"].requests_per_minute, tiers["bulk"].tokens_per_minute) == (600, 0)  # 0 written: unlimited
    assert tiers["open"] == config.limits.default_tier
    # Still strict: a tier's own keys are checked, not hidden by the defaults it takes.
    with pytest.raises(ConfigError, match=r"unknown key 'limits.tiers.batch.request_per_minute'"):
        parse_config({"limits": {"tokens_per_minute": 5, "tiers": {"batch": {"request_per_minute": 1}}}})
    with pytest.raises(ConfigError, match=r"limits.tiers.batch.tokens_per_minute must be a non-negative integer"):
        parse_config({"limits": {"tokens_per_minute": 5, "tiers": {"batch": {"tokens_per_minute": -1}}}})


# Operator paths never echo a secret: they name its place or its source instead.

LITERAL = "sk-live-abcdef0123456789SECRET"
NATS_PASSWORD = "nats-pw-SECRET-42"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'[providers.openai]\npool_keys = ["env:OK", "{LITERAL}"]\n', r"providers\.openai\.pool_keys\[1\] is not"),
        (f'[providers.openai]\npool_keys = ["{LITERAL}"]\n', r"a literal key\? keys never go in the config file"),
        (f'[providers.openai]\nauth = "Bearer {LITERAL}"\n', "providers.openai.auth must be"),
        (f'[providers.openai]\ndialect = "{LITERAL}"\n', "providers.openai.dialect must be"),
        (f'[providers.mine]\nbase_url = "{LITERAL}"\n', "providers.mine.base_url must be an absolute"),
        (f'[providers.mine]\nbase_url = "ftp://u:{LITERAL}@h"\n', "providers.mine.base_url must be an absolute"),
        (f'[providers.mine]\nbase_url = "https://u:{LITERAL}@h"\n', "must not carry a query, fragment or credentials"),
        (f'[limits]\nbyo_hash_key = "{LITERAL}"\n', "limits.byo_hash_key is not"),
        (f'[keys]\ntrusted_issuers = ["{LITERAL}"]\n', r"keys.trusted_issuers\[0\]"),
    ],
)
def test_config_errors_never_echo_a_secret(tmp_path, text, message):
    path = tmp_path / "leaky.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(str(path))
    assert "SECRET" not in str(raised.value)
    result = run_egress_cli("config", "check", str(path))
    assert result.returncode == 2, result.stdout
    assert "SECRET" not in result.stdout + result.stderr, result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"nats://egress:{NATS_PASSWORD}@nats.internal:4222", "nats://egress:<redacted>@nats.internal:4222"),
        (f"nats://{NATS_PASSWORD}@nats.internal:4222", "nats://<redacted>@nats.internal:4222"),  # a token
        (f"nats://a:{NATS_PASSWORD},@x@n1:4222", "nats://a:<redacted>@n1:4222"),  # unescaped ',' and '@'
        (f"tls://a:{NATS_PASSWORD}@n1", "tls://a:<redacted>@n1"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_a_nats_url_shows_no_credentials(tmp_path, url, shown):
    path = tmp_path / "nats.toml"
    path.write_text(f'[nats]\nurl = "{url}"\nsnapshot = "/tmp/s"\n')
    config = load_config(str(path))
    assert config.nats.url == url  # the connection still gets them
    for text in (repr(config), repr(config.nats), str(config.nats), render_config(config)):
        assert NATS_PASSWORD not in text
    assert f'url = "{shown}"' in render_config(config)
    result = run_egress_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert NATS_PASSWORD not in result.stdout + result.stderr and shown in result.stdout


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 3000 + "1" + "}" * 3000])
def test_a_nested_too_deeply_file_is_a_config_error(tmp_path, value):
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {value}\n")
    with pytest.raises(ConfigError, match="invalid TOML: nested too deeply"):
        load_config(str(path))


# -- values that were accepted, then broke serve ------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"server": {"listen": "127.0.0.1:27301", "admin_listen": "127.0.0.1:27301"}}, "its own"),
        ({"server": {"listen": "0.0.0.0:27301", "admin_listen": "127.0.0.1:27301"}}, "its own"),
        ({"server": {"write_buffer_high": 1 << 31}}, "at most"),
        ({"server": {"max_connections": 0}}, "at least 1"),
        ({"server": {"max_body_bytes": 0}}, "at least 1"),
        ({"server": {"max_header_count": 0}}, "at least 1"),
        ({"keys": {"invalid_key_burst": 0}}, "at least 1"),
        ({"usage": {"queue_size": 0}}, "at least 1"),
        ({"usage": {"keep_files": 0}}, "at least 1"),
        ({"server": {"access_log": ""}}, "must not be empty"),
        ({"usage": {"jsonl": ""}}, "must not be empty"),
        ({"providers": {"lok\u00e1l": {"base_url": "http://127.0.0.1:9"}}}, "lowercase letters"),
        ({"providers": {"x": {"base_url": "http://127.0.0.1:9/\u00e9"}}}, "ASCII"),
        ({"providers": {"x": {"base_url": "http://127.0.0.1:9/a b"}}}, "ASCII"),
        ({"providers": {"x": {"base_url": "http://127.0.0.1:0"}}}, "port 0"),
        ({"providers": {"x": {"base_url": "http://127.0.0.1:9", "api_root": "/v 1"}}}, "api_root"),
        ({"server": {"listen": "127.0.0.1:80\u2078"}}, "server.listen must be HOST:PORT"),
        ({"server": {"admin_listen": "OFF"}}, "server.admin_listen must be HOST:PORT"),
        ({"routes": []}, "routes no model"),
    ],
)
def test_a_value_that_would_break_serve_is_refused_naming_its_key(table, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_config(table)


def test_values_near_the_bounds_still_load():
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:27301", "admin_listen": "127.0.0.1:27302", "max_connections": 1},
            "providers": {"x": {"base_url": "http://127.0.0.1:9/a%20b", "pool_keys": ["env:K"]}},
            "limits": {"tiers": {"Gold Tier": {"requests_per_minute": 5}}},
        }
    )
    assert config.providers["x"].pool_keys == ("env:K",)
    # config check prints TOML that reads back as the same tiers.
    assert "Gold Tier" in tomllib.loads(render_config(config))["limits"]["tiers"]


def test_a_fifo_where_a_file_is_read_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO blocks until a writer comes: config check (a key file) and serve (the deny
    file, before binding) hung on one. Now it is refused as not a regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = tmp_path / "egress.toml"
    path.write_text(f'[providers.openai]\npool_keys = ["file:{fifo}"]\n[keys]\ndeny_file = "{fifo}"\n')
    result = subprocess.run(
        [*egress_command(), "config", "check", str(path)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2, result.stderr
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr
