"""Secrets held in memory: provider pool keys.

Contract: a `Secret` never shows its value in `repr`, `str`, `format` or pickling; `equals()`
compares in constant time; `wipe()` overwrites the bytes (a bytearray, so Python lets us) and is
called at shutdown. Values are loaded from `env:NAME` or `file:PATH` sources, never from the config
file itself, so the config can be printed, committed and logged.
"""

from __future__ import annotations

import hmac
import os


class SecretSourceError(ValueError):
    """A pool-key source can't be read. The message names the source, never a value."""


class Secret:
    __slots__ = ("_value", "source")

    def __init__(self, value: bytes | bytearray, source: str) -> None:
        self._value = bytearray(value)
        self.source = source  # "env:NAME" or "file:PATH": safe to show

    def reveal(self) -> bytearray:
        """The value itself (not a copy), for the one place that must send it upstream."""
        return self._value

    def equals(self, other: bytes | bytearray) -> bool:
        return hmac.compare_digest(bytes(self._value), bytes(other))

    def wipe(self) -> None:
        for index in range(len(self._value)):
            self._value[index] = 0

    def __repr__(self) -> str:
        return f"Secret(<redacted from {self.source}>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):
        raise TypeError("a Secret can't be pickled")


def load_secrets(source: str) -> list[Secret]:
    """`env:NAME` -> one secret; `file:PATH` -> one per non-blank, non-comment line."""
    kind, _, where = source.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise SecretSourceError(f"environment variable {where} is unset or empty")
        return [Secret(value.strip().encode(), source)]
    if kind == "file":
        try:
            with open(where, "rb") as fh:
                lines = fh.read().splitlines()
        except OSError as exc:
            raise SecretSourceError(f"cannot read key file {where}: {exc.strerror}") from None
        secrets = [Secret(line.strip(), source) for line in lines if line.strip() and not line.startswith(b"#")]
        if not secrets:
            raise SecretSourceError(f"key file {where} holds no key")
        return secrets
    # Not echoed: what stands where a source belongs is most likely the key itself.
    raise SecretSourceError(
        "a key source is 'env:NAME' or 'file:PATH', and this one is neither "
        "(a literal key? keys never go in the config file)"
    )
