"""Counters that outlive their worker: one slab of shared memory per worker, summed when scraped.

Contract:
- The supervisor maps `slab_bytes() * workers` of anonymous shared memory before it forks (as it
  does for the limiter). Worker i writes only slab i, through `Tally(slab, pid)`; any worker reads
  them all (`read_slab`, `sum_counters`), so whichever worker a scrape reaches answers for the host.
- A worker restarted into its slab adopts what is there: its counters go on from where the dead
  one's stopped, so a host-wide sum never goes backwards. A crash loses nothing either: every
  increment is a store into the shared mapping, with nothing to flush.
- `index(key, width)` -> the first of `width` doubles kept for `key` (a tuple of strings), made on
  first use. The hot path then adds into `values[i]` (a memoryview store, ~30 ns more than a
  list's). Doubles count exactly to 2**53.
- Gauges (`set_gauge`) are per worker: read only from a slab whose worker is alive, and labelled
  with the worker.
- A full slab refuses new keys: they are counted in the header's `overflow` (reported as
  egress_metrics_overflow_total) and their increments land in a spare cell nobody reads, so nothing
  crashes and the loss is seen.

Layout (native byte order; one writer per slab): a 64-byte header (magic, published records, pid,
capacities and use, overflow), the values (doubles; index 0 is the spare cell), then the directory:
records appended as (first value u32, width u16, kind u8, key length u16, key as JSON). A record is
written in full before the published count is raised, so a reader never sees half of one.

Sans-IO: bytes in a buffer and values; no asyncio, no clock.
"""

from __future__ import annotations

import struct

import orjson

_MAGIC = 0x45474D31  # "EGM1"
# magic, records, pid, value capacity, values used, directory capacity, directory used, overflow
_HEADER = struct.Struct("=IIqIIIIQ")
_HEADER_BYTES = 64
_RECORD = struct.Struct("=IHBH")
COUNTER, GAUGE = 0, 1
VALUE_CAPACITY = 65536  # doubles a worker's slab holds: 512 KiB
DIRECTORY_CAPACITY = 1 << 19  # bytes of keys: 512 KiB


def slab_bytes(values: int = VALUE_CAPACITY, directory: int = DIRECTORY_CAPACITY) -> int:
    return _HEADER_BYTES + 8 * values + directory


class Tally:
    """The writer of one slab: this process's counters, where its predecessor left them."""

    __slots__ = ("_buffer", "_directory", "_index", "overflow_keys", "values")

    def __init__(self, buffer: memoryview | bytearray | None = None, pid: int = 0) -> None:
        if buffer is None:  # a process of its own (tests, tools): a small private slab
            buffer = bytearray(slab_bytes(4096, 1 << 16))
        view = memoryview(buffer)
        header = _HEADER.unpack_from(view, 0)
        if header[0] != _MAGIC:
            # As much room for keys (bytes) as for values (8 bytes each): slab_bytes()'s proportions.
            values = (len(view) - _HEADER_BYTES) // 16
            directory = len(view) - _HEADER_BYTES - 8 * values
            # Value 0 is the spare cell: the first key's values start at 1.
            _HEADER.pack_into(view, 0, _MAGIC, 0, pid, values, 1, directory, 0, 0)
            header = _HEADER.unpack_from(view, 0)
        else:
            _HEADER.pack_into(view, 0, *header[:2], pid, *header[3:])
        value_capacity, directory_capacity = header[3], header[5]
        self._buffer = view
        self.values = view[_HEADER_BYTES : _HEADER_BYTES + 8 * value_capacity].cast("d")
        self._directory = view[_HEADER_BYTES + 8 * value_capacity :][:directory_capacity]
        self._index: dict[tuple, int] = {key: first for key, first, _, _ in _records(view)}
        self.overflow_keys = 0

    def __iter__(self):
        """The keys this slab holds."""
        return iter(self._index)

    def index(self, key: tuple, width: int = 1, kind: int = COUNTER) -> int:
        first = self._index.get(key)
        if first is None:
            first = self._index[key] = self._make(key, width, kind)
        return first

    def add(self, key: tuple, amount: float = 1) -> None:
        first = self._index.get(key)
        if first is None:
            first = self._index[key] = self._make(key, 1, COUNTER)
        self.values[first] += amount

    def get(self, key: tuple) -> float:
        first = self._index.get(key)
        return self.values[first] if first else 0.0  # 0: a key the full slab refused

    def set_gauge(self, key: tuple, value: float) -> None:
        first = self._index.get(key)
        if first is None:
            first = self._index[key] = self._make(key, 1, GAUGE)
        self.values[first] = value

    def retire(self) -> None:
        """This process leaves: its gauges are no longer read (its counters still are)."""
        header = _HEADER.unpack_from(self._buffer, 0)
        _HEADER.pack_into(self._buffer, 0, *header[:2], 0, *header[3:])

    def _make(self, key: tuple, width: int, kind: int) -> int:
        buffer = self._buffer
        magic, records, pid, value_capacity, used, directory_capacity, directory_used, overflow = _HEADER.unpack_from(
            buffer, 0
        )
        encoded = orjson.dumps(key)
        size = _RECORD.size + len(encoded)
        # A record's width and key length are u16: a longer key is refused as overflow, never a
        # struct.error out of the log phase (which lost the request's usage fact with it).
        if (
            used + width > value_capacity
            or directory_used + size > directory_capacity
            or width > 0xFFFF
            or len(encoded) > 0xFFFF
        ):
            self.overflow_keys += 1
            _HEADER.pack_into(buffer, 0, *_HEADER.unpack_from(buffer, 0)[:7], overflow + 1)
            return 0  # the spare cell; `values[0]` may be added to, never read
        _RECORD.pack_into(self._directory, directory_used, used, width, kind, len(encoded))
        self._directory[directory_used + _RECORD.size : directory_used + size] = encoded
        # Published last: a reader walks `records` records, each already whole.
        _HEADER.pack_into(
            buffer,
            0,
            magic,
            records + 1,
            pid,
            value_capacity,
            used + width,
            directory_capacity,
            directory_used + size,
            overflow,
        )
        return used


def _records(view: memoryview):
    """(key, first, width, kind) of each published record of a slab."""
    magic, records, _, value_capacity, _, _, _, _ = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        return
    directory = view[_HEADER_BYTES + 8 * value_capacity :]
    at = 0
    for _ in range(records):
        first, width, kind, length = _RECORD.unpack_from(directory, at)
        at += _RECORD.size
        yield _tupled(orjson.loads(directory[at : at + length])), first, width, kind
        at += length


def keys_of(view: memoryview):
    """The keys a slab holds, read by any process (no values: cheaper than a `Slab`)."""
    for key, _, _, _ in _records(view):
        yield key


def _tupled(value):
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value


class Slab:
    """What one slab holds, read by any process: pid (0 once its worker left), counters, gauges."""

    __slots__ = ("counters", "gauges", "overflow", "pid")

    def __init__(self, view: memoryview) -> None:
        header = _HEADER.unpack_from(view, 0)
        self.pid = header[2] if header[0] == _MAGIC else 0
        self.overflow = header[7] if header[0] == _MAGIC else 0
        values = view[_HEADER_BYTES : _HEADER_BYTES + 8 * header[3]].cast("d") if header[0] == _MAGIC else None
        self.counters: dict[tuple, list[float]] = {}
        self.gauges: dict[tuple, float] = {}
        for key, first, width, kind in _records(view):
            if kind == GAUGE:
                self.gauges[key] = values[first]
            else:
                self.counters[key] = values[first : first + width].tolist()


def slab_of(buffer: memoryview, count: int, index: int) -> memoryview:
    """Worker `index`'s slab of the host's `count`."""
    size = len(buffer) // count
    return buffer[index * size : (index + 1) * size]


def read_slabs(buffer: memoryview, count: int) -> list[Slab]:
    return [Slab(slab_of(buffer, count, index)) for index in range(count)]


def sum_counters(slabs: list[Slab]) -> dict[tuple, list[float]]:
    """Each key's values summed over the slabs, element by element."""
    total: dict[tuple, list[float]] = {}
    for slab in slabs:
        for key, values in slab.counters.items():
            have = total.get(key)
            if have is None:
                total[key] = list(values)
            elif len(have) == len(values):
                for position, value in enumerate(values):
                    have[position] += value
    return total
