"""Strict configuration: unknown keys are errors that name the key; defaults live in config.py."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from egress.config import Config, ConfigError, parse_config, parse_listen, render_config
from tests.support import run_egress_cli


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
        ({"providers": {"healthz": {"base_url": "https://x"}}}, "provider names"),
        ({"providers": {"Mine": {"base_url": "https://x"}}}, "provider names"),
        ({"providers": {"openai": {"pool_keys": "env:X"}}}, "pool_keys must be a list of strings"),
        ({"providers": {"openai": {"pool_keys": ["sk-literal-key"]}}}, "'env:NAME' or 'file:PATH'"),
        ({"providers": {"openai": {"allow_anonymous": "yes"}}}, "allow_anonymous must be true or false"),
        ({"keys": {"trusted_issuers": ["not-a-key"]}}, r"keys.trusted_issuers\[0\]"),
        ({"nats": {"url": "nats://127.0.0.1:4222"}}, "nats.snapshot is required"),
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
            "providers": {"x": {"base_url": "http://h:1", "pool_keys": ["env:X_KEY"], "allow_anonymous": True}},
        }
    )
    assert parse_config(tomllib.loads(render_config(config))) == config


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
    assert example.keys == Config().keys
    assert example.nats == Config().nats
    assert example.limits == Config().limits
    assert example.usage == Config().usage
