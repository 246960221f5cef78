"""`egress usage report`: totals from the usage JSONL files, by key, subject, provider or model.

Reads the current file and its rotations, skips lines that are not a whole fact (a crash can leave
half a line; a file edited by hand can hold anything) and says on stderr how many it skipped, and
counts each request id once, so a fact written twice is billed once.
"""

from __future__ import annotations

import argparse
import errno
import glob
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import BinaryIO

import orjson

from egress.config import ConfigError, load_config
from egress.facts import worker_path

_SINCE = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_GROUPS = {"key": "identity", "subject": "subject", "provider": "provider", "model": "model"}
_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "estimated_output_tokens",
    "web_search_requests",
    "provider_cost",
    # Facts whose usage is not the provider's whole count, apart: a cut stream (partial), a
    # response that carried none (missing), one egress could not read (unparseable).
    "partial",
    "missing",
    "unparseable",
)
# Fact field -> report column, for the token sums.
_TOKEN_COLUMNS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_creation_tokens": "cache_write_tokens",
    "reasoning_tokens": "reasoning_tokens",
    "estimated_output_tokens": "estimated_output_tokens",
    "web_search_requests": "web_search_requests",
}
_STATES = ("partial", "missing", "unparseable")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    usage = commands.add_parser("usage", help="usage facts")
    sub = usage.add_subparsers(dest="usage_command", required=True)
    report = sub.add_parser("report", help="totals from the usage JSONL files")
    report.add_argument("--config", metavar="FILE", help="names the usage file ([usage] jsonl)")
    report.add_argument("--file", metavar="FILE", help="a usage JSONL file (its rotations are read too)")
    report.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (default 24h)")
    report.add_argument("--by", choices=sorted(_GROUPS), default="provider")
    report.add_argument("--json", action="store_true", help="JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    path = args.file
    if path is None:
        if args.config is None:
            raise ConfigError("name the usage file with --file, or a config with [usage] jsonl with --config")
        path = load_config(args.config).usage.jsonl
        if path is None:
            raise ConfigError(f"{args.config} sets no [usage] jsonl")
    match = _SINCE.match(args.since)
    if match is None:
        raise ConfigError(f"--since takes a number and one of s, m, h, d (like 24h), not {args.since!r}")
    cutoff = time.time() - int(match.group(1)) * _SECONDS[match.group(2)]
    files = files_of(path)
    if not files:
        # egress creates its usage file when it starts: none at all is a wrong path, which an empty
        # table (every total 0, exit 0) would have billed as a quiet day.
        raise FileNotFoundError(errno.ENOENT, "no usage file there, nor a rotation or a worker's file of it", path)
    skipped: dict[str, int] = {}
    totals = aggregate(files, cutoff, _GROUPS[args.by], skipped, relist=lambda: files_of(path))
    for name, count in skipped.items():
        print(f"egress: skipped {count} unreadable lines in {name}", file=sys.stderr)
    if args.json:
        sys.stdout.write(orjson.dumps(totals, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    else:
        sys.stdout.write(render_table(totals, args.by))
    return 0


def files_of(path: str) -> list[str]:
    """The file, its rotations, and the same for each worker's own file (usage-w0.jsonl, …)."""
    found = []
    # Only the file name's own "-w0" becomes a wildcard: a directory may be called "x-w0" too.
    head, _, tail = glob.escape(worker_path(path, 0)).rpartition("-w0")
    for base in [path, *sorted(glob.glob(f"{head}-w[0-9]*{tail}"))]:
        # Only egress's own rotations (.1, .2, …): logrotate's .1.gz beside them is not JSONL.
        rotated = [name for name in glob.glob(glob.escape(base) + ".[0-9]*") if name.rsplit(".", 1)[1].isdigit()]
        rotated.sort(key=lambda name: -int(name.rsplit(".", 1)[1]))
        found += [*rotated, base] if os.path.exists(base) else rotated
    return found


def _is_fact(fact: object, field: str) -> bool:
    """Shaped as egress writes a fact: anything else would crash the sums or bill the wrong row."""
    if not isinstance(fact, dict) or not isinstance(fact.get("request_id"), str):
        return False
    ts = fact.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(fact.get(field), str | None):
        return False
    for column in _TOKEN_COLUMNS:
        value = fact.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return False
    return True


def aggregate(
    paths: list[str],
    cutoff: float,
    field: str,
    skipped: dict[str, int] | None = None,
    relist: Callable[[], list[str]] | None = None,
) -> dict[str, dict[str, int]]:
    """Totals by `field` since `cutoff`; `skipped`, when given, gets the unreadable lines per file.

    Files are read by what they are (device and inode), not by name: egress rotates while a
    report reads (usage.jsonl -> .1 -> .2 ...), and a file renamed between two opens would be read
    twice under one name and missed under the other. With `relist`, the names are listed again
    after each pass, and a pass reads only what no earlier one did (a renamed file is not read
    again; a file that grew is read on from where it stopped), until a pass finds nothing new. Each
    pass takes whole lines only; a last line without its newline (a write under way, or a crash's
    torn line) is judged at the end.
    """
    totals: dict[str, dict[str, int | float]] = defaultdict(lambda: dict.fromkeys(_COLUMNS, 0))
    seen: set[str] = set()
    done = _Done()
    tails: dict[tuple[int, int], tuple[str, bytes]] = {}
    bad: dict[str, int] = defaultdict(int)
    # A background response's or a batch's id -> the fact its tokens are billed from, and that
    # fact's rank: its tokens come in the GET that finds it done (a batch's results, read), and
    # every later read repeats them (billed once).
    deferred: dict[tuple[str, str], tuple[tuple[int, float], dict]] = {}

    def add(path: str, line: bytes) -> None:
        if not line.strip():
            return
        try:
            fact = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad[path] += 1
            return
        if not _is_fact(fact, field):
            bad[path] += 1
            return
        if fact["request_id"] in seen:
            return
        state = fact.get("usage")
        key = _deferred_key(fact)
        if key is not None:
            # Ranked over every fact the files hold, those before the window too: a batch whose
            # results were read whole last week was billed then, and a read today repeats them.
            # The earliest complete fact of the id by its time, not by the order the files are read
            # in (worker by worker: worker 1's read last week comes after worker 0's today); failing
            # one, the partial one with the most tokens (of two reads cut short, the longer).
            rank = (2, -fact["ts"]) if state == "complete" else (1, _tokens(fact)) if _counts(fact) else (0, 0)
            if rank > deferred.get(key, ((0, 0), None))[0]:
                deferred[key] = (rank, fact)
        if fact["ts"] < cutoff:
            return
        seen.add(fact["request_id"])
        row = totals[fact.get(field) or "-"]
        row["requests"] += 1
        if state in _STATES:
            row[state] += 1
        if key is None:
            _add_counts(row, fact)

    listing = list(paths)
    for _ in range(1000):  # bounded: each pass but the last reads something new
        progressed = False
        for path in listing:
            for key, consumed, lines, tail, overlong in _read_on(path, done):
                tails[key] = (path, tail)
                progressed = progressed or consumed > 0
                bad[path] += overlong
                if lines:
                    for line in lines.split(b"\n"):
                        add(path, line)
        if relist is None or not progressed:
            break
        listing = relist()
    for path, tail in tails.values():
        add(path, tail)  # a torn last line counts as unreadable; a whole one (no newline yet) as a fact
    for _, fact in deferred.values():
        if fact["ts"] >= cutoff:  # billed in the window its tokens were first read whole in
            _add_counts(totals[fact.get(field) or "-"], fact)
    if skipped is not None:
        skipped.update({path: count for path, count in bad.items() if count})
    return dict(sorted(totals.items()))


def _deferred_key(fact: dict) -> tuple[str, str] | None:
    """The id a fact's tokens are billed once under: a background response's, or a batch's (a
    provider's own: two providers' batch ids never stand for one batch)."""
    response_id = fact.get("background_response_id")
    if isinstance(response_id, str):
        return ("background", response_id)
    batch_id = fact.get("batch_id")
    if isinstance(batch_id, str):
        return (f"batch:{fact.get('provider')}", batch_id)
    return None


def _add_counts(row: dict[str, int | float], fact: dict) -> None:
    for field_name, column in _TOKEN_COLUMNS.items():
        row[column] += fact.get(field_name) or 0
    cost = fact.get("provider_cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        row["provider_cost"] += cost


def _counts(fact: dict) -> bool:
    return any(fact.get(field_name) for field_name in _TOKEN_COLUMNS)


def _tokens(fact: dict) -> int:
    return sum(fact.get(name) or 0 for name in ("input_tokens", "output_tokens", "estimated_output_tokens"))


# A report holds at most a chunk and a line in memory, however large the files: a usage file is
# rotated at usage.rotate_bytes, which may be set to gigabytes, and each was read whole before.
CHUNK_BYTES = 8 << 20
# A fact is a few KiB; the longest egress could write holds a model name out of a metered JSON
# body (usage._MAX_JSON, 8 MiB), escaped. A longer "line" is not a fact: skipped, not held.
MAX_LINE_BYTES = 64 << 20


class _Done(dict):
    """(device, inode) -> bytes read of that file; `skipping`: the files whose next bytes finish
    an over-long line."""

    __slots__ = ("skipping",)

    def __init__(self) -> None:
        super().__init__()
        self.skipping: set[tuple[int, int]] = set()


def _read_on(path: str, done: _Done) -> Iterator[tuple[tuple[int, int], int, bytes, bytes, bool]]:
    """What `path` holds past what was read of the same file (by device and inode), as chunks of
    whole lines: (key, bytes consumed, the lines, the unfinished line after them, whether a line
    over MAX_LINE_BYTES was skipped) each. `done[key]` moves on past each chunk's whole lines. The
    file is opened now, and read as the chunks are taken."""
    try:
        fh = open(path, "rb")  # noqa: SIM115  (closed by _chunks)
    except FileNotFoundError:  # rotated away since it was listed: the next listing has it
        return iter(())
    return _chunks(fh, done)


def _chunks(fh: BinaryIO, done: _Done) -> Iterator[tuple[tuple[int, int], int, bytes, bytes, bool]]:
    with fh:
        status = os.fstat(fh.fileno())
        key = (status.st_dev, status.st_ino)
        offset = done.get(key, 0)
        skipping = done.skipping
        end = status.st_size  # what was written by now; later writes are the next pass's
        fh.seek(offset)
        carry = b""
        while offset + len(carry) < end:
            chunk = fh.read(min(CHUNK_BYTES, end - offset - len(carry)))
            if not chunk:
                return  # truncated under us
            start = offset
            if key in skipping:  # the rest of an over-long line, up to its newline
                newline = chunk.find(b"\n")
                if newline < 0:
                    offset = done[key] = offset + len(chunk)
                    yield key, offset - start, b"", b"", False
                    continue
                skipping.discard(key)
                offset += newline + 1
                chunk = chunk[newline + 1 :]
            data = carry + chunk if carry else chunk
            whole = data.rfind(b"\n") + 1
            lines, carry = data[:whole], data[whole:]
            offset += whole
            overlong = len(carry) > MAX_LINE_BYTES
            if overlong:
                skipping.add(key)
                offset += len(carry)
                carry = b""
            done[key] = offset
            yield key, offset - start, lines, carry, overlong


def render_table(totals: dict[str, dict[str, int]], by: str) -> str:
    headers = (by, *_COLUMNS)
    rows = [(name, *(_cell(values[column]) for column in _COLUMNS)) for name, values in totals.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]]
    return "\n".join(lines) + "\n"


def _cell(value: int | float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
