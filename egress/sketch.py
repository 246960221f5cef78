"""Count-min sketches for rate limiting at fixed memory (sans-IO: values in, values out).

Contract:
  `CountMinSketch(width, depth)` counts events per key in width x depth 32-bit counters.
  `slots(key)` maps a key to its `depth` counter positions once; callers may keep them.
  `add(slots, amount)` uses the conservative update (only counters at the current minimum grow),
  `estimate(slots)` returns the minimum. A count is never under-estimated. It is over-estimated
  by at most ε·N (N = total added) with probability at least 1 - δ, where ε = e / width and
  δ = e^-depth (Cormode & Muthukrishnan, 2005). The conservative update only ever lowers the
  over-estimate. Defaults: width 32768, depth 4 → ε ≈ 8.3e-5, δ ≈ 1.8 %.
  `SlidingWindow` keeps two sketches, the current and the previous window, and weighs the
  previous one by how much of it still overlaps the sliding window, like pingora-limits' Rate
  and Cloudflare's sliding-window limiter. Both can live in a shared buffer (an mmap made before
  the workers fork), so a key's limit holds across the worker processes of one host.
"""

from __future__ import annotations

import hashlib
import math


class CountMinSketch:
    __slots__ = ("_counters", "_raw", "depth", "width")

    def __init__(self, width: int, depth: int, buffer: memoryview | None = None) -> None:
        if width < 1 or depth < 1 or depth > 8:
            raise ValueError("width must be positive and depth 1..8")
        self.width = width
        self.depth = depth
        # Counters live in `buffer` when given (shared memory between worker processes).
        self._raw = memoryview(bytearray(4 * width * depth)) if buffer is None else buffer.cast("B")
        self._counters = self._raw.cast("I")
        if len(self._counters) != width * depth:
            raise ValueError("buffer size does not match width x depth")

    @staticmethod
    def bytes_needed(width: int, depth: int) -> int:
        return 4 * width * depth

    @property
    def epsilon(self) -> float:
        return math.e / self.width

    @property
    def delta(self) -> float:
        return math.exp(-self.depth)

    @property
    def nbytes(self) -> int:
        return self._counters.nbytes

    def slots(self, key: bytes) -> tuple[int, ...]:
        # One BLAKE2b digest gives `depth` independent 64-bit hashes; stable across processes, so
        # a sketch shared between workers agrees on where a key lives.
        digest = hashlib.blake2b(key, digest_size=8 * self.depth).digest()
        width = self.width
        return tuple(
            row * width + int.from_bytes(digest[8 * row : 8 * row + 8], "little") % width for row in range(self.depth)
        )

    def estimate(self, slots: tuple[int, ...]) -> int:
        return _least(self._counters, slots)

    def add(self, slots: tuple[int, ...], amount: int = 1) -> int:
        return _conservative_add(self._counters, slots, amount)

    def clear(self) -> None:
        self._raw[:] = bytes(self._raw.nbytes)


def _least(counters: memoryview, slots: tuple[int, ...]) -> int:
    """The smallest of the counters at `slots`: a plain loop, a third of `min(map(...))`'s cost
    (the map's bound method and the builtin's argument handling outweigh four reads)."""
    least = 0xFFFFFFFF
    for slot in slots:
        count = counters[slot]
        if count < least:
            least = count
    return least


def _conservative_add(counters: memoryview, slots: tuple[int, ...], amount: int) -> int:
    target = _least(counters, slots) + amount
    if target > 0xFFFFFFFF:
        target = 0xFFFFFFFF
    for slot in slots:
        if counters[slot] < target:
            counters[slot] = target
    return target


_HEADER_BYTES = 16  # two int64: the window number each of the two sketches holds
HALF = 0.5  # `take` admits while the windowed count, rounded to whole events, is under the limit


class SlidingWindow:
    """Events per key over the last `window` seconds, from two sketches that take turns.

    Windows are aligned on the monotonic clock (window n covers [n·W, (n+1)·W)), which is one clock
    for every process on the host, so workers sharing the buffer agree on which sketch is current
    without talking to each other. Sketch n % 2 holds window n; a sketch found holding an older
    window is cleared before use. Two workers may race on that clear or on one counter: at most an
    increment is lost, which the over-counting of the sketch usually hides.
    """

    __slots__ = ("_counters", "_held", "_sketches", "window")

    def __init__(self, width: int, depth: int, window: float, buffer: memoryview | None = None) -> None:
        self.window = window
        size = CountMinSketch.bytes_needed(width, depth)
        if buffer is None:
            buffer = memoryview(bytearray(self.bytes_needed(width, depth)))
        buffer = buffer.cast("B")
        self._held = buffer[:_HEADER_BYTES].cast("q")
        if not any(self._held):  # a fresh buffer: neither sketch holds a window yet
            self._held[0] = self._held[1] = -2
        body = buffer[_HEADER_BYTES:]
        self._sketches = (
            CountMinSketch(width, depth, body[:size]),
            CountMinSketch(width, depth, body[size : 2 * size]),
        )
        # The hot path reads the counters directly: a method call per sketch costs more than the read.
        self._counters = (self._sketches[0]._counters, self._sketches[1]._counters)

    @staticmethod
    def bytes_needed(width: int, depth: int) -> int:
        return _HEADER_BYTES + 2 * CountMinSketch.bytes_needed(width, depth)

    def slots(self, key: bytes) -> tuple[int, ...]:
        return self._sketches[0].slots(key)

    def _counts(self, slots: tuple[int, ...], now: float) -> tuple[int, int, float]:
        """The current window's count, the previous window's, and when the current one started."""
        number = math.floor(now / self.window)
        held = self._held
        index = number % 2
        current = self._sketches[index].estimate(slots) if held[index] == number else 0
        previous = self._sketches[1 - index].estimate(slots) if held[1 - index] == number - 1 else 0
        return current, previous, number * self.window

    def estimate(self, slots: tuple[int, ...], now: float) -> float:
        window = self.window
        number = math.floor(now / window)
        held = self._held
        index = number % 2
        current = _least(self._counters[index], slots) if held[index] == number else 0
        if held[1 - index] != number - 1:
            return current
        previous = _least(self._counters[1 - index], slots)
        return current + previous * max(0.0, 1.0 - (now - number * window) / window)

    def add(self, slots: tuple[int, ...], amount: int, now: float) -> None:
        number = math.floor(now / self.window)
        index = number % 2
        if self._held[index] != number:
            self._sketches[index].clear()
            self._held[index] = number
        _conservative_add(self._counters[index], slots, amount)

    def take(self, slots: tuple[int, ...], now: float, limit: int) -> float | None:
        """One event counted unless the windowed count would pass `limit` (0: no limit): None when
        counted, else the count that refused it. `estimate` then `add` in one pass (the hot path).

        The previous window's share is a fraction of its events, and the event is admitted while
        that share, rounded to the nearest whole event, leaves room (`used <= limit - HALF`). Held
        to `used + 1 <= limit`, any part of an event from the previous window blocked the last slot
        of the current one until that window ended: a busy caller got limit - 1 per window, and a
        limit of 1 one event every two windows. nginx's limit_req, Envoy's token bucket and
        LiteLLM's per-minute counters all let `limit` through per minute; rounding does too, and
        paces a steady caller at one event every window / limit."""
        window = self.window
        number = math.floor(now / window)
        index = number % 2
        held = self._held
        counters = self._counters[index]
        current = 0
        if held[index] == number:
            current = 0xFFFFFFFF
            for slot in slots:  # _least, written out: the hot path
                count = counters[slot]
                if count < current:
                    current = count
        if limit:
            used = current
            if held[1 - index] == number - 1:
                previous = _least(self._counters[1 - index], slots)
                used = current + previous * max(0.0, 1.0 - (now - number * window) / window)
            if used > limit - HALF:
                return used
        if held[index] != number:
            self._sketches[index].clear()
            held[index] = number
        # The conservative update of one event: only the counters at the minimum grow.
        target = current + 1 if current < 0xFFFFFFFF else current
        for slot in slots:
            if counters[slot] < target:
                counters[slot] = target
        return None

    def seconds_until_below(self, slots: tuple[int, ...], limit: float, now: float) -> float:
        """How long until the windowed count drops to `limit` or below, if nothing more is added."""
        current, previous, started = self._counts(slots, now)
        window = self.window
        if current <= limit:
            if previous == 0 or current + previous * max(0.0, 1.0 - (now - started) / window) <= limit:
                return 0.0
            # current + previous·(1 - (t - started)/W) <= limit, solved for t within this window.
            return max(0.0, started + window * (1 - (limit - current) / previous) - now)
        # After the next window starts, `current` becomes the previous window and decays in its turn.
        return started + window - now + window * (1 - limit / current)
