"""`egress keys …`: issuer keys, minting, inspection and revocation of virtual keys.

issuer-new  writes an Ed25519 private key (PEM, 0600, never overwritten) and prints its public key
            for `[keys] trusted_issuers`.
mint        prints one `bai_` key (stdout, alone, for scripts); its kid goes to stderr.
inspect     decodes a key and says valid / expired / not yet valid / revoked / bad signature /
            untrusted issuer, using the config's trusted issuers, clock_skew and deny-set and the
            server's own checks (auth.check_claims); never needs a private key.
revoke      adds a kid (or a whole key's kid) to the deny file and, when NATS is configured, publishes it
            to the stream; a broker that cannot be reached within 2 x connect_timeout is one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.auth import check_claims
from egress.config import ConfigError, load_config
from egress.denyset import append_deny_file, normalize_kid
from egress.errors import EgressError
from egress.vkeys import Verifier, decode_unverified, issuer_id, mint, parse_public_key, public_key_text

# What inspect prints for each refusal check_claims makes (no provider is named, so no allowlist one).
_INSPECT_STATUS = {"key_expired": "expired", "key_not_yet_valid": "not yet valid", "key_revoked": "revoked"}
_TTL = re.compile(r"^(\d+)([smhd])$")
_TTL_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_TTL = 36_500 * 86400  # a century


def add_parsers(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="virtual keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    issuer = sub.add_parser("issuer-new", help="create an issuer (Ed25519) key")
    issuer.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (PEM)")

    minting = sub.add_parser("mint", help="mint a bai_ virtual key")
    minting.add_argument("--issuer-key", required=True, metavar="FILE", help="issuer private key (PEM)")
    minting.add_argument("--sub", required=True, help="the app or team the key is for")
    minting.add_argument("--providers", help="comma-separated allowlist, e.g. openai,anthropic")
    minting.add_argument("--ttl", help="lifetime: 90s, 30m, 12h, 30d")
    minting.add_argument("--tier", help="rate-limit tier")
    minting.add_argument("--models", help="comma-separated model globs the key may use, e.g. 'gpt-4o*,claude-*'")

    inspect = sub.add_parser("inspect", help="decode a key and say whether it is valid")
    inspect.add_argument("key")
    inspect.add_argument("--config", metavar="FILE", help="for trusted issuers and the deny file")

    revoke = sub.add_parser("revoke", help="revoke a key by its kid")
    revoke.add_argument("kid", help="the key's kid, or the whole bai_ key (only its kid is used)")
    revoke.add_argument("--config", metavar="FILE", required=True, help="names the deny file and NATS")


def run(args: argparse.Namespace) -> int:
    return {
        "issuer-new": _issuer_new,
        "mint": _mint,
        "inspect": _inspect,
        "revoke": _revoke,
    }[args.keys_command](args)


def _issuer_new(args: argparse.Namespace) -> int:
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"egress: {args.out} exists; an issuer key is never overwritten", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_key = private_key.public_key()
    print(f"public key: {public_key_text(public_key)}")
    print(f"issuer id:  {issuer_id(public_key)}")
    print(f'add to the config: [keys] trusted_issuers = ["{public_key_text(public_key)}"]', file=sys.stderr)
    return 0


def _mint(args: argparse.Namespace) -> int:
    with open(args.issuer_key, "rb") as fh:
        pem = fh.read()
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Not PEM, a public key, or encrypted (TypeError): one line naming the file, not a traceback
        # ending in the library's "MalformedFraming".
        private_key = None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ConfigError(
            f"{args.issuer_key} is not an unencrypted Ed25519 private key (PEM, as `egress keys issuer-new` writes)"
        )
    if not args.sub.strip():
        raise ConfigError("--sub names the app or team the key is for: it cannot be empty")
    ttl = None
    if args.ttl is not None:
        match = _TTL.match(args.ttl)
        if match is None:
            raise ConfigError(f"--ttl takes a number and one of s, m, h, d (like 30d), not {args.ttl!r}")
        ttl = int(match.group(1)) * _TTL_SECONDS[match.group(2)]
        if not 0 < ttl <= _MAX_TTL:
            # 0 would mint a key expired at birth; more than a century is a typo (leave --ttl out for no expiry).
            raise ConfigError(f"--ttl must be between 1s and {_MAX_TTL // 86400}d, not {args.ttl!r}")
    providers = _names(args.providers)
    models = _names(args.models)
    # An allowlist that names nothing would mint a key with no allowlist at all: unrestricted.
    for option, names, what in (("--providers", providers, "provider"), ("--models", models, "model")):
        if names == []:
            print(f"egress: {option} names no {what}; leave it out for a key without that restriction", file=sys.stderr)
            return 2
    token, claims = mint(private_key, args.sub, providers=providers, ttl_seconds=ttl, tier=args.tier, models=models)
    print(token)
    print(f"kid {claims.kid} for {claims.sub}", file=sys.stderr)
    return 0


def _names(option: str | None) -> list[str] | None:
    """A comma-separated option's names; None when it was not given, [] when it names none (' , ')."""
    return None if option is None else [name.strip() for name in option.split(",") if name.strip()]


def _inspect(args: argparse.Namespace) -> int:
    token = args.key.strip().encode()
    try:
        _, _, claims = decode_unverified(token)
    except EgressError as error:
        print(f"status: invalid ({error.message})")
        return 1
    document = {
        "kid": claims.kid,
        "iss": claims.iss,
        "sub": claims.sub,
        "issued_at": claims.iat,
        "expires_at": claims.exp,
        "providers": sorted(claims.providers) if claims.providers is not None else None,
        "models": list(claims.models) if claims.models is not None else None,
        "tier": claims.tier,
    }
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.config is None:
        print("status: decoded only (pass --config to check the signature and revocation)")
        return 0
    config = load_config(args.config)
    verifier = Verifier([parse_public_key(text) for text in config.keys.trusted_issuers])
    try:
        verifier.verify(token)
    except EgressError as error:
        reason = "untrusted issuer" if "untrusted" in error.message else "bad signature"
        print(f"status: {reason}")
        return 1
    from egress.serve import load_denyset

    denyset = load_denyset(config)
    try:
        # The server's own per-request checks, so the two cannot disagree on what is valid.
        check_claims(claims, time.time(), denyset.kids, None, config.keys.clock_skew)
    except EgressError as error:
        print(f"status: {_INSPECT_STATUS.get(error.code, error.code)}")
        return 1
    print("status: valid")
    if config.nats.url is not None:
        # What was checked, said plainly: the stream itself is not read here, only what the local
        # snapshot kept of it; a key revoked on the stream since is not seen.
        if denyset.synced_at is None:
            print("revocation stream: not checked (no local snapshot of it here; this host's egress keeps one)")
        else:
            synced = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(denyset.synced_at))
            print(f"revocation stream: checked as of {synced} (the local snapshot), not since")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    kid = _kid_to_revoke(args.kid)
    config = load_config(args.config)
    if config.keys.deny_file is None and config.nats.url is None:
        raise ConfigError("the config names neither keys.deny_file nor nats.url: nowhere to revoke to")
    if config.keys.deny_file is not None:
        created = not os.path.lexists(config.keys.deny_file)
        append_deny_file(config.keys.deny_file, kid)
        if created:
            _give_to_directory_owner(config.keys.deny_file)
        print(f"revoked {kid} in {config.keys.deny_file}")
    if config.nats.url is not None:
        from egress.revocations import describe_failure, public_url, publish_revocation

        try:
            sequence = asyncio.run(publish_revocation(config.nats, kid))
        except Exception as exc:  # one line for the operator, whatever the broker did
            done = "the deny file was updated" if config.keys.deny_file is not None else "nothing was revoked"
            where = public_url(config.nats.url)
            print(f"egress: revocation not published to {where}: {describe_failure(exc)} ({done})", file=sys.stderr)
            return 1
        print(f"revoked {kid} on {config.nats.stream} (sequence {sequence})")
    return 0


def _give_to_directory_owner(path: str) -> None:
    """A deny file root has just created goes to whoever owns its directory: the service's user,
    which must read it (under deploy/egress.service, the DynamicUser owning /var/lib/egress). Left
    root's, mode 0600, the running egress could not read it (`deny_file_unreadable`: the kid stayed
    usable though `revoke` said "revoked"), and its next start refused the file."""
    if os.geteuid() != 0:
        return  # only root gives a file away; anyone else's stays its own
    directory = os.stat(os.path.dirname(os.path.realpath(path)))
    if directory.st_uid != 0:
        try:
            os.chown(path, directory.st_uid, directory.st_gid)
        except OSError as exc:  # the kid is written: said, not a failed revoke
            print(f"egress: {path} stays root's ({exc.strerror}): chown it to uid {directory.st_uid}", file=sys.stderr)


def _kid_to_revoke(argument: str) -> str:
    """A kid, or a whole key whose kid it takes. No message repeats the argument: it may be a key."""
    kid = normalize_kid(argument)
    if kid is not None:
        return kid
    text = argument.strip()
    if text.startswith("bai_"):
        try:
            _, _, claims = decode_unverified(text.encode())
        except (EgressError, ValueError):
            raise ConfigError("that looks like a bai_ key but does not decode; give its kid instead") from None
        # Unverified on purpose: revoking is safe whoever signed the key, and the kid is all we keep.
        print(f"the key given has kid {claims.kid}", file=sys.stderr)
        return claims.kid
    raise ConfigError("revoke takes a kid (16 hex digits, from `egress keys inspect`) or a whole bai_ key")
