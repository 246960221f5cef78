"""The deny-set core, without a process or a broker: deny-file lines, stream messages, snapshots."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress.denyset import DenySet, append_deny_file, parse_deny_file, read_deny_file, stream_kid
from egress.tally import Tally

KID_A = "0123456789abcdef"
KID_B = "fedcba9876543210"

# (file bytes, kids, bad line numbers)
DENY_FILES = [
    (b"", set(), ()),
    (f"{KID_A}\n{KID_B}\n".encode(), {KID_A, KID_B}, ()),
    (f"{KID_A}\r\n{KID_B}\r\n".encode(), {KID_A, KID_B}, ()),
    (f"{KID_A}\r{KID_B}".encode(), {KID_A, KID_B}, ()),
    (f"# revoked\n\n   \n{KID_A}  # leaked in a log, 2024-05-01\n".encode(), {KID_A}, ()),
    (f"  {KID_A.upper()}\t\n".encode(), {KID_A}, ()),
    (f"\ufeff{KID_A}\n".encode(), {KID_A}, ()),  # a BOM from a Windows editor
    (f"{KID_A}\n\xff\xfe\n{KID_B}\n".encode("latin-1"), {KID_A, KID_B}, (2,)),
    (f"{KID_A}0\nnot a kid\n{KID_B}\n".encode(), {KID_B}, (1, 2)),
    (b"bai_eyJraWQiOiIwMTIzIn0.c2ln\n", set(), (1,)),
]


@pytest.mark.parametrize(("data", "kids", "bad"), DENY_FILES)
def test_parse_deny_file(data: bytes, kids: set[str], bad: tuple[int, ...]) -> None:
    assert parse_deny_file(data) == (frozenset(kids), bad)


@given(st.binary(max_size=400))
def test_parse_deny_file_takes_any_bytes(data: bytes) -> None:
    kids, bad = parse_deny_file(data)
    assert all(len(kid) == 16 for kid in kids)
    assert all(number >= 1 for number in bad)


def test_read_deny_file_missing_is_empty(tmp_path) -> None:
    assert read_deny_file(str(tmp_path / "absent")) == (frozenset(), ())


def test_append_deny_file_after_a_line_without_newline(tmp_path) -> None:
    path = tmp_path / "deny.txt"
    path.write_bytes(KID_A.encode())
    append_deny_file(str(path), KID_B)
    append_deny_file(str(path), KID_B)
    assert path.read_bytes() == f"{KID_A}\n{KID_B}\n".encode()


@pytest.mark.parametrize(
    ("body", "kid"),
    [
        (KID_A.encode(), KID_A),
        (f"  {KID_A.upper()} \r\n".encode(), KID_A),
        (b"", None),
        (b"\xff\xfe", None),
        (KID_A.encode() + b"0", None),
        (b"bai_eyJraWQiOiIwMTIzIn0.c2ln", None),
    ],
)
def test_stream_kid(body: bytes, kid: str | None) -> None:
    assert stream_kid(body) == kid


def test_apply_stream_ignores_redeliveries_and_garbage_moves_the_sequence() -> None:
    denyset = DenySet()
    assert denyset.apply_stream(KID_A, 1)
    assert not denyset.apply_stream(KID_B, 1)  # a redelivery of sequence 1
    assert denyset.apply_stream(None, 2)
    assert denyset.apply_stream(KID_A, 3)  # the same kid again, later: harmless
    assert KID_A in denyset and KID_B not in denyset
    assert denyset.last_sequence == 3 and len(denyset) == 1


def test_stream_messages_that_are_no_kid_are_counted_in_the_workers_tally() -> None:
    """They were only logged, one line each: the deny file's skipped lines had a counter, these none."""
    tally = Tally()
    denyset = DenySet(tally)
    denyset.apply_stream(KID_A, 1)
    denyset.apply_stream(None, 2)  # not UTF-8, or not a kid: stream_kid gives None
    denyset.apply_stream("not a kid", 3)
    denyset.apply_stream(None, 3)  # a redelivery is not counted again
    assert denyset.stream_messages_ignored == 2
    assert tally.get(("revocation_messages_ignored",)) == 2
    assert DenySet(tally).stream_messages_ignored == 2  # a restarted worker goes on from its slab


# (our stream id, our last sequence, the stream's id, its last sequence, is it another stream)
STREAMS = [
    ("2024-01-01T00:00:00Z", 15, "2024-01-01T00:00:00Z", 15, False),
    ("2024-01-01T00:00:00Z", 15, "2024-01-01T00:00:00Z", 40, False),
    ("2024-01-01T00:00:00Z", 15, "2024-06-01T00:00:00Z", 40, True),  # recreated, and grown past us
    ("2024-01-01T00:00:00Z", 15, "2024-06-01T00:00:00Z", 3, True),
    ("2024-01-01T00:00:00Z", 15, "2024-01-01T00:00:00Z", 3, True),  # the same id cannot shrink
    (None, 15, "2024-06-01T00:00:00Z", 40, False),  # a snapshot from before ids were kept
    (None, 15, "2024-06-01T00:00:00Z", 3, True),
    (None, 0, "2024-06-01T00:00:00Z", 0, False),
    ("2024-01-01T00:00:00Z", 15, None, 40, False),  # a server that does not say
]


@pytest.mark.parametrize(("ours", "sequence", "theirs", "last", "other"), STREAMS)
def test_adopt_stream(ours, sequence, theirs, last, other) -> None:
    denyset = DenySet()
    if sequence:
        denyset.apply_stream(KID_A, sequence)
    denyset.stream_created = ours
    assert denyset.is_other_stream(theirs, last) is other
    assert denyset.adopt_stream(theirs, last) is other
    assert denyset.last_sequence == (0 if other else sequence)
    assert denyset.stream_created == (theirs if theirs is not None else ours)
    assert (KID_A in denyset) is bool(sequence)  # a replay merges; a kid is never forgotten


def test_snapshot_round_trip_keeps_the_stream_id_and_leaves_the_file_kids_out() -> None:
    denyset = DenySet()
    denyset.replace_file_kids(frozenset({KID_B}))
    denyset.adopt_stream("2024-01-01T00:00:00.123456Z", 0)
    denyset.apply_stream(KID_A, 7)
    document = orjson.loads(denyset.snapshot_bytes())
    assert document["kids"] == [KID_A] and document["last_sequence"] == 7
    assert document["stream_created"] == "2024-01-01T00:00:00.123456Z"
    restored = DenySet()
    restored.replace_file_kids(frozenset({KID_B}))
    restored.load_snapshot(denyset.snapshot_bytes())
    assert restored.last_sequence == 7 and restored.stream_created == "2024-01-01T00:00:00.123456Z"
    assert KID_A in restored and KID_B in restored


def test_a_snapshot_without_a_stream_id_still_loads() -> None:
    denyset = DenySet()
    denyset.load_snapshot(b'{"version":1,"last_sequence":4,"kids":["0123456789abcdef"],"written_at":1.5}')
    assert denyset.last_sequence == 4 and denyset.stream_created is None and KID_A in denyset


BAD_SNAPSHOTS = [
    b"",
    b"\x00\xff",
    b'{"version":1,"last_sequence":3,"kids":["0123',
    b"[]",
    b"null",
    b'{"version":2,"last_sequence":1,"kids":[]}',
    b'{"version":1,"kids":[]}',
    b'{"version":1,"last_sequence":1}',
    b'{"version":1,"last_sequence":1,"kids":5}',
    b'{"version":1,"last_sequence":1,"kids":"0123456789abcdef"}',
    b'{"version":1,"last_sequence":null,"kids":[]}',
    b'{"version":1,"last_sequence":"7","kids":[]}',
    b'{"version":1,"last_sequence":true,"kids":[]}',
    b'{"version":1,"last_sequence":1.5,"kids":[]}',
    b'{"version":1,"last_sequence":-4,"kids":[]}',
    b'{"version":1,"last_sequence":2,"kids":[],"written_at":"yesterday"}',
    b'{"version":1,"last_sequence":2,"kids":[],"stream_created":5}',
    b'{"version":1,"last_sequence":2,"kids":[],"synced_at":"an hour ago"}',
    b'{"version":1,"last_sequence":2,"kids":[],"synced_at":true}',
]


@pytest.mark.parametrize("data", BAD_SNAPSHOTS)
def test_a_bad_snapshot_raises_value_error_and_changes_nothing(data: bytes) -> None:
    denyset = DenySet()
    denyset.replace_file_kids(frozenset({KID_B}))
    with pytest.raises(ValueError):
        denyset.load_snapshot(data)
    assert denyset.last_sequence == 0 and denyset.stream_created is None and set(denyset.kids) == {KID_B}


@given(st.binary(max_size=200))
def test_load_snapshot_raises_only_value_error(data: bytes) -> None:
    try:
        DenySet().load_snapshot(data)
    except ValueError:
        pass


def test_kids_in_a_snapshot_that_are_not_kids_are_dropped() -> None:
    denyset = DenySet()
    denyset.load_snapshot(b'{"version":1,"last_sequence":2,"kids":["0123456789abcdef",7,"nope",null]}')
    assert set(denyset.kids) == {KID_A}


def test_a_snapshot_keeps_when_the_stream_was_last_in_step_not_when_it_was_written() -> None:
    """A stop an hour into a broker outage writes the snapshot; the next start must still say an hour."""
    denyset = DenySet()
    denyset.apply_stream(KID_A, 1)
    denyset.connected = False
    denyset.synced_at = time.time() - 3600  # the broker went away an hour ago
    restored = DenySet()
    restored.load_snapshot(denyset.snapshot_bytes())
    assert restored.age_seconds() > 3500
    # While connected the stream part is complete as of the write.
    denyset.connected = True
    restored.load_snapshot(denyset.snapshot_bytes())
    assert restored.age_seconds() < 60
    # Never in step with any stream: no age is made up for it.
    never = DenySet()
    restored.load_snapshot(never.snapshot_bytes())
    assert restored.age_seconds() is None
