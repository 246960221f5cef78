"""`egress usage report`: totals from the usage JSONL files, by key, subject, provider or model.

Reads the current file and its rotations, skips lines that are not a whole fact (a crash can leave
half a line; a file edited by hand can hold anything) and says on stderr how many it skipped, and
counts each request id once, so a fact written twice is billed once.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable

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
    skipped: dict[str, int] = {}
    totals = aggregate(files_of(path), cutoff, _GROUPS[args.by], skipped, relist=lambda: files_of(path))
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
    done: dict[tuple[int, int], int] = {}  # (device, inode) -> bytes read
    tails: dict[tuple[int, int], tuple[str, bytes]] = {}
    bad: dict[str, int] = defaultdict(int)

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
        if fact["ts"] < cutoff or fact["request_id"] in seen:
            return
        seen.add(fact["request_id"])
        row = totals[fact.get(field) or "-"]
        row["requests"] += 1
        for field_name, column in _TOKEN_COLUMNS.items():
            row[column] += fact.get(field_name) or 0
        cost = fact.get("provider_cost")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            row["provider_cost"] += cost
        state = fact.get("usage")
        if state in _STATES:
            row[state] += 1

    listing = list(paths)
    for _ in range(1000):  # bounded: each pass but the last reads something new
        progressed = False
        for path in listing:
            read = _read_on(path, done)
            if read is None:
                continue
            key, offset, data = read
            whole = data.rfind(b"\n") + 1
            done[key] = offset + whole
            tails[key] = (path, data[whole:])
            progressed = progressed or whole > 0
            for line in data[:whole].split(b"\n"):
                add(path, line)
        if relist is None or not progressed:
            break
        listing = relist()
    for path, tail in tails.values():
        add(path, tail)  # a torn last line counts as unreadable; a whole one (no newline yet) as a fact
    if skipped is not None:
        skipped.update({path: count for path, count in bad.items() if count})
    return dict(sorted(totals.items()))


def _read_on(path: str, done: dict) -> tuple[tuple[int, int], int, bytes] | None:
    """What `path` holds past what was read of the same file (by device and inode), or None."""
    try:
        with open(path, "rb") as fh:
            status = os.fstat(fh.fileno())
            key = (status.st_dev, status.st_ino)
            offset = done.get(key, 0)
            if status.st_size <= offset:
                return None
            fh.seek(offset)
            return key, offset, fh.read(status.st_size - offset)
    except FileNotFoundError:  # rotated away since it was listed: the next listing has it
        return None


def render_table(totals: dict[str, dict[str, int]], by: str) -> str:
    headers = (by, *_COLUMNS)
    rows = [(name, *(_cell(values[column]) for column in _COLUMNS)) for name, values in totals.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]]
    return "\n".join(lines) + "\n"


def _cell(value: int | float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
