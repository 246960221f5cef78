"""Configuration: every default in one place, parsed strictly from TOML into frozen dataclasses.

Contract: `load_config(path)` / `parse_config(table)` return a `Config` or raise `ConfigError` whose
message names the offending key. Unknown keys are errors, never ignored: a typo in an operator's
file must not silently fall back to a default.

Reload rule: `load_config(path, running=config)` also refuses a file that is empty, or that no
longer sets a table or key the running file set (`Config.settings`). A file caught half written
would otherwise reload as defaults: providers back on their public hosts, no trusted issuers. A
reload changes values and adds settings; dropping one takes a restart.

No message, repr or rendering shows a secret: values that may be one (pool-key sources, URLs) are
named by their place in the file, and credentials in URLs print as <redacted>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from egress.errors import EgressError
from egress.providers import BUILTIN_PROVIDERS, RESERVED_NAMES, STREAM_USAGE_MODES, Provider
from egress.routes import CAPABILITIES, DEFAULT_ROUTES, Fallback, ModelRoute, ModelRoutes
from egress.secrets import BOM, read_regular_file
from egress.vkeys import parse_public_key

KiB = 1024
MiB = 1024 * KiB


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8787"
    # Worker processes sharing the port (SO_REUSEPORT); 0: one per CPU.
    workers: int = 0
    # Refuse new connections past this many (503, then close); open streams are never touched.
    max_connections: int = 10_000
    # "stdout", "stderr", "off", or a file path.
    access_log: str = "stdout"
    drain_timeout: float = 30.0
    # A slowloris client must not hold a connection: the whole head must arrive within this.
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 30.0
    # A client whose write buffer stays above the high-water mark this long (it stopped reading)
    # is cut, as nginx's send_timeout (60 s) does: otherwise it pins its connection, its upstream
    # and a buffer's worth of memory forever.
    send_timeout: float = 60.0
    # Anthropic's own Messages API cap is 32 MB (docs.claude.com/en/api/errors).
    max_body_bytes: int = 32 * MiB
    # Request-target cap; 8 KiB like nginx's large_client_header_buffers and tomcat.
    max_request_line_bytes: int = 8 * KiB
    max_header_bytes: int = 32 * KiB
    max_header_count: int = 100
    # Metrics, health and readiness, apart from the traffic; "off" disables it.
    admin_listen: str = "127.0.0.1:9464"
    # Set explicitly: uvloop's defaults differ from what asyncio documents.
    write_buffer_high: int = 256 * KiB
    write_buffer_low: int = 64 * KiB


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    ca_file: str | None = None
    connect_timeout: float = 10.0
    # Long: a non-streaming completion of a reasoning model can take minutes before its first byte.
    first_byte_timeout: float = 600.0
    read_idle_timeout: float = 300.0
    max_idle_per_origin: int = 64
    # Below the ~60-90 s after which provider load balancers drop idle connections.
    pool_idle_timeout: float = 45.0
    dns_ttl: float = 60.0
    # GET /v1/models of a routed provider whose row names no `models`: its own list, fetched with a
    # pool key in the background every this many seconds (catalog.py), each fetch bounded by the timeout.
    model_list_refresh: float = 600.0
    model_list_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AccountsConfig:
    # Every upstream attempt of one request, across its provider's accounts (accounts.py).
    max_attempts: int = 3
    # Host-wide: retries at most this share of pooled requests over `retry_window` seconds, plus
    # `retry_floor` a window, so a failing provider gets no retry storm and a quiet host can retry.
    retry_budget: float = 0.2
    retry_floor: int = 3
    retry_window: float = 10.0
    # A pooled 2xx stream is held until its first event (an error there is retried); at most this.
    first_event_timeout: float = 2.0
    # The longest an account rests on a provider's word (retry-after, a spent quota's reset): one
    # bad header of up to a year (hints.MAX_WAIT) benched the key until a restart. A reload ends
    # longer rests at the new bound. Between 1 s and a year.
    max_cooldown: float = 3600.0


@dataclass(frozen=True, slots=True)
class KeysConfig:
    # Ed25519 public keys (base64url, as `egress keys issuer-new` prints them) whose virtual keys
    # are accepted. Several at once, so an issuer can be rotated without a flag day.
    trusted_issuers: tuple[str, ...] = ()
    # Revoked key ids, one per line; reloaded on SIGHUP and when its mtime changes.
    deny_file: str | None = None
    deny_poll_interval: float = 1.0
    # Verified keys kept (by hash) so the steady state costs a dict look-up, not a signature check.
    verify_cache_size: int = 65_536
    # A key whose `iat` is further in the future than this is refused (key_not_yet_valid), as JWT
    # validators refuse a future `nbf`; the allowance covers clocks that disagree a little.
    clock_skew: float = 60.0
    # Failed signature verifications (about 0.1-0.3 ms of CPU each) allowed per client address: a
    # token bucket refilled at this rate per second, holding at most `invalid_key_burst`. Past it,
    # unknown `bai_` keys from that address get 429 too_many_invalid_keys without a verification.
    # The bucket is per worker process: with N workers an address may fail N x burst (auth.py).
    invalid_key_rate: float = 2.0
    invalid_key_burst: int = 20
    # Any credential that is not a virtual key is the caller's own provider key, passed through
    # (BYO). False refuses it (401 byo_not_allowed): every request then bills through a virtual key.
    allow_byo: bool = True


@dataclass(frozen=True, slots=True)
class NatsConfig:
    # Unset: no broker; the deny file alone is the deny-set. May carry a user and password or a
    # token (nats://user:pass@host:4222): shown only through `redact_url`.
    url: str | None = None
    stream: str = "EGRESS_REVOCATIONS"
    subject: str = "egress.revocations"
    # The deny-set and the last stream sequence applied, so a restart enforces revocations at once
    # and resumes the stream where it stopped. Required with `url`.
    snapshot: str | None = None
    connect_timeout: float = 2.0
    max_reconnect_wait: float = 5.0

    def __repr__(self) -> str:
        shown = (f"{f.name}={_redacted(f.name, getattr(self, f.name))!r}" for f in dataclasses.fields(self))
        return f"NatsConfig({', '.join(shown)})"


@dataclass(frozen=True, slots=True)
class TierConfig:
    # Per identity (virtual key, or BYO key by hash) and provider, over a sliding minute; 0 = unlimited.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    default_tier: TierConfig = field(default_factory=TierConfig)
    # Keys name their tier in the `tier` claim; a tier not listed here falls back to the default.
    # A tier takes each limit it leaves unset from the default tier (0 written in a tier: unlimited).
    tiers: MappingProxyType[str, TierConfig] = field(default_factory=lambda: MappingProxyType({}))
    # Two sliding-window sketches each of requests and tokens; 32768 x 4 x 4 bytes = 512 KiB apiece.
    sketch_width: int = 32768
    sketch_depth: int = 4
    # Keys the hash that stands for a BYO token ("env:NAME" or "file:PATH"); unset: random per process.
    byo_hash_key: str | None = None


@dataclass(frozen=True, slots=True)
class UsageConfig:
    # Meter responses at all (usage facts, token limits, token metrics).
    enabled: bool = True
    # Where usage facts go as JSON lines; unset: not written (still counted).
    jsonl: str | None = None
    rotate_bytes: int = 64 * MiB
    keep_files: int = 10
    # Facts waiting to be written; past this they are dropped and counted, never a blocked response.
    queue_size: int = 10_000
    # Also publish each fact to NATS ([nats] url), on `<prefix>.<provider>`.
    nats_publish: bool = False
    nats_subject_prefix: str = "egress.usage"
    # Publish through this JetStream stream (made if missing), deduplicated by request id.
    nats_stream: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    providers: MappingProxyType[str, Provider] = field(
        default_factory=lambda: MappingProxyType(dict(BUILTIN_PROVIDERS))
    )
    # [[routes]] of the unified surface, in order; without any, routes.DEFAULT_ROUTES.
    routes: tuple[ModelRoute, ...] = DEFAULT_ROUTES
    # Every table and key the file itself set, as paths ("providers", "openai", "base_url"): what a
    # reload must not lose. Not part of equality: the same settings spelled differently are equal.
    settings: frozenset[tuple[str, ...]] = field(default=frozenset(), compare=False, repr=False)
    # Settings the command line set over the file's ("server.listen"): `with_overrides`.
    overrides: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


# A config file is a few KiB; deny lists and keys live in files of their own. The bound is what the
# supervisor's shared buffer holds for a reload (workers.ConfigBox).
MAX_CONFIG_BYTES = 1 * MiB


def read_config_bytes(path: str) -> bytes:
    """The file's bytes, read once; raises ConfigError. A reload under the supervisor reads them
    here once for the whole host and hands the same bytes to every worker (workers.ConfigBox)."""
    try:
        # A FIFO would block; a device would never end; a file over the bound is not read whole.
        raw = read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is over {MAX_CONFIG_BYTES // MiB} MiB")
    return raw


def load_config(path: str | None, running: Config | None = None, raw: bytes | None = None) -> Config:
    """The file's config; with `running`, a reload of it, refused when it says less (module doc).

    `raw`: the file's bytes as read_config_bytes read them, instead of reading `path` again (which
    then only names the file in messages).
    """
    if path is None:
        return Config()
    if raw is None:
        raw = read_config_bytes(path)
    # Editors on Windows save a byte order mark that tomllib refuses; it means nothing in UTF-8.
    raw = raw.removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 (line {line}); TOML files are UTF-8") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib names a position, a key or one character, never a value.
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    config = parse_config(table)
    if running is not None:
        _check_reload(running, config, path)
    return config


def _check_reload(running: Config, new: Config, path: str) -> None:
    hint = "write the new file beside it and mv it into place"
    if not new.settings:
        raise ConfigError(f"reload refused: {path} is empty (caught half written? {hint})")
    gone = running.settings - new.settings
    # The most specific names (providers.openai.base_url, not providers): they say what changes.
    lost = sorted(one for one in gone if not any(other[: len(one)] == one != other for other in gone))
    if lost:
        names = ", ".join(".".join(one) for one in lost[:8])
        more = f" and {len(lost) - 8} more" if len(lost) > 8 else ""
        raise ConfigError(
            f"reload refused: {path} no longer sets {names}{more}, which the running file sets "
            f"(caught half written? {hint}; to drop a setting, restart)"
        )


def _settings(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found = set()
    for key, value in table.items():
        found.add((*prefix, key))
        if isinstance(value, dict):
            found |= _settings(value, (*prefix, key))
    return found


def parse_config(table: dict[str, Any]) -> Config:
    _reject_unknown(
        table, {"server", "upstream", "accounts", "keys", "nats", "limits", "usage", "providers", "routes"}, ""
    )
    server = _build(ServerConfig, table.get("server", {}), "server")
    upstream = _build(UpstreamConfig, table.get("upstream", {}), "upstream")
    keys = _build(KeysConfig, table.get("keys", {}), "keys")
    accounts = _build(AccountsConfig, table.get("accounts", {}), "accounts")
    if accounts.max_attempts < 1:
        raise ConfigError("accounts.max_attempts must be at least 1")
    if not 1.0 <= accounts.max_cooldown <= 365 * 24 * 3600.0:  # hints.MAX_WAIT: no wait is read longer
        raise ConfigError("accounts.max_cooldown must be 1 to 31536000 seconds (a year)")
    nats = _build(NatsConfig, table.get("nats", {}), "nats")
    for index, text in enumerate(keys.trusted_issuers):
        try:
            parse_public_key(text)
        except ValueError as exc:
            raise ConfigError(f"keys.trusted_issuers[{index}]: {exc}") from None
    if nats.url is not None and nats.snapshot is None:
        raise ConfigError("nats.snapshot is required when nats.url is set")
    if nats.url is not None:
        _check_nats_url(nats.url)
    limits = _build_limits(table.get("limits", {}))
    usage = _build(UsageConfig, table.get("usage", {}), "usage")
    if usage.nats_publish and nats.url is None:
        raise ConfigError("usage.nats_publish needs nats.url")
    _check_nats_names(nats, usage)
    check_metering(limits, usage)
    _check_apart_files(server, keys, nats, usage)
    check_listeners(server)
    if server.write_buffer_low > server.write_buffer_high:
        raise ConfigError("server.write_buffer_low must not exceed server.write_buffer_high")
    providers = dict(BUILTIN_PROVIDERS)
    provider_tables = table.get("providers", {})
    if not isinstance(provider_tables, dict):
        raise ConfigError("providers must be a table of [providers.<name>] tables")
    for name, row in provider_tables.items():
        providers[name] = _build_provider(name, row, providers.get(name))
    routes = _build_routes(table.get("routes"), providers)
    return Config(
        server=server,
        upstream=upstream,
        accounts=accounts,
        keys=keys,
        nats=nats,
        limits=limits,
        usage=usage,
        providers=MappingProxyType(providers),
        routes=routes,
        settings=frozenset(_settings(table)),
    )


def _pool_keys(row: dict, builtin: Provider | None, where: str) -> tuple[tuple, tuple, tuple]:
    """`pool_keys = ["env:A", {name = "team-a", key = "file:/etc/egress/b.key", max_concurrent = 8}]`:
    sources, the operator's account names beside them ("" where unnamed: the account id is a key
    hash), and each key's own concurrency cap (0: the provider's account_max_concurrent)."""
    if "pool_keys" not in row:
        return (builtin.pool_keys, builtin.pool_key_names, builtin.pool_key_caps) if builtin else ((), (), ())
    entries = row["pool_keys"]
    if not isinstance(entries, list):
        raise ConfigError(f"{where}.pool_keys must be a list of sources")
    sources, names, caps = [], [], []
    for index, entry in enumerate(entries):
        name = ""
        cap = 0
        if isinstance(entry, dict):
            _reject_unknown(entry, {"name", "key", "max_concurrent"}, f"{where}.pool_keys[{index}]")
            cap = _coerce(entry.get("max_concurrent", 0), "int", f"{where}.pool_keys[{index}].max_concurrent")
            name, entry = entry.get("name"), entry.get("key")
            if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name):
                raise ConfigError(f"{where}.pool_keys[{index}].name must be 1-64 of letters, digits, '.', '-', '_'")
            if name in names:
                raise ConfigError(f"{where}.pool_keys[{index}].name repeats an account name")
        if not isinstance(entry, str) or not _is_source(entry):
            raise ConfigError(f"{where}.pool_keys[{index}] is not 'env:NAME' or 'file:PATH' ({_LITERAL_HINT})")
        sources.append(entry)
        names.append(name)
        caps.append(cap)
    return tuple(sources), tuple(names), tuple(caps)


_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _build_limits(table: Any) -> LimitsConfig:
    if not isinstance(table, dict):
        raise ConfigError("[limits] must be a table")
    if "default_tier" in table:
        raise ConfigError("unknown key 'limits.default_tier' (set requests_per_minute directly in [limits])")
    # [limits] holds the default tier's own keys beside the sketch settings and [limits.tiers.*].
    tier_keys = {f.name for f in dataclasses.fields(TierConfig)}
    default_tier = _build(TierConfig, {k: v for k, v in table.items() if k in tier_keys}, "limits")
    base = _build(LimitsConfig, {k: v for k, v in table.items() if k not in tier_keys and k != "tiers"}, "limits")
    # The sketches are one shared mapping made at start: 4 x width x depth x 4 bytes (1 GiB at most).
    if not 1 <= base.sketch_depth <= 8 or not 64 <= base.sketch_width <= 1 << 23:
        raise ConfigError("limits.sketch_depth must be 1..8 and limits.sketch_width 64..8388608")
    if base.byo_hash_key is not None and not _is_source(base.byo_hash_key):
        raise ConfigError(f"limits.byo_hash_key is not 'env:NAME' or 'file:PATH' ({_LITERAL_HINT})")
    tiers_table = table.get("tiers", {})
    if not isinstance(tiers_table, dict):
        raise ConfigError("limits.tiers must be a table of [limits.tiers.<name>] tables")
    tiers = {name: _build_tier(row, default_tier, f"limits.tiers.{name}") for name, row in tiers_table.items()}
    return dataclasses.replace(base, default_tier=default_tier, tiers=MappingProxyType(tiers))


def _build_tier(row: Any, default_tier: TierConfig, where: str) -> TierConfig:
    """A tier is the default tier with the limits it sets replaced: `[limits.tiers.batch]
    requests_per_minute = 60` under a default of 1M tokens a minute keeps the 1M. Built from the
    field defaults instead, every limit the tier leaves out was 0, unlimited. A 0 the tier writes
    itself still means unlimited."""
    tier = _build(TierConfig, row, where)  # strict: unknown keys and bad values are refused here
    return dataclasses.replace(default_tier, **{key: getattr(tier, key) for key in row})


_PROVIDER_KEYS = {
    "base_url",
    "auth",
    "dialect",
    "pool_keys",
    "allow_anonymous",
    "inject_stream_usage",
    "stream_usage",
    "allow_models",
    "deny_models",
    "models",
    "default_max_tokens",
    "api_root",
    "max_concurrent",
    "account_max_concurrent",
    "queue_timeout",
    "responses_api",
    "key_prefixes",
}
_ROUTE_KEYS = {"match", "provider", "drop_params", "fallbacks"}


def _build_routes(rows: Any, providers: dict[str, Provider]) -> tuple[ModelRoute, ...]:
    if rows is None:
        return DEFAULT_ROUTES
    if not isinstance(rows, list):
        raise ConfigError("routes must be an array of [[routes]] tables")
    if not rows:
        # Not "the defaults": every model would be model_not_found. Leave `routes` out for those.
        raise ConfigError(
            "routes = [] routes no model: name at least one [[routes]], or leave routes out for the defaults"
        )
    routes = []
    for index, row in enumerate(rows):
        where = f"routes[{index}]"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} must be a table")
        _reject_unknown(row, _ROUTE_KEYS, where)
        match, provider = row.get("match"), row.get("provider")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}.match must be a model name or glob (* ? [...])")
        if not isinstance(provider, str) or provider not in providers:
            raise ConfigError(f"{where}.provider must name a configured provider")
        drop = _coerce(row.get("drop_params", False), "bool", f"{where}.drop_params")
        routes.append(ModelRoute(match, provider, drop, _fallbacks(row.get("fallbacks", []), where)))
    resolver = ModelRoutes(tuple(routes), providers)
    for index, route in enumerate(routes):
        for number, fallback in enumerate(route.fallbacks):
            try:
                resolver.resolve(fallback.model)
            except EgressError:
                raise ConfigError(
                    f"routes[{index}].fallbacks[{number}]: no provider serves {fallback.model!r} "
                    "(name it as provider:model, or a model a route matches)"
                ) from None
    return tuple(routes)


def _fallbacks(entries: Any, where: str) -> tuple[Fallback, ...]:
    """`fallbacks = ["openai:gpt-4.1-mini", {model = "local:llama", serves = ["tools"]}]`."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}.fallbacks must be a list of models")
    found = []
    for number, entry in enumerate(entries):
        at = f"{where}.fallbacks[{number}]"
        serves = None
        if isinstance(entry, dict):
            _reject_unknown(entry, {"model", "serves"}, at)
            serves = _coerce(entry.get("serves", list(CAPABILITIES)), "tuple[str, ...]", f"{at}.serves")
            unknown = set(serves) - set(CAPABILITIES)
            if unknown:
                raise ConfigError(f"{at}.serves: unknown {sorted(unknown)} (known: {', '.join(CAPABILITIES)})")
            serves = frozenset(serves)
            entry = entry.get("model")
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{at} must be a model name, or a table with model and serves")
        found.append(Fallback(entry, serves))
    return tuple(found)


# What a value that is not a source most likely is; the message never shows the value itself.
_LITERAL_HINT = "a literal key? keys never go in the config file"


def _is_visible_ascii(text: str) -> bool:
    return all(33 <= ord(char) < 127 for char in text)


def _is_source(text: str) -> bool:
    # Something after the prefix: `env:K` (a one-letter variable) is a source too.
    return (text.startswith("env:") and len(text) > len("env:")) or (
        text.startswith("file:") and len(text) > len("file:")
    )


def _build_provider(name: str, row: Any, builtin: Provider | None) -> Provider:
    where = f"providers.{name}"
    if not isinstance(row, dict):
        raise ConfigError(f"{where} must be a table")
    if name in RESERVED_NAMES:
        # The first path segment names the provider: these segments are egress's own paths.
        raise ConfigError(f"{where}: {name!r} is reserved (egress serves /{name} itself); name the provider otherwise")
    # ASCII only: str.isalnum takes any script's letters, and the name goes into paths and labels.
    if not name.isascii() or not name.replace("-", "").replace("_", "").isalnum() or name != name.lower():
        raise ConfigError(f"{where}: provider names are lowercase letters, digits, '-' and '_', not {name!r}")
    _reject_unknown(row, _PROVIDER_KEYS, where)
    for key in ("base_url", "auth", "dialect"):
        if key in row and not isinstance(row[key], str):
            raise ConfigError(f"{where}.{key} must be a string")
    pool_keys, pool_key_names, pool_key_caps = _pool_keys(row, builtin, where)
    caps = {}
    for key in ("max_concurrent", "account_max_concurrent"):
        caps[key] = _coerce(row.get(key, getattr(builtin, key) if builtin else 0), "int", f"{where}.{key}")
    responses_api = _coerce(
        row.get("responses_api", builtin.responses_api if builtin else False), "bool", f"{where}.responses_api"
    )
    queue_timeout = _coerce(
        row.get("queue_timeout", builtin.queue_timeout if builtin else 10.0), "float", f"{where}.queue_timeout"
    )
    if not 0 <= queue_timeout <= 600:
        raise ConfigError(f"{where}.queue_timeout must be 0 to 600 seconds")
    allow_anonymous = _coerce(row.get("allow_anonymous", False), "bool", f"{where}.allow_anonymous")
    # A built-in row keeps its providers' key prefixes when pointed elsewhere (a mock, a regional
    # host, a relay): `key_prefixes = []` says the host behind base_url takes keys of any form.
    inherited = list(builtin.key_prefixes) if builtin else []
    key_prefixes = _coerce(row.get("key_prefixes", inherited), "tuple[str, ...]", f"{where}.key_prefixes")
    if not all(prefix and _is_visible_ascii(prefix) for prefix in key_prefixes):
        raise ConfigError(f'{where}.key_prefixes are how its keys begin, like "sk-ant-": ASCII, no spaces, not empty')
    allow_models = (
        _coerce(row["allow_models"], "tuple[str, ...]", f"{where}.allow_models")
        if "allow_models" in row
        else (builtin.allow_models if builtin else None)
    )
    deny_models = _coerce(
        row.get("deny_models", list(builtin.deny_models) if builtin else []), "tuple[str, ...]", f"{where}.deny_models"
    )
    models = _coerce(row.get("models", list(builtin.models) if builtin else []), "tuple[str, ...]", f"{where}.models")
    api_root = row.get("api_root", builtin.api_root if builtin else "/v1")
    if (
        not isinstance(api_root, str)
        or not api_root.startswith("/")
        or api_root.endswith("/")
        or not _is_visible_ascii(api_root)
    ):
        raise ConfigError(f"{where}.api_root is a path like /v1 (no trailing slash, ASCII with no spaces)")
    default_max_tokens = _coerce(
        row.get("default_max_tokens", builtin.default_max_tokens if builtin else 4096),
        "int",
        f"{where}.default_max_tokens",
    )
    default_inject = builtin.inject_stream_usage if builtin else True
    inject = _coerce(row.get("inject_stream_usage", default_inject), "bool", f"{where}.inject_stream_usage")
    # A provider egress does not know: its streams' usage is unknown until the operator says.
    stream_usage = row.get("stream_usage", builtin.stream_usage if builtin else "unknown")
    if stream_usage not in STREAM_USAGE_MODES:
        raise ConfigError(f"{where}.stream_usage must be one of {', '.join(STREAM_USAGE_MODES)}")
    if builtin is None and "base_url" not in row:
        raise ConfigError(f"{where}.base_url is required for a provider egress does not know")
    base_url = row.get("base_url", builtin.base_url if builtin else "")
    auth = row.get("auth", builtin.auth if builtin else "bearer")
    dialect = row.get("dialect", builtin.dialect if builtin else "openai")
    # The values are not echoed: an operator who confuses a field with a header value puts a key there.
    if auth not in ("bearer", "x-api-key"):
        raise ConfigError(f"{where}.auth must be 'bearer' or 'x-api-key' (the scheme's name, never a key)")
    if dialect not in ("openai", "anthropic"):
        raise ConfigError(f"{where}.dialect must be 'openai' or 'anthropic'")
    try:
        parts = urlsplit(base_url)
        hostname, _ = parts.hostname, parts.port  # .port raises on a port out of range or not a number
    except ValueError:
        hostname = None
    if not hostname or parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}.base_url must be an absolute http(s) URL like https://host[:port][/path]")
    if not _is_visible_ascii(hostname):
        # It becomes the Host header and the TLS server name as is.
        raise ConfigError(f"{where}.base_url host is ASCII with no spaces (an IDN in its xn-- form)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}.base_url must not carry a query, fragment or credentials")
    if parts.port == 0:
        raise ConfigError(f"{where}.base_url port 0 is no port to connect to")
    if not _is_visible_ascii(parts.path):
        # The path goes into the request line as is: a space or a raw UTF-8 byte breaks every request.
        raise ConfigError(f"{where}.base_url path is ASCII with no spaces (percent-encode the rest)")
    return Provider(
        name,
        base_url,
        auth,
        dialect,
        pool_keys=pool_keys,
        pool_key_names=pool_key_names,
        allow_anonymous=allow_anonymous,
        inject_stream_usage=inject,
        stream_usage=stream_usage,
        allow_models=allow_models,
        deny_models=deny_models,
        models=models,
        default_max_tokens=default_max_tokens,
        api_root=api_root,
        pool_key_caps=pool_key_caps,
        queue_timeout=queue_timeout,
        responses_api=responses_api,
        key_prefixes=key_prefixes,
        **caps,
    )


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key {name!r} (known: {', '.join(sorted(known))})")


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, set(fields), where)
    values = {}
    for key, value in table.items():
        expected = fields[key].type
        values[key] = _coerce(value, expected, f"{where}.{key}")
    return cls(**values)


# Integers whose 0 would not mean "no limit" but refuse everything (every connection a 503, every
# body a 413, every virtual key a 429 before its check, every fact dropped): at least 1.
_AT_LEAST_ONE = frozenset(
    {
        "server.max_connections",
        "server.max_body_bytes",
        "server.max_request_line_bytes",
        "server.max_header_bytes",
        "server.max_header_count",
        "server.write_buffer_high",
        "keys.invalid_key_burst",
        "usage.queue_size",
        "usage.rotate_bytes",
        "usage.keep_files",  # 0 deleted every fact at each rotation
    }
)
# And at most: a transport's buffer limits are C ints (a larger one made every connection hang);
# workers, each a process with a slab of shared memory mapped before the fork (a count past what a
# mapping can hold ended the supervisor in a traceback, or "Cannot allocate memory" naming nothing).
MAX_WORKERS = 1024
_AT_MOST = {"server.write_buffer_high": 1 << 30, "server.write_buffer_low": 1 << 30, "server.workers": MAX_WORKERS}
# Paths and names that can't be empty: "" would open nothing, and the error would name no key.
_NON_EMPTY = frozenset({"server.access_log", "usage.jsonl", "keys.deny_file", "nats.snapshot", "upstream.ca_file"})


def _coerce(value: Any, expected: str, name: str) -> Any:
    # Field types are strings under `from __future__ import annotations`.
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer")
        if value == 0 and name in _AT_LEAST_ONE:
            raise ConfigError(f"{name} must be at least 1 (0 would refuse everything, not lift the limit)")
        if value > _AT_MOST.get(name, value):
            raise ConfigError(f"{name} must be at most {_AT_MOST[name]}")
        return value
    if expected == "float":
        # TOML has nan and inf; a nan deadline is never reached, which would switch a timeout off.
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise ConfigError(f"{name} must be a positive number of seconds")
        return float(value)
    if expected in ("str", "str | None"):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        if not value and name in _NON_EMPTY:
            raise ConfigError(f"{name} must not be empty (leave it out for the default)")
        return value
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        return value
    if expected == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{name} must be a list of strings")
        return tuple(value)
    raise AssertionError(f"no coercion for {expected}")  # pragma: no cover


def check_metering(limits: LimitsConfig, usage: UsageConfig) -> None:
    """What only metering feeds, asked for with metering off: a token limit (tokens are counted from
    the metered usage: with `usage.enabled = false` every request passed, the limit never applied),
    a usage file or NATS publishing (no fact is ever made). serve.reloaded asks it of the config a
    reload runs too, whose [usage] is the start's."""
    if usage.enabled:
        return
    tiers = [("limits", limits.default_tier), *((f"limits.tiers.{name}", tier) for name, tier in limits.tiers.items())]
    for where, tier in tiers:
        if tier.tokens_per_minute:
            raise ConfigError(
                f"{where}.tokens_per_minute is set, but usage.enabled = false: tokens are counted by metering, "
                "so the limit would never apply"
            )
    for setting, wanted in (("usage.jsonl", usage.jsonl is not None), ("usage.nats_publish", usage.nats_publish)):
        if wanted:
            raise ConfigError(f"{setting} is set, but usage.enabled = false makes no usage fact")


def _check_apart_files(server: ServerConfig, keys: KeysConfig, nats: NatsConfig, usage: UsageConfig) -> None:
    """Each file egress writes (or reads, the deny file) its own: two writers on one file mix their
    lines. Access-log lines carry the facts' request ids, so `usage report` billed whichever of the
    two it read first, the access line with no tokens; the deny file read them as bad lines."""
    files = [
        ("server.access_log", None if server.access_log in ("stdout", "stderr", "off") else server.access_log),
        ("usage.jsonl", usage.jsonl),
        ("nats.snapshot", nats.snapshot if nats.url is not None else None),
        ("keys.deny_file", keys.deny_file),
    ]
    seen: dict[str, str] = {}
    for setting, path in files:
        if path is None:
            continue
        real = os.path.realpath(path)  # the same file however it is spelled: ./, .., a symlink
        if real in seen:
            raise ConfigError(f"{setting} {path} is {seen[real]}'s file: give each its own")
        seen[real] = setting


def check_listeners(server: ServerConfig, names: tuple[str, str] = ("server.listen", "server.admin_listen")) -> None:
    """The two addresses, each HOST:PORT (the admin one may be "off"), on ports of their own.
    `names`: what a message calls them (the command line's flags, when they set them)."""
    listen_host, listen_port = parse_listen(server.listen, names[0])
    if server.admin_listen != "off":
        admin_host, admin_port = parse_listen(server.admin_listen, names[1])
        if admin_port == listen_port and admin_port != 0 and _hosts_overlap(listen_host, admin_host):
            # Both bind with SO_REUSEPORT under workers: the kernel would share connections between
            # the traffic and the admin listener (API calls answered 405, /metrics on the traffic port).
            raise ConfigError(f"{names[1]} {server.admin_listen} is {names[0]}'s port: give it its own")


def with_overrides(config: Config, **server: str) -> Config:
    """`config` with [server] settings the command line gives (`listen`, `admin_listen`), checked as
    the file's are: a flag must not bring back what the file would be refused for. They are kept
    on reload and never reported as changes only a restart makes (the flag wins at a restart too)."""
    if not server:
        return config
    changed = dataclasses.replace(config.server, **server)
    flag = {"listen": "--listen", "admin_listen": "--admin-listen"}
    check_listeners(changed, tuple(flag[n] if n in server else f"server.{n}" for n in ("listen", "admin_listen")))
    overrides = config.overrides | {f"server.{name}" for name in server}
    return dataclasses.replace(config, server=changed, overrides=frozenset(overrides))


def parse_listen(listen: str, setting: str = "server.listen") -> tuple[str, int]:
    """'127.0.0.1:8787' or '[::1]:8787' -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    # isascii: str.isdigit takes superscripts and other scripts' digits, which int() refuses.
    if not sep or not port_text.isascii() or not port_text.isdigit() or not host:
        raise ConfigError(f"{setting} must be HOST:PORT, not {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{setting} port out of range: {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


_ANY_HOST = ("0.0.0.0", "::", "")


def _hosts_overlap(one: str, other: str) -> bool:
    """Two listen hosts that can both receive one connection: the same, or either a wildcard."""
    return one == other or one in _ANY_HOST or other in _ANY_HOST


def config_digest(config: Config) -> str:
    """The effective configuration's fingerprint: the first 12 hex digits (48 bits, a whole number a
    float holds exactly, as the workers' shared gauges do) of the SHA-256 of render_config. Every
    worker of a host runs the same config, so they all show the same one (/status)."""
    return hashlib.sha256(render_config(config).encode()).hexdigest()[:12]


def render_config(config: Config) -> str:
    """The effective configuration as TOML. Secrets, when there are any, print as <redacted>."""
    lines: list[str] = []
    for section in ("server", "upstream", "accounts", "keys", "nats", "usage"):
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(config, section)):
            value = _redacted(f.name, getattr(getattr(config, section), f.name))
            lines.append(f"# {f.name} is unset" if value is None else f"{f.name} = {_toml_value(value)}")
        lines.append("")
    limits = config.limits
    lines.append("[limits]")
    lines.append(f"requests_per_minute = {limits.default_tier.requests_per_minute}")
    lines.append(f"tokens_per_minute = {limits.default_tier.tokens_per_minute}")
    lines.append(f"sketch_width = {limits.sketch_width}")
    lines.append(f"sketch_depth = {limits.sketch_depth}")
    lines.append(
        "# byo_hash_key is unset"
        if limits.byo_hash_key is None
        else f"byo_hash_key = {_toml_value(limits.byo_hash_key)}"
    )
    lines.append("")
    for name, tier in limits.tiers.items():
        # A bare key only when TOML takes it as one: `Gold Tier` or `a.b` must be quoted.
        bare = name and all(char.isascii() and (char.isalnum() or char in "-_") for char in name)
        lines.append(f"[limits.tiers.{name if bare else _toml_value(name)}]")
        lines.append(f"requests_per_minute = {tier.requests_per_minute}")
        lines.append(f"tokens_per_minute = {tier.tokens_per_minute}")
        lines.append("")
    for provider in config.providers.values():
        lines.append(f"[providers.{provider.name}]")
        lines.append(f"base_url = {_toml_value(provider.base_url)}")
        lines.append(f"auth = {_toml_value(provider.auth)}")
        lines.append(f"dialect = {_toml_value(provider.dialect)}")
        # Only where keys come from: the values themselves are never in the config.
        entries = [
            _pool_key_entry(source, name, cap)
            for source, name, cap in zip(
                provider.pool_keys, provider.pool_key_names, provider.pool_key_caps, strict=True
            )
        ]
        lines.append(f"pool_keys = [{', '.join(entries)}]")
        lines.append(f"allow_anonymous = {_toml_value(provider.allow_anonymous)}")
        lines.append(f"stream_usage = {_toml_value(provider.stream_usage)}")
        lines.append(f"inject_stream_usage = {_toml_value(provider.inject_stream_usage)}")
        if provider.allow_models is not None:
            lines.append(f"allow_models = {_toml_value(provider.allow_models)}")
        lines.append(f"deny_models = {_toml_value(provider.deny_models)}")
        lines.append(f"models = {_toml_value(provider.models)}")
        lines.append(f"default_max_tokens = {provider.default_max_tokens}")
        lines.append(f"max_concurrent = {provider.max_concurrent}")
        lines.append(f"account_max_concurrent = {provider.account_max_concurrent}")
        lines.append(f"queue_timeout = {provider.queue_timeout!r}")
        lines.append(f"responses_api = {_toml_value(provider.responses_api)}")
        lines.append(f"key_prefixes = {_toml_value(provider.key_prefixes)}")
        lines.append("")
    for route in config.routes:
        lines.append("[[routes]]")
        lines.append(f"match = {_toml_value(route.match)}")
        lines.append(f"provider = {_toml_value(route.provider)}")
        lines.append(f"drop_params = {_toml_value(route.drop_params)}")
        if route.fallbacks:
            entries = [
                f"{{ model = {_toml_value(f.model)}, serves = {_toml_value(tuple(sorted(f.serves)))} }}"
                if f.serves is not None
                else _toml_value(f.model)
                for f in route.fallbacks
            ]
            lines.append(f"fallbacks = [{', '.join(entries)}]")
        lines.append("")
    return "\n".join(lines)


def _pool_key_entry(source: str, name: str, cap: int) -> str:
    if not name and not cap:
        return _toml_value(source)
    parts = [f"name = {_toml_value(name)}"] if name else []
    parts.append(f"key = {_toml_value(source)}")
    if cap:
        parts.append(f"max_concurrent = {cap}")
    return "{ " + ", ".join(parts) + " }"


def _check_nats_url(url: str) -> None:
    """Refuse a NATS URL whose credentials a URL parser would read as its host: a token with a `/`,
    `?` or `#` in it (base64 has `/`) ends the authority early, so the token would be dialled, sent
    to DNS and printed as the broker's name. The message shows the URL redacted."""
    _, sep, rest = url.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if at and any(mark in userinfo for mark in "/?#"):
        # nats-py does not percent-decode credentials, so %2F would be sent as it is written.
        raise ConfigError(
            f"nats.url {redact_url(url)}: its user, password or token has a '/', '?' or '#', which ends a "
            "URL's host part; give the broker a credential without them"
        )
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parsed = None
    if not sep or parsed is None or parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
        raise ConfigError(f"nats.url {redact_url(url)} is not nats://host[:port] (or tls://, ws://, wss://)")
    if at and parsed.netloc != f"{userinfo}@{hostport.split('/', 1)[0]}":
        raise ConfigError(f"nats.url {redact_url(url)} is not nats://[user[:password]@]host[:port]")


# NATS names, as the broker takes them (docs.nats.io/nats-concepts/subjects, and for streams
# docs.nats.io/running-a-nats-service/nats_admin/jetstream_admin/naming; nats-server's
# isValidAssetName and JSMaxNameLen). Refused here, each naming its key: at run time a bad one was
# a publisher or a revocation feed retrying forever (nats-py raises ValueError on a stream with a
# '.'), or, for a subject with a space, a PUB line the broker read as subject plus reply subject.
_STREAM_FORBIDDEN = frozenset(".*>/\\")
_MAX_STREAM_NAME_BYTES = 255


def _name_fault(text: str) -> str | None:
    if not text:
        return "is empty"
    if any(char.isspace() or not char.isprintable() for char in text):
        return "has whitespace or a control character"
    return None


def _check_subject(setting: str, subject: str) -> None:
    """A subject egress publishes on (a prefix of one, for usage): dot-separated tokens, none empty,
    no wildcard (publishers never use `*` or `>`), not `$`-prefixed (reserved for the system:
    $SYS, $JS, $KV)."""
    fault = _name_fault(subject)
    if fault is None and "" in subject.split("."):
        fault = "has an empty token (a leading, trailing or doubled '.')"
    if fault is None and ("*" in subject or ">" in subject):
        fault = "has a wildcard ('*' or '>'), which a publisher never uses"
    if fault is None and subject.startswith("$"):
        fault = "starts with '$', which NATS reserves for the system ($SYS, $JS, $KV)"
    if fault is not None:
        raise ConfigError(f"{setting} {subject!r} {fault} (a NATS subject is dot-separated tokens, like egress.usage)")


def _check_stream(setting: str, stream: str) -> None:
    fault = _name_fault(stream)
    if fault is None and any(char in _STREAM_FORBIDDEN for char in stream):
        fault = "has one of . * > / \\"
    if fault is None and len(stream.encode()) > _MAX_STREAM_NAME_BYTES:
        fault = f"is over {_MAX_STREAM_NAME_BYTES} bytes"
    if fault is not None:
        raise ConfigError(f"{setting} {stream!r} {fault} (a JetStream stream is named like EGRESS_USAGE)")


def _check_nats_names(nats: NatsConfig, usage: UsageConfig) -> None:
    _check_stream("nats.stream", nats.stream)
    _check_subject("nats.subject", nats.subject)
    _check_subject("usage.nats_subject_prefix", usage.nats_subject_prefix)
    if usage.nats_stream is not None:
        _check_stream("usage.nats_stream", usage.nats_stream)
    if not usage.nats_publish or nats.url is None:
        return
    # One broker carries both: a stream's subjects may not overlap another's (JetStream refuses the
    # second stream), and a fact published on the revocation subject would be read as a revoked kid.
    if usage.nats_stream == nats.stream:
        raise ConfigError(f"usage.nats_stream {usage.nats_stream!r} is nats.stream, the revocations' own: name another")
    if nats.subject.startswith(usage.nats_subject_prefix + "."):
        raise ConfigError(
            f"nats.subject {nats.subject!r} is under usage.nats_subject_prefix {usage.nats_subject_prefix!r}: "
            "usage facts would land among the revocations; give them apart subjects"
        )


def redact_url(url: str) -> str:
    """`nats://user:pass@host:4222` -> `nats://user:<redacted>@host:4222`; a lone user part is a
    token (`nats://token@host`) and is redacted whole."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    # The last '@': a password with an unescaped '@' in it is still redacted whole.
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:<redacted>@{host}" if colon else f"{scheme}{sep}<redacted>@{host}"


def _redacted(name: str, value: Any) -> Any:
    return redact_url(value) if name == "url" and isinstance(value, str) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
