"""`egress usage report`: totals from the usage JSONL files, by key, subject, provider or model.

Reads the current file and its rotations, skips lines it can't parse (a crash can leave half a
line), and counts each request id once, so a fact written twice is billed once.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from collections import defaultdict

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
    "estimated_output_tokens",
    "partial",
    "missing",
)


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
    totals = aggregate(files_of(path), cutoff, _GROUPS[args.by])
    if args.json:
        sys.stdout.write(orjson.dumps(totals, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    else:
        sys.stdout.write(render_table(totals, args.by))
    return 0


def files_of(path: str) -> list[str]:
    """The file, its rotations, and the same for each worker's own file (usage-w0.jsonl, …)."""
    found = []
    for base in [path, *sorted(glob.glob(glob.escape(worker_path(path, 0)).replace("-w0", "-w[0-9]*")))]:
        rotated = sorted(glob.glob(glob.escape(base) + ".[0-9]*"), key=lambda name: -int(name.rsplit(".", 1)[1]))
        found += [*rotated, base] if os.path.exists(base) else rotated
    return found


def aggregate(paths: list[str], cutoff: float, field: str) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COLUMNS, 0))
    seen: set[str] = set()
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    fact = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(fact, dict) or fact.get("ts", 0) < cutoff or fact.get("request_id") in seen:
                    continue
                seen.add(fact.get("request_id"))
                row = totals[str(fact.get(field) or "-")]
                row["requests"] += 1
                for column in ("input_tokens", "output_tokens", "cache_read_tokens", "estimated_output_tokens"):
                    row[column] += fact.get(column) or 0
                if fact.get("usage") == "partial":
                    row["partial"] += 1
                elif fact.get("usage") in ("missing", "unparseable"):
                    row["missing"] += 1
    return dict(sorted(totals.items()))


def render_table(totals: dict[str, dict[str, int]], by: str) -> str:
    headers = (by, *_COLUMNS)
    rows = [(name, *(str(values[column]) for column in _COLUMNS)) for name, values in totals.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]]
    return "\n".join(lines) + "\n"
