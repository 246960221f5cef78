"""Secrets held in memory: provider pool keys.

Contract: a `Secret` never shows its value in `repr`, `str`, `format` or pickling; `equals()`
compares in constant time; `wipe()` overwrites the bytes (a bytearray, so Python lets us) and is
called at shutdown. Values are loaded from `env:NAME` or `file:PATH` sources, never from the config
file itself, so the config can be printed, committed and logged. `header_fault(value)` says why a
key can't be sent in a header (doctor's pool_keys check, which serve and a reload run first), by
its source and line, never by its bytes.
"""

from __future__ import annotations

import errno
import hmac
import os
import stat


class SecretSourceError(ValueError):
    """A pool-key source can't be read. The message names the source, never a value."""


class Secret:
    __slots__ = ("_value", "line", "source")

    def __init__(self, value: bytes | bytearray, source: str, line: int = 0) -> None:
        self._value = bytearray(value)
        self.source = source  # "env:NAME" or "file:PATH": safe to show
        self.line = line  # its line in a key file (0: not from a file), to name it without showing it

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


def read_regular_file(path: str, limit: int = -1) -> bytes:
    """The bytes of `path`, which must be a regular file: opening a FIFO blocks until a writer
    comes (the event loop with it, for good), and a device never ends. Opened without blocking,
    checked, then read; raises OSError naming the file, as open() would. With `limit`, at most that
    many bytes are read (a caller refusing a file over a size reads one byte past it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        chunks = []
        size = 0
        while limit < 0 or size < limit:
            chunk = os.read(fd, 1 << 20 if limit < 0 else min(limit - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors save: no part of the text


def load_secrets(source: str) -> list[Secret]:
    """`env:NAME` -> one secret; `file:PATH` -> one per non-blank, non-comment line."""
    kind, _, where = source.partition(":")
    if kind == "env":
        # As bytes: a value that is not UTF-8 (os.environ holds it as surrogates, which .encode()
        # refuses with a traceback) is the bytes the operator set; header_fault judges them.
        value = os.environb.get(os.fsencode(where), b"").strip()
        if not value:
            raise SecretSourceError(f"environment variable {where} is unset or empty")
        return [Secret(value, source)]
    if kind == "file":
        try:
            # Editors on Windows save a byte order mark: it is no part of the first key.
            lines = read_regular_file(where).removeprefix(BOM).splitlines()
        except OSError as exc:
            raise SecretSourceError(f"cannot read key file {where}: {exc.strerror}") from None
        secrets = [
            Secret(line.strip(), source, number)
            for number, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith(b"#")
        ]
        if not secrets:
            raise SecretSourceError(f"key file {where} holds no key")
        return secrets
    # Not echoed: what stands where a source belongs is most likely the key itself.
    raise SecretSourceError(
        "a key source is 'env:NAME' or 'file:PATH', and this one is neither "
        "(a literal key? keys never go in the config file)"
    )


def header_fault(value: bytes | bytearray) -> str | None:
    """Why `value` can't be sent as a provider key in a header, never quoting it; None if it can.

    A key is a token (RFC 9110 section 11.2, token68: visible ASCII, no space): a control byte
    would make the provider (or any HTTP parser on the way) refuse the request, and a space or a
    non-ASCII byte is a paste gone wrong ("Bearer sk-...", two keys on one line, a stray
    character), which the provider refuses as an invalid key once traffic reaches it.
    """
    for byte in value:
        if byte < 0x21 or byte > 0x7E:
            if byte in (0x20, 0x09):
                return "holds a space or tab (a 'Bearer ' prefix, or two keys on one line?)"
            if byte > 0x7E:
                return "holds a byte that is not ASCII"
            return "holds a control character"
    return None
