"""`egress doctor`: an operator's pre-flight check of a config, before `egress serve` runs it.

Contract: `run(args)` prints one finding per line, `ok|warn|fail  <check>  <message>`, or with
`--json` one document `{"status": …, "findings": [{"check", "level", "message", …details}]}`, and
returns 0 when every finding is ok, 1 when the worst is a warning, 2 when any failed. Offline by
default; `--check` also asks each provider for its model list (unbilled), once per account.

Checks, by id:
  config        the file parses and validates; a failure stops here, as nothing else can be read
  routes        every [[routes]] entry names a configured provider; a route that can never match
                because an earlier route matches every model it does (`covers`, below)
  pool_keys     every pool-key source loads, each key one a header can carry (named by its line,
                never shown); a key file that group or others can read
  state_paths   the directories of the deny file, the NATS snapshot, the usage file and an access
                log file exist and are writable by this user
  ca_file       [upstream] ca_file exists and holds PEM certificates
  byo_hash_key  [limits] byo_hash_key loads
  open_relay    a listen address off loopback, while any non-`bai_` key passes through (auth.py)
  cleartext_pool_keys  a provider with pool keys whose base_url is http:// to a host that is not
                loopback: every request carries a pool key across the network unencrypted
  callers       who can be served at all: with keys.allow_byo = false, no trusted issuer and no
                allow_anonymous provider every request is refused; trusted issuers but no pool keys
                anywhere refuse every virtual key (403 no_pool_key). Both start and pass all else
  relative_paths  a path in the config that is relative: it resolves against the working directory of
                whoever runs egress (`/` under systemd), not the config file's, so doctor and serve
                may read two different files
  ports         the listen and admin addresses can be bound (in use: egress may already be running)
  accounts      --check only: GET {api_root}/models with each account's key; 200 ok, 401/403 fail,
                429 warn, no answer within 5 s fail

No finding shows a key: sources are shown (`env:NAME`, `file:PATH`), never what they hold;
accounts are named as /status names them (the operator's name, else a hash of the key); a NATS
URL goes through `redact_url`. Exceptions that could carry a header value are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import ipaddress
import os
import socket
import ssl
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

import h11
import orjson

from egress.accounts import Account
from egress.auth import PoolRotation, load_pools
from egress.catalog import list_headers, list_target
from egress.config import Config, ConfigError, load_config, parse_listen, redact_url
from egress.providers import Provider
from egress.secrets import SecretSourceError, header_fault, load_secrets
from egress.upstream import make_tls_context

LEVELS = ("ok", "warn", "fail")
EXIT_CODES = {"ok": 0, "warn": 1, "fail": 2}
# One bound for each account's probe, connect to status line: a provider slower than this to list
# its models is not one to send traffic to.
CHECK_TIMEOUT = 5.0
USER_AGENT = "egress (doctor)"
OPEN_RELAY = "a non-loopback listen with BYO keys allowed makes egress an open relay for anyone who can reach it"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    level: str  # one of LEVELS
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "message": self.message, **self.details}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="check a config before serving it (offline unless --check)")
    doctor.add_argument("--config", metavar="FILE", help="TOML config (default: built-in config)")
    doctor.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    doctor.add_argument("--check", action="store_true", help="also try each pool key against its provider")


def run(args: argparse.Namespace) -> int:
    findings = diagnose(args.config, network=args.check)
    status = worst(findings)
    if args.json:
        document = {"status": status, "findings": [finding.as_dict() for finding in findings]}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for finding in findings:
            sys.stdout.write(f"{finding.level}  {finding.check}  {finding.message}\n")
    return EXIT_CODES[status]


def worst(findings: list[Finding]) -> str:
    return max((finding.level for finding in findings), key=LEVELS.index, default="ok")


def preflight(config: Config, checks: tuple | None = None) -> None:
    """What `serve` and `config check` both refuse before binding: every failing offline check, in
    the words `doctor` uses for it. Raises ConfigError; warnings are doctor's to show. A reload
    passes RELOAD_CHECKS: those of what a reload changes."""
    checks = _STARTUP_CHECKS if checks is None else checks
    failures = [finding.message for check in checks for finding in check(config) if finding.level == "fail"]
    if failures:
        raise ConfigError("; ".join(failures))


def check_nats(config: Config) -> list[Finding]:
    url = config.nats.url
    if url is None:
        return [Finding("nats", "ok", "no NATS broker configured")]
    # Its form is the config's to refuse (config._check_nats_url), for every command alike.
    return [Finding("nats", "ok", f"nats.url {redact_url(url)} is well formed")]


def diagnose(path: str | None, network: bool = False) -> list[Finding]:
    """Every offline check (`--check` adds the accounts'), in order; `preflight`'s are the first."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [Finding("config", "fail", str(exc))]
    findings = [Finding("config", "ok", f"{path or 'the built-in config'} parses and validates")]
    for check in (
        *_STARTUP_CHECKS,
        check_cleartext_pool_keys,
        check_open_relay,
        check_callers,
        check_relative_paths,
        check_ports,
    ):
        findings += check(config)
    if network:
        failed = frozenset(f.details["provider"] for f in findings if f.check == "pool_keys" and f.level == "fail")
        findings += check_accounts(config, skip=failed)
    return findings


# --- routes -------------------------------------------------------------------------------------


def check_routes(config: Config) -> list[Finding]:
    findings = []
    routes = config.routes
    for index, route in enumerate(routes):
        # parse_config refuses these already; checked again so a config built another way is caught.
        if route.provider not in config.providers:
            findings.append(
                Finding(
                    "routes",
                    "fail",
                    f"routes[{index}] ({route.match!r}) names provider {route.provider!r}, which is not configured",
                    {"route": index, "match": route.match, "provider": route.provider},
                )
            )
        if covers("", route.match):
            findings.append(
                Finding(
                    "routes",
                    "warn",
                    f"routes[{index}] ({route.match!r}) matches no model name",
                    {"route": index, "match": route.match},
                )
            )
            continue
        for earlier_index in range(index):
            earlier = routes[earlier_index]
            if covers(earlier.match, route.match):
                findings.append(
                    Finding(
                        "routes",
                        "warn",
                        f"routes[{index}] ({route.match!r} -> {route.provider}) never matches: routes[{earlier_index}]"
                        f" ({earlier.match!r} -> {earlier.provider}) comes first and matches every model it does",
                        {
                            "route": index,
                            "match": route.match,
                            "shadowed_by": earlier_index,
                            "shadowed_by_match": earlier.match,
                        },
                    )
                )
                break
    if not findings:
        findings.append(Finding("routes", "ok", f"{len(routes)} routes, each names a provider and can match"))
    return findings


# Shadowing, decided over fnmatch's whole glob language (`*`, `?`, `[...]`, `[!...]`, literals,
# case-sensitive, as routes.py matches) by exploring both patterns' automata together: `later` is
# shadowed when no non-empty name reaches an accepting state of `later` without one of `earlier`.
# The alphabet is finite for the purpose: characters that appear in neither pattern are alike to
# both, so one stands for each gap between the characters that do (a `[a-z]` range ends on
# characters of the pattern). Class membership is asked of fnmatch itself, so its quirks (an
# unclosed `[` is a literal, a `]` first in a class belongs to it, reversed ranges match nothing)
# are the routes' own. Not decided, so never reported:
#   - a route only several earlier routes cover together (`[a-m]*`, `[n-z]*`, then `[a-z]*`);
#   - names that never reach the routes: `provider:model` with a configured provider is routed
#     to that provider first (routes.ModelRoutes.resolve), so `openai:*` as a route never matches;
#   - a pair whose search passes `_MAX_STATES` (patterns of many `*` and classes), left undecided.
_STAR = "*"
_MAX_STATES = 4096


def glob_tokens(pattern: str) -> tuple[str, ...]:
    """fnmatch's tokens (as fnmatch.translate cuts them): `*` (runs collapsed), `?`, a `[...]`
    class as written, or one literal character."""
    tokens: list[str] = []
    index, end = 0, len(pattern)
    while index < end:
        char = pattern[index]
        if char == "[":
            close = index + 1
            if close < end and pattern[close] == "!":
                close += 1
            if close < end and pattern[close] == "]":
                close += 1
            while close < end and pattern[close] != "]":
                close += 1
            if close < end:
                tokens.append(pattern[index : close + 1])
                index = close + 1
                continue
        if not (char == _STAR and tokens and tokens[-1] == _STAR):
            tokens.append(char)
        index += 1
    return tuple(tokens)


def covers(earlier: str, later: str) -> bool | None:
    """Whether `earlier` matches every non-empty name `later` matches (so `later`, after it, never
    matches); None when the search grew past `_MAX_STATES` (not decided). `covers("", later)`:
    `later` matches no non-empty name at all."""
    early, late = glob_tokens(earlier), glob_tokens(later)
    alphabet = _alphabet(earlier + later)
    start = (_closure(late, {0}), _closure(early, {0}))
    seen = {start}
    todo = [start]
    while todo:
        late_states, early_states = todo.pop()
        for char in alphabet:
            late_next = _step(late, late_states, char)
            if not late_next:
                continue
            early_next = _step(early, early_states, char)
            if len(late) in late_next and len(early) not in early_next:
                return False  # a name `later` matches and `earlier` doesn't
            pair = (late_next, early_next)
            if pair not in seen:
                if len(seen) >= _MAX_STATES:
                    return None
                seen.add(pair)
                todo.append(pair)
    return True


def _alphabet(text: str) -> list[str]:
    points = sorted({ord(char) for char in text})
    chosen: list[int] = []
    previous = -1
    for point in points:
        if point > previous + 1:
            chosen.append(previous + 1)  # stands for the gap below this character
        chosen.append(point)
        previous = point
    if previous < sys.maxunicode:
        chosen.append(previous + 1)
    return [chr(point) for point in chosen]


def _closure(tokens: tuple[str, ...], states: set[int]) -> frozenset[int]:
    # A state is how many tokens are consumed; a `*` may also match nothing.
    found = set(states)
    for state in sorted(states):
        while state < len(tokens) and tokens[state] == _STAR:
            state += 1
            found.add(state)
    return frozenset(found)


def _step(tokens: tuple[str, ...], states: frozenset[int], char: str) -> frozenset[int]:
    following = set()
    for state in states:
        if state == len(tokens):
            continue
        token = tokens[state]
        if token == _STAR:
            following.add(state)
        elif token == "?" or token == char or (len(token) > 1 and fnmatchcase(char, token)):
            following.add(state + 1)
    return _closure(tokens, following)


# --- secrets and files --------------------------------------------------------------------------


def check_pool_keys(config: Config) -> list[Finding]:
    findings = []
    for provider in config.providers.values():
        for index, (source, name) in enumerate(zip(provider.pool_keys, provider.pool_key_names, strict=True)):
            where = f"providers.{provider.name}.pool_keys[{index}]" + (f" ({name})" if name else "")
            details = {"provider": provider.name, "index": index, "source": source}
            findings += _source_findings("pool_keys", where, source, details, header=True)
    if not findings:
        findings.append(Finding("pool_keys", "ok", "no provider has pool keys"))
    return findings


def check_byo_hash_key(config: Config) -> list[Finding]:
    source = config.limits.byo_hash_key
    if source is None:
        return [Finding("byo_hash_key", "ok", "unset: each start draws a random key")]
    return _source_findings("byo_hash_key", "limits.byo_hash_key", source, {"source": source})


def _source_findings(
    check: str, where: str, source: str, details: dict[str, Any], header: bool = False
) -> list[Finding]:
    """`header`: each key is sent in a header (a pool key), so must be one a header can carry; the
    BYO hash key is only hashed with, so any bytes do."""
    try:
        secrets = load_secrets(source)
    except SecretSourceError as exc:  # names the source, never a value
        return [Finding(check, "fail", f"{where}: {exc}", details)]
    count = len(secrets)
    faults = []
    for secret in secrets:
        fault = header_fault(secret.reveal()) if header else None
        if fault is not None:
            # Named by its line, never shown: serve refuses it (preflight) rather than send it.
            line = f" line {secret.line}" if secret.line else ""
            faults.append(Finding(check, "fail", f"{where}: the key at {source}{line} {fault}", details))
        secret.wipe()
    if faults:
        return faults
    findings = [Finding(check, "ok", f"{where}: {source} holds {count} key{'s' if count > 1 else ''}", details)]
    kind, _, path = source.partition(":")
    if kind == "file":
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = 0  # it was read a moment ago; a file that vanished since is the next start's problem
        if mode & 0o077:
            findings.append(
                Finding(
                    check,
                    "warn",
                    f"{where}: key file {path} is readable by group or others (mode {mode:04o}); chmod 600 it",
                    {**details, "mode": f"{mode:04o}"},
                )
            )
    return findings


def check_state_paths(config: Config) -> list[Finding]:
    paths = [("keys.deny_file", config.keys.deny_file), ("nats.snapshot", config.nats.snapshot)]
    paths.append(("usage.jsonl", config.usage.jsonl))
    if config.server.access_log not in ("stdout", "stderr", "off"):
        paths.append(("server.access_log", config.server.access_log))
    findings = []
    for setting, path in paths:
        if path is None:
            continue
        # Where the file really is: a symlink's target's directory is the one that must exist.
        directory = os.path.dirname(os.path.realpath(path))
        details: dict[str, Any] = {"setting": setting, "path": path}
        if setting == "nats.snapshot" and config.nats.url is not None:
            details["nats_url"] = redact_url(config.nats.url)
        # serve can't start without the files it writes at once; a deny file or snapshot may come later.
        level = "fail" if setting in ("usage.jsonl", "server.access_log") else "warn"
        fault = _file_fault(path, writes=level == "fail")
        stream = _STANDARD_STREAMS.get(path) if setting == "server.access_log" else None
        if fault is not None and stream is not None:
            fault += f'; write server.access_log = "{stream}" for the process\'s own {stream}'
        if fault is not None:
            # The file itself is there but can't be used: serve stops on it (a deny file it can't
            # read would leave revoked keys live), except on a snapshot, which it replays the stream for.
            fatal = setting != "nats.snapshot"
            findings.append(Finding("state_paths", "fail" if fatal else "warn", f"{setting} {path}: {fault}", details))
        elif not os.path.isdir(directory):
            findings.append(Finding("state_paths", level, f"{setting} {path}: {directory} does not exist", details))
        elif not os.access(directory, os.W_OK | os.X_OK):
            message = f"{setting} {path}: {directory} is not writable by this user (uid {os.geteuid()})"
            findings.append(Finding("state_paths", level, message, details))
        else:
            findings.append(Finding("state_paths", "ok", f"{setting} {path}: {directory} is writable", details))
    if not findings:
        findings.append(Finding("state_paths", "ok", "no deny file, snapshot, usage or access log file is set"))
    return findings


# What an operator writes for the process's own output, as nginx's `access_log /dev/stdout` has it:
# a pipe or a terminal there (systemd's journal, a container's log) is no regular file, and
# `"stdout"` is the setting that writes to it, each line whole however many workers share it.
_STANDARD_STREAMS = {
    name: stream
    for stream, fd in (("stdout", 1), ("stderr", 2))
    for name in (f"/dev/{stream}", f"/dev/fd/{fd}", f"/proc/self/fd/{fd}")
}


def _file_fault(path: str, writes: bool) -> str | None:
    """Why serve could not open `path` as it exists now (a directory, no permission), or None:
    a file serve writes must be writable, one it reads readable. A missing file is no fault here."""
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path) and not os.path.isfile(path):
        return "is not a regular file (a FIFO or a device would block serve)"
    if os.path.exists(path) and not os.access(path, os.W_OK if writes else os.R_OK):
        return f"is not {'writable' if writes else 'readable'} by this user (uid {os.geteuid()})"
    return None


def check_ca_file(config: Config) -> list[Finding]:
    path = config.upstream.ca_file
    if path is None:
        return [Finding("ca_file", "ok", "unset: the system trust store only")]
    details = {"path": path}
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as exc:  # an OSError too: first
        reason = exc.reason or exc.__class__.__name__
        return [Finding("ca_file", "fail", f"upstream.ca_file {path}: no PEM certificates ({reason})", details)]
    except OSError as exc:
        return [Finding("ca_file", "fail", f"upstream.ca_file {path}: {exc.strerror or exc}", details)]
    return [Finding("ca_file", "ok", f"upstream.ca_file {path} holds PEM certificates", details)]


def check_cleartext_pool_keys(config: Config) -> list[Finding]:
    """A pool key sent over plain http leaves the host readable by anyone on the path (and a
    provider's key is good anywhere); on loopback it never leaves. A local model server on the LAN
    is the usual case: TLS in front of it, or no pool key for it (allow_anonymous), mends it."""
    findings = []
    for provider in config.providers.values():
        origin = provider.origin
        if not provider.pool_keys or origin.tls or _is_loopback(origin.host):
            continue
        message = (
            f"providers.{provider.name}.base_url is http:// to {origin.host}, not loopback: its pool keys cross"
            " the network in clear text (use https://, or a provider that needs no pool key)"
        )
        findings.append(Finding("cleartext_pool_keys", "warn", message, {"provider": provider.name}))
    if not findings:
        findings.append(Finding("cleartext_pool_keys", "ok", "every pool key goes over https or stays on loopback"))
    return findings


# --- listeners ----------------------------------------------------------------------------------


def check_open_relay(config: Config) -> list[Finding]:
    listen = config.server.listen
    host, _ = parse_listen(listen)
    if _is_loopback(host):
        return [Finding("open_relay", "ok", f"server.listen {listen} is loopback only", {"listen": listen})]
    anonymous = sorted(p.name for p in config.providers.values() if p.allow_anonymous)
    details = {"listen": listen, "allow_byo": config.keys.allow_byo, "allow_anonymous": anonymous}
    if not config.keys.allow_byo and not anonymous:
        message = f"server.listen {listen} is reachable, and only virtual keys are accepted (keys.allow_byo = false)"
        return [Finding("open_relay", "ok", message, details)]
    # auth.py passes any key that is not `bai_` through to the provider untouched unless
    # keys.allow_byo is false: a reachable listener relays for whoever holds a provider key.
    if config.keys.allow_byo:
        message = (
            f"server.listen {listen}: {OPEN_RELAY} (set keys.allow_byo = false to accept virtual keys only,"
            " or listen on loopback behind a proxy that authenticates callers)"
        )
    else:
        message = f"server.listen {listen} is reachable"
    if anonymous:
        message += f"; {', '.join(anonymous)} also take requests with no key at all (allow_anonymous)"
    return [Finding("open_relay", "warn", message, details)]


def check_callers(config: Config) -> list[Finding]:
    """Whether any request can be served (auth.Authenticator.authenticate's three ways in): a
    config that refuses them all starts, listens and passes every other check, and its first sign
    is every caller's 401 (deploy/egress.toml turns BYO keys off and trusts no issuer until edited)."""
    keys = config.keys
    issuers = len(keys.trusted_issuers)
    pooled = sorted(p.name for p in config.providers.values() if p.pool_keys)
    anonymous = sorted(p.name for p in config.providers.values() if p.allow_anonymous)
    details = {"allow_byo": keys.allow_byo, "trusted_issuers": issuers, "pooled_providers": pooled}
    if not keys.allow_byo and not issuers and not anonymous:
        message = (
            "every request is refused: keys.allow_byo = false turns callers' own keys away (401 byo_not_allowed)"
            " and keys.trusted_issuers is empty, so no virtual key verifies (401 invalid_key); add the public key"
            " `egress keys issuer-new` prints"
        )
        return [Finding("callers", "warn", message, details)]
    if issuers and not pooled:
        message = (
            f"keys.trusted_issuers has {issuers} issuer{'s' if issuers > 1 else ''}, but no provider has pool_keys:"
            " every virtual key is refused (403 no_pool_key); give [providers.NAME] pool_keys"
        )
        return [Finding("callers", "warn", message, details)]
    ways = []
    if keys.allow_byo:
        ways.append("callers' own provider keys pass through")
    if issuers:
        ways.append(f"virtual keys for {', '.join(pooled)}")
    if anonymous:
        ways.append(f"no key at all for {', '.join(anonymous)}")
    return [Finding("callers", "ok", "; ".join(ways), details)]


def check_relative_paths(config: Config) -> list[Finding]:
    paths = [
        ("upstream.ca_file", config.upstream.ca_file),
        ("keys.deny_file", config.keys.deny_file),
        ("nats.snapshot", config.nats.snapshot),
        ("usage.jsonl", config.usage.jsonl),
    ]
    if config.server.access_log not in ("stdout", "stderr", "off"):
        paths.append(("server.access_log", config.server.access_log))
    sources = [("limits.byo_hash_key", config.limits.byo_hash_key)]
    for provider in config.providers.values():
        sources += [(f"providers.{provider.name}.pool_keys[{i}]", key) for i, key in enumerate(provider.pool_keys)]
    paths += [(setting, source[len("file:") :]) for setting, source in sources if source and source.startswith("file:")]
    findings = [
        Finding(
            "relative_paths",
            "warn",
            f"{setting} {path} is relative: it is taken from the directory egress starts in ({os.getcwd()} now,"
            " / under systemd), not the config file's; give the whole path",
            {"setting": setting, "path": path},
        )
        for setting, path in paths
        if path is not None and not os.path.isabs(path)
    ]
    return findings or [Finding("relative_paths", "ok", "every path in the config is absolute")]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False  # the ports check says it can't be resolved
    return all(ipaddress.ip_address(info[4][0].partition("%")[0]).is_loopback for info in infos)


def check_ports(config: Config) -> list[Finding]:
    server = config.server
    addresses = [("server.listen", server.listen)]
    if server.admin_listen != "off":
        addresses.append(("server.admin_listen", server.admin_listen))  # one port, every worker's
    findings = []
    for setting, address in addresses:
        problem = _bind_problem(*parse_listen(address))
        details = {"setting": setting, "address": address}
        if problem is None:
            findings.append(Finding("ports", "ok", f"{setting} {address} is free", details))
        else:
            findings.append(Finding("ports", "warn", f"{setting} {address}: {problem}", details))
    return findings


def _bind_problem(host: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            # As serve.py binds: SO_REUSEADDR, so a port only in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "in use (egress may already be running)"
                return f"cannot bind: {exc.strerror}"
    return None


# --- --check: each account against its provider ------------------------------------------------


def check_accounts(config: Config, skip: frozenset[str] = frozenset()) -> list[Finding]:
    """One unbilled model-list request per account of each provider with pool keys, but those in
    `skip` (a source that failed to load is a `pool_keys` failure already)."""
    findings = []
    rotations: dict[str, PoolRotation] = {}
    for provider in config.providers.values():
        if not provider.pool_keys or provider.name in skip:
            continue
        try:
            # load_pools names the accounts as the running egress does (a named file of several
            # keys: name-1, name-2, ...) and gives each key the header its provider gets.
            one = dataclasses.replace(config, providers=MappingProxyType({provider.name: provider}))
            rotations[provider.name] = load_pools(one)[provider.name]
        except SecretSourceError as exc:
            findings.append(Finding("accounts", "fail", f"{provider.name}: {exc}", {"provider": provider.name}))
    if not rotations and not findings:
        return [Finding("accounts", "ok", "no pool keys to check")]
    providers = [config.providers[name] for name in rotations]
    try:
        tls = make_tls_context(config.upstream.ca_file) if any(p.origin.tls for p in providers) else None
    except (OSError, ssl.SSLError):
        return [
            *findings,
            Finding(
                "accounts", "fail", "upstream.ca_file does not load (see ca_file): no account can be checked over TLS"
            ),
        ]
    try:
        return findings + asyncio.run(_check_all(providers, rotations, tls))
    finally:
        for rotation in rotations.values():
            rotation.wipe()


async def _check_all(
    providers: list[Provider], rotations: dict[str, PoolRotation], tls: ssl.SSLContext | None
) -> list[Finding]:
    probes = [
        _check_account(provider, account, tls)
        for provider in providers
        for account in rotations[provider.name].accounts
    ]
    return list(await asyncio.gather(*probes))


async def _check_account(provider: Provider, account: Account, tls: ssl.SSLContext | None) -> Finding:
    details: dict[str, Any] = {"provider": provider.name, "account": account.id}
    where = f"{provider.name} account {account.id}"
    origin = provider.origin
    headers = list_headers(provider, account.credential(), USER_AGENT)
    conn = h11.Connection(h11.CLIENT)
    try:
        head = conn.send(h11.Request(method="GET", target=list_target(provider), headers=headers))
    except h11.LocalProtocolError:
        # Its message quotes the header value, which is the key.
        return Finding("accounts", "fail", f"{where}: the key is not a valid header value", details)
    writer = None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                origin.host,
                origin.port,
                ssl=tls if origin.tls else None,
                server_hostname=origin.host if origin.tls else None,
            )
            writer.write(head)
            writer.write(conn.send(h11.EndOfMessage()))
            status = await _read_status(conn, reader)
    except TimeoutError:
        return Finding(
            "accounts", "fail", f"{where}: no answer from {origin.pool_key} within {CHECK_TIMEOUT:g} s", details
        )
    except ssl.SSLCertVerificationError as exc:
        message = f"{where}: {origin.pool_key}: certificate not trusted ({exc.verify_message})"
        return Finding("accounts", "fail", message, details)
    except (OSError, ssl.SSLError) as exc:
        return Finding("accounts", "fail", f"{where}: cannot connect to {origin.pool_key}: {_describe(exc)}", details)
    except h11.RemoteProtocolError:
        # Also a close before any answer: h11 names it a protocol error.
        return Finding("accounts", "fail", f"{where}: {origin.pool_key} gave no well-formed HTTP answer", details)
    finally:
        if writer is not None:
            writer.transport.abort()  # a probe: no TLS close_notify to wait for
    details["status"] = status
    if status == 200:
        return Finding("accounts", "ok", f"{where}: the provider accepts this key (200)", details)
    if status in (401, 403):
        return Finding("accounts", "fail", f"{where}: the provider refuses this key ({status})", details)
    if status == 429:
        return Finding("accounts", "warn", f"{where}: rate limited or out of quota (429)", details)
    return Finding(
        "accounts", "warn", f"{where}: unexpected answer {status} to GET {list_target(provider).decode()}", details
    )


async def _read_status(conn: h11.Connection, reader: asyncio.StreamReader) -> int:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            return event.status_code


def _describe(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    return exc.strerror or str(exc) or exc.__class__.__name__


# What serve refuses to start without (`preflight`), and doctor runs first, in this order.
_STARTUP_CHECKS = (check_routes, check_pool_keys, check_state_paths, check_ca_file, check_byo_hash_key, check_nats)
# What a SIGHUP refuses: the checks of what a reload changes (serve.RESTART_ONLY keeps the paths,
# the hash key and NATS as they were at start).
RELOAD_CHECKS = (check_routes, check_pool_keys, check_ca_file)
