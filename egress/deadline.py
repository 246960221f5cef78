"""One timer per connection whose deadline moves without re-arming.

Contract: `set(when)` moves the deadline (loop time) and `clear()` disarms it; `callback` runs once
when the deadline passes. Moving the deadline later costs an attribute store: the pending timer
notices on firing and re-arms itself (aiohttp's keep-alive trick), so a per-chunk idle deadline
doesn't create and cancel a timer per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

_NEVER = float("inf")


class Deadline:
    __slots__ = ("_armed_at", "_callback", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = _NEVER  # when the pending timer fires; a float compare, not a method call

    def set(self, when: float) -> None:
        self._when = when
        if when < self._armed_at:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)
            self._armed_at = when

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        self._when = None
        self._armed_at = _NEVER
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = _NEVER
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:
            self._handle = self._loop.call_at(when, self._fire)
            self._armed_at = when
            return
        self._when = None
        self._callback()
