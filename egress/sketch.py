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
  and Cloudflare's sliding-window limiter.
"""

from __future__ import annotations

import hashlib
import math
from array import array


class CountMinSketch:
    __slots__ = ("_counters", "depth", "width")

    def __init__(self, width: int, depth: int) -> None:
        if width < 1 or depth < 1 or depth > 8:
            raise ValueError("width must be positive and depth 1..8")
        self.width = width
        self.depth = depth
        self._counters = array("I", bytes(4 * width * depth))

    @property
    def epsilon(self) -> float:
        return math.e / self.width

    @property
    def delta(self) -> float:
        return math.exp(-self.depth)

    @property
    def nbytes(self) -> int:
        return self._counters.itemsize * len(self._counters)

    def slots(self, key: bytes) -> tuple[int, ...]:
        # One BLAKE2b digest gives `depth` independent 64-bit hashes; stable across processes, so
        # a sketch shared between workers agrees on where a key lives.
        digest = hashlib.blake2b(key, digest_size=8 * self.depth).digest()
        width = self.width
        return tuple(
            row * width + int.from_bytes(digest[8 * row : 8 * row + 8], "little") % width for row in range(self.depth)
        )

    def estimate(self, slots: tuple[int, ...]) -> int:
        counters = self._counters
        return min(counters[slot] for slot in slots)

    def add(self, slots: tuple[int, ...], amount: int = 1) -> int:
        counters = self._counters
        target = min(counters[slot] for slot in slots) + amount
        target = min(target, 0xFFFFFFFF)
        for slot in slots:
            if counters[slot] < target:
                counters[slot] = target
        return target

    def clear(self) -> None:
        self._counters = array("I", bytes(self._counters.itemsize * len(self._counters)))


class SlidingWindow:
    """Events per key over the last `window` seconds, from two rotating sketches."""

    __slots__ = ("_current", "_previous", "started", "window")

    def __init__(self, width: int, depth: int, window: float, now: float) -> None:
        self.window = window
        self._current = CountMinSketch(width, depth)
        self._previous = CountMinSketch(width, depth)
        self.started = now  # start of the current window

    def slots(self, key: bytes) -> tuple[int, ...]:
        return self._current.slots(key)

    def _rotate(self, now: float) -> None:
        elapsed = now - self.started
        if elapsed < self.window:
            return
        if elapsed < 2 * self.window:
            self._previous, self._current = self._current, self._previous
            self._current.clear()
            self.started += self.window
        else:  # idle for two windows or more: nothing recent is left
            self._previous.clear()
            self._current.clear()
            self.started = now

    def weight_of_previous(self, now: float) -> float:
        return max(0.0, 1.0 - (now - self.started) / self.window)

    def estimate(self, slots: tuple[int, ...], now: float) -> float:
        self._rotate(now)
        return self._current.estimate(slots) + self._previous.estimate(slots) * self.weight_of_previous(now)

    def add(self, slots: tuple[int, ...], amount: int, now: float) -> None:
        self._rotate(now)
        self._current.add(slots, amount)

    def seconds_until_below(self, slots: tuple[int, ...], limit: float, now: float) -> float:
        """How long until the windowed count drops to `limit` or below, if nothing more is added."""
        self._rotate(now)
        current = self._current.estimate(slots)
        previous = self._previous.estimate(slots)
        window = self.window
        left_in_window = self.started + window - now
        if current <= limit:
            if previous == 0 or current + previous * self.weight_of_previous(now) <= limit:
                return 0.0
            # current + previous·(1 - (t - started)/W) ≤ limit, solved for t within this window.
            return max(0.0, self.started + window * (1 - (limit - current) / previous) - now)
        # After the next rotation `current` becomes the previous window and decays in its turn.
        return left_in_window + window * (1 - limit / current)
